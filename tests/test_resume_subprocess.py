"""Exact resume across processes: real SIGKILL and SIGINT sent to a training subprocess.

Each test trains the same small model (with dropout, two LR schedulers and a seeded
shuffle) once without stopping, and once interrupted and restarted with
``load_checkpoint_from_cwd()`` + ``train_model(**check)`` in a new process. The final
parameters, optimizer state, scheduler states, metric history and the sequence of
samples trained on must be bit-for-bit the same.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from experiment_io import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow  # every test here runs training in subprocesses

DRIVER = os.path.join(os.path.dirname(__file__), "scripts", "train_driver.py")
MANIFEST = "experiment_manifest.json"
TIMEOUT = 180


def run_driver(cwd, mode, *extra):
    proc = subprocess.run([sys.executable, DRIVER, mode, *extra], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    return proc


def start_driver(cwd, mode, *extra):
    return subprocess.Popen([sys.executable, DRIVER, mode, *extra], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_record(cwd):
    try:
        with open(os.path.join(cwd, MANIFEST)) as f:
            return json.load(f)["files"].get("last_checkpoint.pt")
    except (FileNotFoundError, ValueError):
        return None


def log_lines(cwd):
    try:
        with open(os.path.join(cwd, "batches.log")) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_until(condition, proc, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the training process ended (rc={proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def assert_same_result(a, b):
    """Bit-for-bit comparison of two result.pt dicts."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs"
    for k in a["best_model_state"]:
        assert torch.equal(a["best_model_state"][k], b["best_model_state"][k]), f"best model {k} differs"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for p in sa:
        for k in sa[p]:
            assert torch.equal(sa[p][k], sb[p][k]), f"optimizer state {p}/{k} differs"
    assert a["schedulers"] == b["schedulers"]
    assert a["history"] == b["history"]
    assert a["epochs"] == b["epochs"] and a["best_epoch"] == b["best_epoch"]
    assert a["current_epoch"] == b["current_epoch"]


def load_result(cwd):
    return torch.load(os.path.join(cwd, "result.pt"), weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reference")
    proc = run_driver(cwd, "fresh")
    assert proc.returncode == 0, proc.stderr
    return load_result(cwd), log_lines(cwd)


def test_comparison_detects_a_different_run(reference, tmp_path):
    """The comparison is not vacuous: a run with one epoch less differs."""
    proc = run_driver(tmp_path, "fresh", "--epochs", "5")
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AssertionError):
        assert_same_result(reference[0], load_result(tmp_path))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_then_restart_is_bit_for_bit(reference, tmp_path, seed):
    rng = random.Random(seed)
    proc = start_driver(tmp_path, "fresh", "--batch-sleep", "0.01")
    min_epochs = rng.randint(1, 4)
    wait_until(lambda: (last_record(tmp_path) or {}).get("epochs_done", 0) >= min_epochs, proc, "a checkpoint")
    time.sleep(rng.uniform(0.0, 0.25))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    record = last_record(tmp_path)
    killed_log = log_lines(tmp_path)
    assert len(killed_log) >= record["step"]

    resumed = run_driver(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_result(reference[0], load_result(tmp_path))
    # Batches trained after the last checkpoint were lost and done again, in the same order.
    lines = log_lines(tmp_path)
    lost = len(killed_log) - record["step"]
    assert lines[:record["step"]] + lines[len(killed_log):] == reference[1]
    assert lines[record["step"]:len(killed_log)] == reference[1][record["step"]:record["step"] + lost]


@pytest.mark.parametrize("every,seed", [(3, 0), (7, 1)])
def test_sigkill_with_checkpoint_every_batches_loses_at_most_n_batches(reference, tmp_path, every, seed):
    rng = random.Random(200 + seed)
    proc = start_driver(tmp_path, "fresh", "--batch-sleep", "0.01", "--every", str(every))
    target = rng.randint(5, 80)
    wait_until(lambda: len(log_lines(tmp_path)) >= target, proc, f"batch {target}")
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    record = last_record(tmp_path)
    killed_log = log_lines(tmp_path)
    lost = len(killed_log) - record["step"]
    assert 0 <= lost <= every, f"{lost} batches would be recomputed, more than checkpoint_every_batches={every}"

    resumed = run_driver(tmp_path, "resume", "--every", str(every))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_result(reference[0], load_result(tmp_path))
    lines = log_lines(tmp_path)
    assert lines[:record["step"]] + lines[len(killed_log):] == reference[1]


@pytest.mark.parametrize("signame,seed", [("SIGINT", 0), ("SIGINT", 1), ("SIGTERM", 2), ("SIGUSR1", 3)])
def test_signal_mid_epoch_then_restart_is_bit_for_bit(reference, tmp_path, signame, seed):
    """A signal at a random batch of a random epoch: checkpoint, documented exit, exact resume."""
    rng = random.Random(100 + seed)
    proc = start_driver(tmp_path, "fresh", "--batch-sleep", "0.01")
    min_epochs = rng.randint(1, 3)
    wait_until(lambda: (last_record(tmp_path) or {}).get("epochs_done", 0) >= min_epochs, proc, "a checkpoint")
    target = len(log_lines(tmp_path)) + rng.randint(1, 25)
    wait_until(lambda: len(log_lines(tmp_path)) >= target, proc, f"batch {target}")
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=TIMEOUT)
    if signame == "SIGINT":  # train_model returns; the driver reports it
        assert proc.returncode == 3 and "INTERRUPTED" in out, err
    else:  # the process exits with the documented "preempted, checkpoint saved" status
        assert proc.returncode == PREEMPTED_EXIT_CODE, err
    record = last_record(tmp_path)
    assert record["interrupted"] == signame
    # The checkpoint written on the signal holds every batch trained: nothing is redone.
    assert record["step"] == len(log_lines(tmp_path))
    # (samples_done is 0 when the signal came during the evaluation at an epoch's end)
    assert 0 <= record["samples_done"] < 240  # the training split holds 240 samples

    resumed = run_driver(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_result(reference[0], load_result(tmp_path))
    assert log_lines(tmp_path) == reference[1]


def test_restart_of_a_finished_run_changes_nothing(reference, tmp_path):
    proc = run_driver(tmp_path, "fresh")
    assert proc.returncode == 0, proc.stderr
    again = run_driver(tmp_path, "resume")
    assert again.returncode == 0, again.stderr
    assert_same_result(reference[0], load_result(tmp_path))
