"""Small builders shared by the unit tests: a tiny model, tiny data, a tiny run.

Everything here is module level so that the trust gate admits it: the module is
already imported when a structure file that names :class:`TinyNet` is loaded.
"""
import os
import random
import signal
import time

import numpy as np
import torch

from experiment_io import (
    Controller,
    PatienceController,
    Database,
    Evaluator,
    SetupParams,
    TrainingModules,
    setup_training,
    train_model,
)
from experiment_io.storage import atomic as storage
from experiment_io.storage import verification
from experiment_io.storage.generations import Search
from experiment_io.experiment.controllers import TrainingPosition
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, checkpoint_payload, model_payload, save_payloads, structure_payload
from experiment_io.storage.manifest import MANIFEST_NAME, read_manifest, write_manifest

N_FEATURES = 3


class TinyNet(torch.nn.Module):
    """A two-layer perceptron small enough to train in milliseconds."""

    def __init__(self, n_in=N_FEATURES, n_hidden=8):
        super().__init__()
        self.layer1 = torch.nn.Linear(n_in, n_hidden)
        self.layer2 = torch.nn.Linear(n_hidden, 1)

    def forward(self, x):
        return self.layer2(torch.tanh(self.layer1(x)))


class RenamedLater(torch.nn.Module):
    """A module class that tests rename (delete from this module) after saving."""

    def forward(self, x):
        return x


class ScaledMSE(torch.nn.Module):
    """A mean squared error with a buffer, so that its device can be seen."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, prediction, target):
        return self.scale * torch.mean((prediction - target) ** 2)


def make_arrays(n=200, seed=0):
    """``{"x": (n, 3), "y": (n, 1), "idx": (n,)}`` of float32/int64 numpy arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
    y = (np.sin(x).sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((n, 1))).astype(np.float32)
    return {"x": x, "y": y, "idx": np.arange(n, dtype=np.int64)}


def make_database(n=200, seed=0, valid_size=0.1, test_size=0.1, data_seed=0):
    """An in-memory :class:`Database` over :func:`make_arrays`."""
    return Database(make_arrays(n, data_seed), ["x"], ["y"], seed, valid_size=valid_size, test_size=test_size)


def make_training_modules(seed=0, *, buffered=False):
    """``TrainingModules(TinyNet, MSELoss, Evaluator{mse, mae})`` with seeded weights.

    :param buffered: use :class:`ScaledMSE` (a loss with a buffer) as the training
        loss and as the ``mse`` evaluation loss.
    """
    torch.manual_seed(seed)
    model = TinyNet()
    mse = ScaledMSE if buffered else torch.nn.MSELoss
    evaluator = Evaluator(model, {"mse": mse(), "mae": torch.nn.L1Loss()}, batch_size=64)
    return TrainingModules(model, mse(), evaluator)


def train_tiny_run(directory, *, database=None, max_epochs=2, device="cpu", batch_size=32, seed=0, buffered=False,
                   **setup_kwargs):
    """Set up and train a tiny run in ``directory``.

    :return: ``(training_modules, controller, metric_tracker, database)``.
    """
    database = database if database is not None else make_database()
    tm = make_training_modules(seed, buffered=buffered)
    options = {k: setup_kwargs.pop(k) for k in ("store_every", "store_all_better", "overwrite") if k in setup_kwargs}
    params = SetupParams(stopping_key="mse", batch_size=batch_size, max_epochs=max_epochs, device=device, **setup_kwargs)
    tm, controller, tracker = setup_training(tm, params)
    train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(directory), **options)
    return tm, controller, tracker, database


def rewrite_manifest(directory, edit):
    """Forge the manifest of ``directory``: ``edit(files)`` changes its records, which are written back
    with a fresh header and the digest of the new content (as a writer would)."""
    files = read_manifest(str(directory))[1]
    edit(files)
    write_manifest(str(directory), files)


def find_generations(directory, name, files):
    """Every intact generation of ``name`` and the problems found: ``([(path, record)], [text])``, best first."""
    return Search(verification.Verifier(str(directory), files), [name]).all()


