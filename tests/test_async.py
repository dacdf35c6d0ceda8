"""Asynchronous saving (``train_model(async_save=True)``).

The loop is blocked only while the state is copied into staging buffers; the write,
fsync, digest and manifest happen in a background thread. These tests check that
what the thread writes is exactly what a synchronous save writes, that a resume from
it is exact, that errors of the thread reach the training loop, that training never
ends (return, Ctrl-C, preemption exit, exception) before the last save committed,
that the staging buffers are reused, and that SIGKILLs at random instants leave a
directory that loads, as for synchronous saves.
"""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import experiment_io.storage.atomic as storage
from experiment_io.storage import manifest as run_manifest
from experiment_io.training.asynchronous import BackgroundWriter, StagingArea, with_own_memory
from experiment_io.experiment.controllers import TrainingPosition
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, model_payload, save_payload, save_payloads, structure_payload
from experiment_io.errors import CheckpointWriteError, StagedStateModifiedError
from experiment_io import PREEMPTED_EXIT_CODE, SetupParams, setup_training, train_model
from experiment_io.loading.loaders import load_checkpoint_from_cwd

from helpers import fork_child, make_database, make_training_modules, payload_at

torch.set_num_threads(1)  # the kill storm forks this process

HERE = os.path.dirname(os.path.abspath(__file__))


def setup(max_epochs=3, batch_size=16, seed=0, **kwargs):
    return setup_training(make_training_modules(seed), SetupParams(stopping_key="mse", batch_size=batch_size,
                                                                    max_epochs=max_epochs, **kwargs))


def train(directory, database, *, async_save, max_epochs=3, batch_callbacks=None, **kwargs):
    tm, controller, tracker = setup(max_epochs)
    tracker = train_model(tm, database, controller, tracker, None, batch_callbacks, quiet=True, directory=str(directory),
                          async_save=async_save, **kwargs)
    return tm, controller, tracker


def manifest(directory):
    with open(os.path.join(directory, run_manifest.MANIFEST_NAME)) as f:
        return json.load(f)["files"]


def to_bytes(payload):
    buffer = io.BytesIO()
    save_payload(payload, buffer)
    return buffer.getvalue()


def assert_same_training_state(a, b):
    """Bit-for-bit equality of two (training_modules, controller, tracker) triples."""
    (tm_a, c_a, t_a), (tm_b, c_b, t_b) = a, b
    for (name, pa), (_, pb) in zip(tm_a.model.state_dict().items(), tm_b.model.state_dict().items()):
        assert torch.equal(pa, pb), f"parameter {name} differs"
    sa, sb = c_a.optimizer.state_dict(), c_b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for p in sa["state"]:
        for k in sa["state"][p]:
            assert torch.equal(sa["state"][p][k], sb["state"][p][k]), f"optimizer state {p}/{k} differs"
    assert t_a.history == t_b.history
    assert t_a.best_epoch == t_b.best_epoch
    for k in t_a.best_model_state:
        assert torch.equal(t_a.best_model_state[k], t_b.best_model_state[k])


@pytest.fixture
def slow_background(monkeypatch, write_steps):
    """Make every write of the background thread slow, so that saves are still in flight."""

    def stage(at, path):
        if at == "fsynced" and threading.current_thread() is not threading.main_thread():
            time.sleep(0.05)

    write_steps(stage)


# --- what the background thread writes ---------------------------------------------


def test_staged_payload_encodes_to_the_same_bytes():
    tm, controller, tracker = setup()
    tm.model(torch.randn(4, 3)).sum().backward()
    controller.optimizer.step()  # optimizer state with tensors (exp_avg, step, ...)
    tracker.record_best_model(tm.model)
    payload = payload_at(tm, controller, tracker, make_database(), TrainingPosition(epoch=1, step=5), "xxh3_128:0")
    weight = tm.model.layer1.weight
    payload["views"] = {"row": weight[1], "column": weight[:, 2], "whole": weight, "again": weight}
    staged = StagingArea().copy({LAST_NAME: payload, BEST_NAME: payload})
    assert staged[LAST_NAME] is staged[BEST_NAME]  # an object reached twice is copied once
    assert to_bytes(staged[LAST_NAME]) == to_bytes(payload)
    assert staged[LAST_NAME]["model"]._metadata == payload["model"]._metadata
    views = staged[LAST_NAME]["views"]
    assert views["row"].untyped_storage().data_ptr() == views["whole"].untyped_storage().data_ptr()
    assert views["whole"] is views["again"]
    assert views["row"].data_ptr() != weight[1].data_ptr()


