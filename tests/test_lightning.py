"""experiment_io.lightning with Lightning on the CPU: a fit interrupted by a real signal and resumed from the
checkpoint ExactResume wrote ends with the weights of an uninterrupted fit; Lightning's checkpoints go through
experiment_io's storage. Each fit runs in a fresh process (tests/scripts/lightning_fit.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from experiment_io import PREEMPTED_EXIT_CODE
from experiment_io.storage.manifest import MANIFEST_NAME

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "lightning_fit.py")


def fit(directory, *args, expect=0):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, SCRIPT, str(directory), *map(str, args)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_same_weights(a, b):
    first, second = torch.load(a / "final.pt"), torch.load(b / "final.pt")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def manifest(directory):
    return json.loads((directory / MANIFEST_NAME).read_text())["files"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("whole")
    fit(directory)
    return directory


@pytest.mark.slow
def test_a_fit_stopped_by_sigterm_mid_epoch_resumes_exactly(uninterrupted, tmp_path):
    result = fit(tmp_path, "--signal-at", 17, expect=PREEMPTED_EXIT_CODE)  # epoch 1, batch 5 of 12
    assert "SIGTERM" in result.stderr and "last.ckpt" in result.stderr
    record = manifest(tmp_path)["last.ckpt"]
    assert record["kind"] == "user" and record["size"] == (tmp_path / "last.ckpt").stat().st_size
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["global_step"] == 18 and state["callbacks"]["experiment_io.ExactResume"]["sampler"]["samples_consumed"] == 48
    fit(tmp_path)  # the same command resumes
    assert_same_weights(uninterrupted, tmp_path)


@pytest.mark.slow
def test_ctrl_c_writes_the_checkpoint_and_ends_the_fit(uninterrupted, tmp_path):
    fit(tmp_path, "--signal-at", 5, "--signal", "SIGINT")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6
    os.remove(tmp_path / "final.pt")
    fit(tmp_path)
    assert_same_weights(uninterrupted, tmp_path)


@pytest.mark.slow
def test_two_processes_ddp_signal_on_one_rank_stops_both_and_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    fit(whole, "--devices", 2)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    result = fit(stopped, "--devices", 2, "--signal-at", 10, "--signal-rank", 1, expect=PREEMPTED_EXIT_CODE)
    assert result.stderr.count("SIGTERM: checkpoint written") == 2  # rank 0 acts on rank 1's signal too
    state = torch.load(stopped / "last.ckpt", weights_only=True)
    assert len(state["callbacks"]["experiment_io.ExactResume"]["rng"]) == 2  # every rank's streams
    fit(stopped, "--devices", 2)
    assert_same_weights(whole, stopped)


@pytest.mark.slow
def test_model_checkpoint_top_k_saves_and_removes_through_the_manifest(tmp_path):
    fit(tmp_path, "--top-k", 2)
    top = tmp_path / "top"
    files = sorted(n for n in os.listdir(top) if n.endswith(".ckpt"))
    records = manifest(top)
    assert len(files) == 2 and sorted(n for n in records if not records[n].get("retired")) == files
    assert set(os.listdir(top)) == set(files) | {MANIFEST_NAME}


def test_atomic_checkpoint_io_loads_verified_and_falls_back_to_the_previous_generation(tmp_path):
    from experiment_io.frontends.lightning import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    path = tmp_path / "c.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    io.save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}, "global_step": 2}, path)
    assert io.load_checkpoint(path)["global_step"] == 2
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert io.load_checkpoint(path)["global_step"] == 1  # c.prev.ckpt, intact
    io.remove_checkpoint(path)
    assert not path.exists() and not (tmp_path / "c.prev.ckpt").exists()
    assert manifest(tmp_path) == {}


def test_exact_resume_refuses_a_sampler_it_cannot_continue():
    from torch.utils.data import RandomSampler

    from experiment_io.errors import SetupError
    from experiment_io.frontends.lightning import ExactResume
    with pytest.raises(SetupError, match="ResumableSampler"):
        ExactResume("last.ckpt", sampler=RandomSampler(range(4)))
