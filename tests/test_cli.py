"""The command line: info, verify and metrics on a real run directory."""
import subprocess
import sys

import h5py
import pytest

from experiment_io.run.payloads import LAST_NAME, STRUCTURE_NAME
from experiment_io.frontends.cli import main

from helpers import flip_bit, record_torch_loads, train_tiny_run


@pytest.fixture
def run(tmp_path):
    _, _, tracker, _ = train_tiny_run(tmp_path, max_epochs=3)
    return tmp_path, tracker


def test_info_lists_every_file(run, capsys):
    directory, _ = run
    assert main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    for name in (STRUCTURE_NAME, LAST_NAME, "best_model.pt", "last_checkpoint.prev.pt"):
        assert name in out


def test_verify_passes_then_reports_damage(run, capsys):
    directory, _ = run
    assert main(["verify", str(directory)]) == 0
    assert "DAMAGED" not in capsys.readouterr().out
    flip_bit(directory / LAST_NAME)
    flip_bit(directory / "last_checkpoint.prev.pt")
    assert main(["verify", str(directory)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED  {directory / LAST_NAME}" in out


def test_metrics_print_and_export_without_opening_the_structure(run, capsys, monkeypatch, tmp_path):
    directory, tracker = run
    opened = record_torch_loads(monkeypatch)
    assert main(["metrics", str(directory)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 5 and "valid/mse" in out
    out_file = tmp_path / "history.h5"
    assert main(["metrics", str(directory), "--hdf5", str(out_file)]) == 0
    with h5py.File(out_file, "r") as h5:
        assert list(h5["valid/mse"][()]) == tracker.history["valid"]["mse"]
    assert opened and all(name != STRUCTURE_NAME and weights_only is True for name, weights_only in opened)


@pytest.mark.slow
def test_module_entry_point_and_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiment_io", "verify", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no experiment_manifest.json" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "experiment_io", "bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