def test_staged_copy_does_not_follow_the_training_loop():
    tm, controller, tracker = setup()
    tm.model(torch.randn(4, 3)).sum().backward()
    controller.optimizer.step()
    payload = payload_at(tm, controller, tracker, make_database(), TrainingPosition(), "xxh3_128:0")
    staged = StagingArea().copy(payload)
    expected = to_bytes(payload)
    with torch.no_grad():
        for p in tm.model.parameters():
            p.add_(1.0)
    tm.model(torch.randn(4, 3)).sum().backward()
    controller.optimizer.step()  # changes exp_avg, exp_avg_sq and step in place
    payload["controller"]["current_epoch"] = 99
    assert to_bytes(staged) == expected


def without_times(payload):
    """The payload with the metric tracker's wall-clock epoch times zeroed (they differ between any two runs): in
    the tracker's history, or in the size and digest of the part of metrics.csv that holds it."""
    tracker = payload.get("metric_tracker")
    if tracker is not None and "epoch_times" in tracker:
        tracker["epoch_times"] = [0.0] * len(tracker["epoch_times"])
    if tracker is not None and "history_file" in tracker:
        tracker["history_file"] = {**tracker["history_file"], "size": 0, "digest": ""}
    return payload


@pytest.fixture
def slow_deferred_copy(monkeypatch):
    """Delay the background copy of the deferred tensors, so that the next batch's
    forward and backward pass really run while it is under way."""
    original = StagingArea.copy_deferred

    def slow(self):
        time.sleep(0.01)
        original(self)

    monkeypatch.setattr(StagingArea, "copy_deferred", slow)


@pytest.mark.parametrize("mode", [True, "copy"])
def test_async_run_writes_the_same_files_as_a_sync_run(tmp_path, mode, slow_deferred_copy):
    database = make_database()
    sync = train(tmp_path / "sync", database, async_save=False, checkpoint_every_batches=2, store_every=1)
    asynchronous = train(tmp_path / "async", database, async_save=mode, checkpoint_every_batches=2, store_every=1)
    assert_same_training_state(sync, asynchronous)
    files_sync, files_async = manifest(tmp_path / "sync"), manifest(tmp_path / "async")
    assert sorted(files_sync) == sorted(files_async)
    for name in files_sync:
        # metrics.csv holds the wall-clock epoch times: its size may differ
        same = {k for k in files_sync[name] if k not in ("written_at", "digest") + (("size",) if name.endswith(".csv") else ())}
        assert {k: files_sync[name][k] for k in same} == {k: files_async[name][k] for k in same}, name
        if name.endswith((".json", ".csv")):
            continue
        if name == STRUCTURE_NAME or name.startswith("model_epoch") or name.startswith(BEST_MODEL_NAME[:-3]):
            assert (tmp_path / "sync" / name).read_bytes() == (tmp_path / "async" / name).read_bytes(), name
        else:  # equal but for the wall-clock epoch times, down to the bytes torch.save writes
            a = torch.load(tmp_path / "sync" / name, weights_only=True)
            b = torch.load(tmp_path / "async" / name, weights_only=True)
            assert to_bytes(without_times(a)) == to_bytes(without_times(b)), name