def payload_at(training_modules, controller, tracker, database, position, structure_digest):
    """The checkpoint payload of a run with the controller at ``position``."""
    controller.position = position
    return checkpoint_payload(training_modules, controller, tracker, database, structure_digest)


def _run_objects():
    database = make_database()
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32, max_epochs=2))
    return database, tm, controller, tracker


def build_run(directory):
    """Write the structure file of a run into ``directory``; return ``(save, database)``."""
    database, tm, controller, _ = _run_objects()
    save_payloads(RunWriter(directory), {STRUCTURE_NAME: structure_payload(tm, controller, None)})
    return saver(directory), database


def saver(directory, *, durable=True):
    """A save function as a new process would have it: its own writer, reading the manifest afresh
    (``durable=False``: each save made durable behind the caller, as ``train_model`` saves; ``save.writer`` is
    the writer).

    ``save(step)`` writes ``last_checkpoint.pt`` and, every third step, also the best
    checkpoint and best model (three files in one save).
    """
    database, tm, controller, tracker = _run_objects()
    writer = RunWriter(directory)
    digest = writer.record(STRUCTURE_NAME)["digest"]

    def save(step):
        with torch.no_grad():
            for p in tm.model.parameters():
                p.add_(0.001)
        position = TrainingPosition(epoch=step // 7, samples_done=step % 7, step=step)
        if step % 3 == 0:
            tracker.record_best_model(tm.model)
        payload = payload_at(tm, controller, tracker, database, position, digest)
        files = {LAST_NAME: payload}
        if step % 3 == 0:
            files.update({BEST_NAME: payload, BEST_MODEL_NAME: model_payload(payload["model"], position.epoch, step, digest, "cpu")})
        save_payloads(writer, files, durable=durable)

    save.writer = writer
    return save


def kill_storm(directory, kills, *, async_save=False, seed=0, max_delay=0.3, on_kill=None):
    """SIGKILL a training process ``kills`` times at random instants; after each kill, check the directory.

    Every attempt runs the start-or-resume one-liner (``load_checkpoint_from_cwd(missing_ok=True)`` or a
    fresh set-up) with a checkpoint after every batch, so kills land in the first save of a run as well
    as in later ones. After each kill the run must start again or load a checkpoint at least as new as
    the last save the child reported committed.

    :return: the newest committed step.
    """
    import torch._dynamo  # noqa: F401  (an optimizer's first step imports it, ~1 s: done once here, not per child)
    from experiment_io import load_checkpoint_from_cwd, load_model_from_cwd

    database = make_database(n=400)
    rng = random.Random(seed)
    committed = 0
    for attempt in range(kills):
        def body(report):
            def report_commits(step, path):
                # the save is committed once the manifest is renamed into place (a kill keeps what the process
                # wrote; train_model makes it durable behind the loop)
                if step in ("replaced", "directory_fsynced") and os.path.basename(path) == MANIFEST_NAME:
                    _, files = read_manifest(os.path.dirname(path))
                    if LAST_NAME in files:
                        report(files[LAST_NAME]["step"])

            observing = storage.observe_write_steps(report_commits)
            observing.__enter__()  # for the life of this child (held here: a dropped context would end it)
            check = load_checkpoint_from_cwd(directory=str(directory), database=database, missing_ok=True)
            if check is None:
                tm, controller, tracker = setup_training(make_training_modules(),
                                                         SetupParams(stopping_key="mse", batch_size=8, max_epochs=1000))
                check = {"training_modules": tm, "controller": controller, "metric_tracker": tracker,
                         "database": database}
            train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, directory=str(directory),
                        checkpoint_every_batches=1, async_save=async_save)

        reports = sigkill_after(body, rng.uniform(0.005, max_delay))
        if reports:
            committed = max(committed, reports[-1])
        check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False,
                                         missing_ok=True)
        if check is None:
            assert committed == 0, f"kill {attempt}: the run lost its committed step {committed}"
        else:
            step = check["controller"].position.step
            assert step >= committed, f"kill {attempt}: loaded step {step} < committed step {committed}"
            if check["metric_tracker"].best_model_state is not None:
                load_model_from_cwd(directory=str(directory))
        if on_kill is not None:
            on_kill(attempt, committed)
    return committed


