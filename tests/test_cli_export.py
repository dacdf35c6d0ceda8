"""experiment-io list and export, run as a user runs them (a fresh process)."""
import os
import subprocess
import sys

import pytest
import torch

from experiment_io import Retention, load_model_from_cwd
from experiment_io.run.payloads import LAST_NAME

from helpers import TinyNet, train_tiny_run


def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiment_io", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    train_tiny_run(str(directory), max_epochs=4, store_every=2)
    return directory


def assert_same_state(loaded, expected):
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


def test_export_state_dict_of_the_best_model_loads_into_the_model(run, tmp_path):
    out = tmp_path / "best.pt"
    result = cli("export", run, out)
    assert result.returncode == 0, result.stderr
    state = torch.load(out, weights_only=True)
    expected = load_model_from_cwd(directory=str(run)).state_dict()
    assert_same_state(state, expected)
    model = TinyNet()
    model.load_state_dict(state)


def test_export_safetensors_of_the_last_and_of_an_epoch(run, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    out = tmp_path / "last.safetensors"
    result = cli("export", run, out, "--format", "safetensors", "--which", "last")
    assert result.returncode == 0, result.stderr
    last = torch.load(run / LAST_NAME, weights_only=True)["model"]
    assert_same_state(safetensors.load_file(str(out)), last)
    out = tmp_path / "epoch1.safetensors"
    assert cli("export", run, out, "--format", "safetensors", "--epoch", 1).returncode == 0
    assert_same_state(safetensors.load_file(str(out)), torch.load(run / "model_epoch_1.pt", weights_only=True))
    with open(out, "rb") as f:  # the header names where the weights came from
        header = f.read(int.from_bytes(f.read(8), "little"))
    assert b"model_epoch_1.pt" in header and b'"epochs_done":"2"' in header


def test_export_of_an_epoch_not_kept_says_how_to_keep_one(run, tmp_path):
    result = cli("export", run, tmp_path / "x.pt", "--epoch", 2)
    assert result.returncode == 1 and "epoch 2" in result.stderr and "store_every" in result.stderr
    assert not (tmp_path / "x.pt").exists()
    result = cli("export", run, tmp_path / "x.pt", "--epoch", 1, "--which", "last")
    assert result.returncode == 2


def test_export_refuses_a_damaged_file_and_falls_back_to_its_previous_generation(tmp_path):
    train_tiny_run(str(tmp_path / "run"), max_epochs=3)
    path = tmp_path / "run" / LAST_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "last.pt"
    result = cli("export", tmp_path / "run", out, "--which", "last")
    assert result.returncode == 0, result.stderr
    assert "last_checkpoint.prev.pt" in result.stdout  # the intact previous generation
    assert_same_state(torch.load(out, weights_only=True),
                      torch.load(tmp_path / "run" / "last_checkpoint.prev.pt", weights_only=True)["model"])


def test_list_shows_every_file_with_its_generation_and_epoch(tmp_path):
    directory = tmp_path / "run"
    train_tiny_run(str(directory), max_epochs=3, store_every=1)
    (directory / "stray.pt").write_bytes(b"x")
    (directory / ".last_checkpoint.pt.999999.abcd1234.tmp").write_bytes(b"x")
    result = cli("list", directory)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(lines) >= {n + "/" if (directory / n).is_dir() else n for n in os.listdir(directory)}
    assert " committed " in lines[LAST_NAME] and "state after epoch 2" in lines[LAST_NAME]
    assert " previous " in lines["last_checkpoint.prev.pt"] and "state after epoch 1" in lines["last_checkpoint.prev.pt"]
    assert lines["model_epoch_0.pt"].split()[2] == "0" and "model after epoch 0" in lines["model_epoch_0.pt"]
    assert " unrecorded " in lines["stray.pt"]
    assert " temporary " in lines[".last_checkpoint.pt.999999.abcd1234.tmp"]


def test_list_marks_files_being_removed_by_a_retention(tmp_path, monkeypatch):
    real_unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if "model_epoch_0" in str(path):
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)
    from experiment_io import SetupParams, setup_training, train_model
    from helpers import make_database, make_training_modules
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32,
                                                                                  max_epochs=2))
    train_model(tm, make_database(), controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                retention=Retention(last=1), plots=False, evaluate_best=False)
    monkeypatch.setattr(os, "unlink", real_unlink)
    lines = {line.split()[0]: line for line in cli("list", tmp_path).stdout.splitlines()[1:]}
    assert " retired " in lines["model_epoch_0.pt"] and "being removed" in lines["model_epoch_0.pt"]
    assert "kept: last 1" in lines["model_epoch_1.pt"]


def test_list_tells_a_file_left_by_an_interrupted_save_from_the_committed_one(tmp_path):
    directory = tmp_path / "run"
    train_tiny_run(str(directory), max_epochs=2)
    (directory / LAST_NAME).write_bytes(b"a save renamed this in, then died before its manifest")
    lines = {line.split()[0]: line for line in cli("list", directory).stdout.splitlines()[1:]}
    assert " unrecorded " in lines[LAST_NAME] and "interrupted" in lines[LAST_NAME]


def test_export_prefers_a_committed_best_checkpoint_to_an_older_best_model(tmp_path):
    directory = tmp_path / "run"
    train_tiny_run(str(directory), max_epochs=3)
    path = directory / "best_model.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = cli("export", directory, tmp_path / "best.pt")
    assert result.returncode == 0, result.stderr
    assert "best_checkpoint.pt" in result.stdout
    best = torch.load(directory / "best_checkpoint.pt", weights_only=True)["model"]
    assert_same_state(torch.load(tmp_path / "best.pt", weights_only=True), best)