@pytest.mark.parametrize("mode", [True, "copy"])
def test_resume_from_async_checkpoints_is_exact(tmp_path, mode, slow_deferred_copy):
    database = make_database(n=300)
    reference = train(tmp_path / "reference", database, async_save=False, max_epochs=4)

    tm, controller, tracker = setup(4)
    batches = []

    def interrupt(inputs, outputs, targets):
        batches.append(1)
        if controller.current_epoch == 2 and len(batches) == 2 * 15 + 4:  # 15 batches per epoch
            os.kill(os.getpid(), signal.SIGINT)

    tracker = train_model(tm, database, controller, tracker, None, [interrupt], quiet=True,
                          directory=str(tmp_path / "run"), async_save=mode, checkpoint_every_batches=3)
    assert tracker.stop_reason == "interrupted by SIGINT"
    record = manifest(tmp_path / "run")[LAST_NAME]
    assert record["interrupted"] == "SIGINT" and record["step"] == len(batches)

    check = load_checkpoint_from_cwd(directory=str(tmp_path / "run"), database=database)
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, directory=str(tmp_path / "run"),
                async_save=mode, checkpoint_every_batches=3)
    assert_same_training_state(reference, (check["training_modules"], check["controller"], check["metric_tracker"]))


# --- copies deferred to the background thread (async_save=True) -------------------


def deferred_save(tmp_path, monkeypatch):
    """A BackgroundSaver whose deferred copy waits for ``go``; returns (saver, model, go, expected bytes)."""
    writer, tm, controller, tracker, digest = writer_with_structure(tmp_path)
    tm.model(torch.randn(4, 3)).sum().backward()
    controller.optimizer.step()
    go, original = threading.Event(), StagingArea.copy_deferred

    def held(self):
        go.wait(10)
        original(self)

    monkeypatch.setattr(StagingArea, "copy_deferred", held)
    payload = payload_at(tm, controller, tracker, make_database(), TrainingPosition(step=1), digest)
    expected = to_bytes(payload)
    saver = WriterInBackground(writer)
    deferred = list(tm.model.parameters()) + [v for s in controller.optimizer.state.values() for v in s.values()]
    saver.save({LAST_NAME: payload}, defer=deferred)
    assert saver.staging.deferred_nbytes == sum(t.untyped_storage().nbytes() for t in deferred)
    return saver, tm, controller, go, expected


def test_deferred_copies_are_written_as_a_snapshot(tmp_path, monkeypatch):
    saver, tm, controller, go, expected = deferred_save(tmp_path, monkeypatch)
    tm.model(torch.randn(4, 3)).sum().backward()  # the next batch's forward and backward: no change to the state
    threading.Timer(0.05, go.set).start()
    saver.staged()
    assert saver.staged_wait_s > 0.02
    controller.optimizer.step()  # after staged(): the copy is done, the file will not see this
    saver.wait()
    assert (tmp_path / LAST_NAME).read_bytes() == expected


def test_a_deferred_tensor_changed_before_its_copy_fails_the_save(tmp_path, monkeypatch):
    saver, tm, controller, go, _ = deferred_save(tmp_path, monkeypatch)
    before = manifest(tmp_path)
    with torch.no_grad():
        tm.model.layer2.bias.add_(1.0)  # in place, outside the optimizer step
    go.set()
    with pytest.raises(StagedStateModifiedError, match="changed in place"):
        saver.staged()
    assert not saver.in_flight
    assert manifest(tmp_path) == before and not (tmp_path / LAST_NAME).exists()


