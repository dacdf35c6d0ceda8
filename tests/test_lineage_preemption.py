"""A signal inside a lineage block's train(): progress saved at the batch boundary, the exit status of train_model,
and a re-run that continues the call to the result of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiment_io import PREEMPTED_EXIT_CODE
from experiment_io.frontends.lineage import Model, metric
from experiment_io.frontends.lineage.records import PROGRESS_NAME, RECORD_VERSION, VERSION_KEY
from experiment_io.storage.manifest import read_manifest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "lineage_preempted.py")


def run_script(root, out, *options):
    return subprocess.Popen([sys.executable, SCRIPT, str(root), str(out), *options], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def lines(path):
    try:
        with open(path) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_inside_train_saves_exits_75_and_a_rerun_continues_exactly(tmp_path):
    reference = run_script(tmp_path / "reference", tmp_path / "reference.pt")
    _, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err
    expected = torch.load(tmp_path / "reference.pt", weights_only=True)

    root, out, log = tmp_path / "run", tmp_path / "run.pt", tmp_path / "samples.log"
    process = run_script(root, out, "--slow", "0.004", "--log", str(log))
    deadline = time.monotonic() + 60
    while lines(log) < 40 and process.poll() is None and time.monotonic() < deadline:  # inside epoch 1, batch 3
        time.sleep(0.005)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == PREEMPTED_EXIT_CODE, err
    assert "interrupted by SIGTERM in epoch 1" in err and f"exiting with status {PREEMPTED_EXIT_CODE}" in err, err
    progress = read_manifest(root / "net" / "1")[1][PROGRESS_NAME]
    assert 0 < progress["step"] < 24 and progress[VERSION_KEY] == RECORD_VERSION  # saved mid-call, on the signal
    assert not os.path.exists(out)

    rerun = run_script(root, out)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert "continuing the interrupted train() call 1 at epoch 1 of 3, batch" in err, err
    got = torch.load(out, weights_only=True)
    assert got["result"] == expected["result"]
    assert same(got["state"], expected["state"])
    assert torch.equal(got["next_random"], expected["next_random"])
    for a, b in zip(got["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert same(a, b)


def loaders():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=generator)
    y = (x[:, 0] + x[:, 2] > 0).long()
    return (DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32))


def signalling(signum, at):
    """An accuracy metric that sends this process ``signum`` at its ``at``-th call (a training batch)."""
    count = {"n": 0}

    @metric("accuracy")
    def accuracy(outputs, targets):
        count["n"] += 1
        if count["n"] == at:
            os.kill(os.getpid(), signum)
        return (outputs.argmax(dim=-1) == targets).sum().item()
    return accuracy


def block(root, accuracy, **train_args):
    torch.manual_seed(0)
    model = Model("net", torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                  root=root, quiet=True)
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01))
        result = cp.train(*loaders(), watch="accuracy", epochs=2, metrics=[accuracy], **train_args)
    return model, result


@pytest.mark.parametrize("signum,options,raised", [
    (signal.SIGINT, {}, KeyboardInterrupt),
    (signal.SIGTERM, {"exit_on_preemption": False}, KeyboardInterrupt),
    (signal.SIGUSR1, {}, SystemExit),
])
def test_a_signal_stops_the_call_at_the_next_batch_after_a_progress_save(tmp_path, signum, options, raised):
    reference, expected = block(tmp_path / "reference", signalling(signum, 0))
    previous = signal.getsignal(signum)
    with pytest.raises(raised) as stopped:
        block(tmp_path / "run", signalling(signum, 3), **options)  # the 3rd training batch of epoch 1
    if raised is SystemExit:
        assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert signal.getsignal(signum) is previous  # the handlers are restored
    progress = read_manifest(tmp_path / "run" / "net" / "1")[1][PROGRESS_NAME]
    assert progress["step"] == 3 and progress["epochs_done"] == 0  # written at the batch the signal came in
    model, result = block(tmp_path / "run", signalling(signum, 0))
    assert result == expected
    assert same(model.model.state_dict(), reference.model.state_dict())


def test_without_signals_a_signal_acts_as_before(tmp_path):
    # Python's own SIGINT handler, whatever this process inherited (a shell's background job starts with SIGINT
    # ignored, and Python then installs none)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):  # the handler the library found: no progress save at the batch
            block(tmp_path, signalling(signal.SIGINT, 3), signals=())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert read_manifest(tmp_path / "net" / "1")[1][PROGRESS_NAME]["step"] == 0