def race(write, read):
    """Run ``write()`` in a thread and ``read()`` over and over until it ends.

    :return: ``(reads, errors of write)``.
    """
    import threading

    done, failures = threading.Event(), []

    def writing():
        try:
            write()
        except BaseException as e:  # the caller asserts there is none
            failures.append(e)
        finally:
            done.set()

    writer = threading.Thread(target=writing)
    writer.start()
    reads = 0
    while not done.is_set():
        read()
        reads += 1
    writer.join()
    return reads, failures


def assert_bitwise_equal(a, b):
    """``a`` and ``b`` are the same tree: same types, dict keys in the same order, and
    tensors of the same dtype, shape, strides and device holding the same bytes."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.device) == (b.dtype, b.shape, b.stride(), b.device)
        assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_bitwise_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise_equal(x, y)
    else:
        assert a == b, (a, b)


def record_torch_loads(monkeypatch):
    """Record every call of ``torch.load`` from now on (the calls still load).

    :return: the list it fills: ``(file name, weights_only argument or "MISSING")`` per call.
    """
    calls, real_load = [], torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((os.path.basename(os.path.realpath(str(f))), kwargs.get("weights_only", "MISSING")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    return calls


def snapshot_directory(directory):
    """``{relative path: digest}`` of every file below ``directory`` (to prove nothing changed)."""
    result = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            result[os.path.relpath(path, directory)] = verification.file_digest(path).digest
    return result


def make_controller(*, schedulers=(), lr=0.05, patience=None, seed=0, max_epochs=100):
    """A model with an Adam optimizer over it and a controller with ``schedulers`` (factories)."""
    torch.manual_seed(seed)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    built = [make(optimizer) for make in schedulers]
    if patience is None:
        controller = Controller(optimizer, built, 16, max_epochs, "mse")
    else:
        controller = PatienceController(optimizer, built, 16, max_epochs, "mse", termination_patience=patience)
    return model, controller


def flip_bit(path, offset=None):
    """Flip one bit of the file at ``path`` (in the middle by default)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        at = len(data) // 2 if offset is None else offset
        data[at] ^= 0x01
        f.seek(0)
        f.write(bytes(data))


def fork_child(body):
    """Run ``body(report)`` in a forked child; ``report(n)`` sends ``n`` to the parent.

    :return: ``(pid, read_reports)``; ``read_reports()`` returns every number sent.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            body(lambda n: os.write(write_fd, f"{n}\n".encode()))
        except BaseException:
            os._exit(70)
        os._exit(0)
    os.close(write_fd)

    def read_reports():
        chunks = []
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_fd)
        return [int(x) for x in b"".join(chunks).decode().split()]

    return pid, read_reports


def sigkill_after(body, seconds):
    """Run ``body(report)`` in a forked child (see :func:`fork_child`), SIGKILL it after ``seconds``.

    :return: every number the child reported before it died.
    """
    pid, read_reports = fork_child(body)
    time.sleep(seconds)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child ended by itself ({status})"
    return read_reports()


__all__ = [
    "TinyNet", "RenamedLater", "ScaledMSE", "make_arrays", "make_database", "make_training_modules", "train_tiny_run",
    "snapshot_directory", "make_controller", "flip_bit", "fork_child", "sigkill_after", "assert_bitwise_equal",
    "record_torch_loads", "rewrite_manifest", "kill_storm", "race", "payload_at", "find_generations", "build_run", "saver",
]


def load_crash_state(directory, state, database, what):
    """Rebuild the crash state ``state`` (``{name: bytes}``) in the new ``directory`` and load it; the step it
    loads. A state that loads no checkpoint fails the test: ``what`` says which state it was."""
    import pytest
    from experiment_io import load_checkpoint_from_cwd
    from experiment_io.errors import CheckpointNotFoundError

    directory.mkdir()
    for name, content in state.items():
        (directory / name).write_bytes(content)
    try:
        check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    except CheckpointNotFoundError as e:  # pragma: no cover - would be a lost run
        pytest.fail(f"{what} ({sorted(state)}) lost the run: {e}")
    return check["controller"].position.step