class WritesItsWeightInForward(torch.nn.Module):
    """A model that changes a parameter in place in its forward pass (as some projections do)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x):
        with torch.no_grad():
            self.linear.weight.clamp_(-0.5, 0.5)
        return self.linear(x)


@pytest.mark.parametrize("mode", [True, "copy"])
def test_a_model_that_writes_its_parameters_in_forward(tmp_path, monkeypatch, mode):
    from experiment_io import Evaluator, TrainingModules
    original = StagingArea.copy_deferred

    def slow(self):  # the copy is still under way when the next forward pass runs
        time.sleep(0.02)
        original(self)

    monkeypatch.setattr(StagingArea, "copy_deferred", slow)
    torch.manual_seed(0)
    model = WritesItsWeightInForward()
    tm, controller, tracker = setup_training(
        TrainingModules(model, torch.nn.MSELoss(), Evaluator(model, {"mse": torch.nn.MSELoss()})),
        SetupParams(stopping_key="mse", batch_size=16, max_epochs=2, learning_rate=0.5))
    run = lambda: train_model(tm, make_database(), controller, tracker, None, None, quiet=True,  # noqa: E731
                              directory=str(tmp_path), async_save=mode, checkpoint_every_batches=1)
    if mode is True:
        with pytest.raises(StagedStateModifiedError):
            run()
    else:
        run()
        assert manifest(tmp_path)[LAST_NAME]["epochs_done"] == 2


def test_async_save_takes_false_true_or_copy(tmp_path):
    with pytest.raises(ValueError, match="async_save"):
        train(tmp_path, make_database(), async_save="yes")


# --- training never ends before the last save committed ----------------------------


def test_return_waits_for_the_last_save(tmp_path, slow_background):
    database = make_database()
    tm, controller, tracker = train(tmp_path, database, async_save=True, max_epochs=2)
    assert manifest(tmp_path)[LAST_NAME]["epochs_done"] == 2
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert not any(t.name == "experiment_io-save" for t in threading.enumerate())


def test_sigint_does_not_lose_the_last_save(tmp_path, slow_background):
    database = make_database()
    tm, controller, tracker = setup(5)
    trained = []

    def ctrl_c(inputs, outputs, targets):
        trained.append(1)
        if len(trained) == 20:
            os.kill(os.getpid(), signal.SIGINT)

    tracker = train_model(tm, database, controller, tracker, None, [ctrl_c], quiet=True, directory=str(tmp_path),
                          async_save=True, checkpoint_every_batches=1)
    assert tracker.stop_reason == "interrupted by SIGINT"
    record = manifest(tmp_path)[LAST_NAME]
    assert record["interrupted"] == "SIGINT"
    assert record["step"] == 20
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    assert check["controller"].position.step == 20
    for name, value in check["training_modules"].model.state_dict().items():
        assert torch.equal(value, tm.model.state_dict()[name])


@pytest.mark.slow
def test_exception_in_the_loop_waits_for_the_save_in_flight(tmp_path, slow_background):
    database = make_database()
    tm, controller, tracker = setup(5)
    trained = []

    def fail(inputs, outputs, targets):
        trained.append(1)
        if len(trained) == 7:
            raise RuntimeError("the user's callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        train_model(tm, database, controller, tracker, None, [fail], quiet=True, directory=str(tmp_path),
                    async_save=True, checkpoint_every_batches=6)
    assert manifest(tmp_path)[LAST_NAME]["step"] == 6  # submitted at batch 6, committed before the raise
    assert not any(t.name == "experiment_io-save" for t in threading.enumerate())


PREEMPTED_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    sys.path.insert(0, {tests!r})
    import experiment_io.storage.atomic as storage
    from experiment_io.storage import manifest as run_manifest
    from helpers import fork_child, make_database, make_training_modules, payload_at
    from experiment_io import SetupParams, setup_training, train_model
    def slow(at, path):
        if at == "fsynced" and threading.current_thread() is not threading.main_thread():
            time.sleep(0.3)
    observing = storage.observe_write_steps(slow)  # kept referenced: the hook stays on until the child ends
    observing.__enter__()
    batches = []
    def preempt(inputs, outputs, targets):
        batches.append(1)
        if len(batches) == 9:
            os.kill(os.getpid(), signal.{signal})
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=16, max_epochs=3))
    try:
        train_model(tm, make_database(), controller, tracker, None, [preempt], quiet=True, directory={directory!r},
                    async_save=True, checkpoint_every_batches=4)
    except SystemExit:  # what is committed when train_model exits
        files = run_manifest.read_manifest({directory!r})[1]
        print("COMMITTED", files["last_checkpoint.pt"]["step"], flush=True)
        raise
    print("RETURNED")
""")


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_preemption_exits_75_after_the_last_save_committed(tmp_path, signame):
    script = PREEMPTED_SCRIPT.format(tests=HERE, signal=signame, directory=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr
    assert "RETURNED" not in proc.stdout
    assert "COMMITTED 9" in proc.stdout  # committed before train_model raised SystemExit
    record = manifest(tmp_path)[LAST_NAME]
    assert record["interrupted"] == signame and record["step"] == 9
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# --- errors of the background thread -----------------------------------------------


def failing_atomic_write(monkeypatch, fail_at, delay=0.0):
    """Make the ``fail_at``-th write of the background thread raise ENOSPC (a raw OSError) after ``delay`` s."""
    original = storage.FileBatch.write
    calls = []

    def write(self, path, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            calls.append(path)
            if len(calls) == fail_at:
                time.sleep(delay)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(storage.FileBatch, "write", write)
    return calls


@pytest.mark.parametrize("fail_at", [1, 5, 13])  # the first save, a mid-epoch one, the end of an epoch
def test_background_error_surfaces_in_train_model(tmp_path, monkeypatch, fail_at):
    database = make_database()
    calls = failing_atomic_write(monkeypatch, fail_at)
    tm, controller, tracker = setup(3)
    with pytest.raises(CheckpointWriteError) as info:
        train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                    async_save=True, checkpoint_every_batches=4)
    assert isinstance(info.value, OSError)
    assert os.strerror(errno.ENOSPC) in str(info.value)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert len(calls) == fail_at  # no save was started after the failed one
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    if fail_at > 1:  # the saves committed before the failure load
        check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
        assert check["controller"].position.step > 0


@pytest.mark.parametrize("mode", [True, "copy"])
def test_a_failed_save_stops_training_at_the_next_step_not_the_next_save(tmp_path, monkeypatch, mode):
    failing_atomic_write(monkeypatch, fail_at=1)  # the first checkpoint, at the end of epoch 1
    tm, controller, tracker = setup(3)
    steps, batches_per_epoch = [], 10  # 160 training samples in batches of 16

    def step_done(*args):
        steps.append(1)
        if len(steps) == batches_per_epoch + 1:  # in epoch 2: let the failing save end before the next step
            while any(t.name == "experiment_io-save" for t in threading.enumerate()):
                time.sleep(0.001)

    with pytest.raises(CheckpointWriteError):
        train_model(tm, make_database(), controller, tracker, None, [step_done], quiet=True,
                    directory=str(tmp_path), async_save=mode)
    assert batches_per_epoch <= len(steps) <= batches_per_epoch + 1  # raised early in epoch 2, not at its save


def test_error_of_the_last_save_surfaces_when_training_ends(tmp_path, monkeypatch):
    database = make_database()
    calls = failing_atomic_write(monkeypatch, fail_at=0)  # count the writes of a whole run
    tm, controller, tracker = setup(2)
    train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path / "count"),
                async_save=True)
    failing_atomic_write(monkeypatch, fail_at=len(calls))  # the very last write: the last manifest
    tm, controller, tracker = setup(2)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path / "run"),
                    async_save=True)
    assert manifest(tmp_path / "run")[LAST_NAME]["epochs_done"] == 1  # the previous save stays committed


def test_background_error_is_not_lost_when_the_loop_fails_too(tmp_path, monkeypatch, caplog, slow_background):
    database = make_database()
    failing_atomic_write(monkeypatch, fail_at=1, delay=0.5)  # the loop fails while the save is in flight
    tm, controller, tracker = setup(3)
    trained = []

    def fail(inputs, outputs, targets):
        trained.append(1)
        if len(trained) == 5:
            raise RuntimeError("the loop failed")

    with caplog.at_level("ERROR"), pytest.raises(RuntimeError, match="the loop failed") as info:
        train_model(tm, database, controller, tracker, None, [fail], quiet=True, directory=str(tmp_path),
                    async_save=True, checkpoint_every_batches=4)
    assert "No space left on device" in caplog.text
    if hasattr(info.value, "__notes__"):
        assert any("No space left on device" in note for note in info.value.__notes__)


# --- BackgroundWriter and the staging buffers --------------------------------------


class WriterInBackground:
    """A :class:`BackgroundWriter` that saves payloads through one run writer, as train_model's checkpointer does."""

    def __init__(self, writer):
        self.writer, self.background = writer, BackgroundWriter()

    def save(self, payloads, *, defer=()):
        self.background.submit(payloads, lambda staged: save_payloads(self.writer, staged), ", ".join(payloads),
                               defer=defer)

    def __getattr__(self, name):
        return getattr(self.background, name)


def writer_with_structure(directory):
    tm, controller, tracker = setup()
    writer = RunWriter(str(directory))
    save_payloads(writer, {STRUCTURE_NAME: structure_payload(tm, controller, None)})
    digest = writer.record(STRUCTURE_NAME)["digest"]
    return writer, tm, controller, tracker, digest


def test_staging_buffers_are_reused(tmp_path):
    writer, tm, controller, tracker, digest = writer_with_structure(tmp_path)
    saver = WriterInBackground(writer)
    pointers = []
    for step in range(1, 4):
        with torch.no_grad():
            for p in tm.model.parameters():
                p.add_(0.1)
        payload = payload_at(tm, controller, tracker, make_database(), TrainingPosition(step=step), digest)
        saver.save({LAST_NAME: payload})
        pointers.append(sorted(b.data_ptr() for b in saver.staging.buffers()))
        saver.wait()
    assert pointers[0] == pointers[1] == pointers[2]
    assert saver.staging.allocated == len(pointers[0])
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database(), restore_rng=False)
    assert check["controller"].position.step == 3
    for name, value in check["training_modules"].model.state_dict().items():
        assert torch.equal(value, tm.model.state_dict()[name])


def test_staging_buffers_are_reused_by_train_model(tmp_path, monkeypatch):
    pointers, original = [], StagingArea.copy

    def recording_copy(self, obj, **kwargs):
        result = original(self, obj, **kwargs)
        pointers.append({b.data_ptr() for b in self.buffers()})
        return result

    monkeypatch.setattr(StagingArea, "copy", recording_copy)
    tm, controller, tracker = setup(3, termination_patience=None)
    train_model(tm, make_database(), controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                async_save=True, checkpoint_every_batches=2)
    assert len(pointers) > 10
    # once the state has its final shape (Adam's state exists, a best model is recorded), no buffer is new
    settled = pointers[-1]
    assert all(p == settled for p in pointers[-5:])


def test_staging_releases_buffers_that_are_not_used_any_more():
    area = StagingArea()
    area.copy({"a": torch.zeros(1000), "b": torch.zeros(10)})
    assert area.nbytes == 4040
    area.copy({"a": torch.zeros(1000)})
    assert area.nbytes == 4000 and area.allocated == 2


def test_one_save_in_flight(tmp_path, monkeypatch, write_steps):
    writer, tm, controller, tracker, digest = writer_with_structure(tmp_path)
    release = threading.Event()
    committed_steps_seen_by_second_save = []

    def stage(at, path):
        if at == "fsynced" and threading.current_thread() is not threading.main_thread():
            release.wait(10)

    write_steps(stage)
    saver = WriterInBackground(writer)
    saver.save({LAST_NAME: payload_at(tm, controller, tracker, make_database(), TrainingPosition(step=1), digest)})
    assert saver.in_flight
    original_copy = saver.staging.copy

    def copy_after_commit(obj, **kwargs):
        committed_steps_seen_by_second_save.append(manifest(tmp_path)[LAST_NAME]["step"])
        return original_copy(obj, **kwargs)

    saver.staging.copy = copy_after_commit
    threading.Timer(0.2, release.set).start()
    started = time.perf_counter()
    saver.save({LAST_NAME: payload_at(tm, controller, tracker, make_database(), TrainingPosition(step=2), digest)})
    assert time.perf_counter() - started >= 0.15  # the second save waited for the first to commit
    assert committed_steps_seen_by_second_save == [1]
    saver.wait()
    assert manifest(tmp_path)[LAST_NAME]["step"] == 2


def test_with_own_memory_detaches_memory_mapped_tensors(tmp_path):
    path = str(tmp_path / "state.pt")
    state = {"a": torch.arange(10.0), "b": [torch.ones(3)]}
    state["view"] = state["a"][2:5]
    torch.save(state, path)
    mapped = torch.load(path, weights_only=True, mmap=True)
    own = with_own_memory(mapped)
    os.truncate(path, 0)  # a tensor still mapped would now fault
    assert torch.equal(own["a"], torch.arange(10.0)) and torch.equal(own["b"][0], torch.ones(3))
    assert torch.equal(own["view"], torch.arange(10.0)[2:5])
    assert own["view"].untyped_storage().data_ptr() == own["a"].untyped_storage().data_ptr()


@pytest.mark.cuda
def test_staging_from_the_gpu_uses_pinned_buffers_and_decodes_equal():
    state = {"w": torch.randn(64, 64, device="cuda"), "step": torch.tensor(3.0, device="cuda")}
    area = StagingArea()
    staged = area.copy(state)
    assert all(b.is_pinned() for b in area.buffers())
    assert all(t.device.type == "cpu" for t in staged.values())
    for key in state:
        assert torch.equal(staged[key], state[key].cpu())
    pointers = [b.data_ptr() for b in area.buffers()]
    area.copy(state)
    assert [b.data_ptr() for b in area.buffers()] == pointers


# --- SIGKILL at random instants, with saves in the background: the storm of
# tests/test_reliability.py::test_kill_storm_while_training_with_a_save_every_batch[async]


STAGES = ["written", "fsynced", "rotated", "replaced", "directory_fsynced", "file_saved", "manifest"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_crash_of_the_background_thread_at_each_step(tmp_path, stage):
    """The process dies (os._exit from the background thread) at each step of a background save."""
    writer, tm, controller, tracker, digest = writer_with_structure(tmp_path)
    database = make_database()
    for step in (1, 2, 3):
        payload = payload_at(tm, controller, tracker, database, TrainingPosition(step=step), digest)
        save_payloads(writer, {LAST_NAME: payload, BEST_NAME: payload})

    def body(report):
        def crash(at_stage, path):
            if at_stage == stage and threading.current_thread() is not threading.main_thread():
                os._exit(99)

        observing = storage.observe_write_steps(crash)  # kept referenced: the hook stays on until the child ends
        observing.__enter__()
        tracker.record_best_model(tm.model)
        saver = WriterInBackground(RunWriter(str(tmp_path)))
        payload = payload_at(tm, controller, tracker, database, TrainingPosition(step=6), digest)
        saver.save({LAST_NAME: payload, BEST_NAME: payload,
                    BEST_MODEL_NAME: model_payload(payload["model"], 0, 6, digest, "cpu")})
        saver.wait()
        report(6)

    pid, read_reports = fork_child(body)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 99, "the simulated crash did not happen"
    assert read_reports() == []
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database, restore_rng=False)
    assert check["controller"].position.step in (3, 6)


def test_a_small_checkpoint_is_written_synchronously_with_async_save(tmp_path, monkeypatch):
    """The rule async_save follows: below ASYNC_MIN_BYTES of tensors, handing a save to the background thread costs
    training more than writing it, so it is written at once (and the files are those of a synchronous run)."""
    from experiment_io.training import checkpointing
    monkeypatch.setattr(checkpointing, "ASYNC_MIN_BYTES", 8 * 1024 * 1024)
    submitted = []
    real_submit = checkpointing.BackgroundWriter.submit
    monkeypatch.setattr(checkpointing.BackgroundWriter, "submit",
                        lambda self, *a, **k: submitted.append(a) or real_submit(self, *a, **k))
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=16,
                                                                                  max_epochs=2))
    train_model(tm, make_database(), controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                async_save=True, checkpoint_every_batches=3)
    assert submitted == []
    assert run_manifest.read_manifest(str(tmp_path))[1]["last_checkpoint.pt"]["epochs_done"] == 2
    monkeypatch.setattr(checkpointing, "ASYNC_MIN_BYTES", 0)  # and a larger one goes to the background
    train_model(tm, make_database(), controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                async_save=True, max_epochs=3)
    assert len(submitted) == 1
