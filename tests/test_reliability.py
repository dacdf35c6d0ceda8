"""Crash safety: kills at random instants, crashes at every step of the write protocol,
damaged files, full disks and two writers on one directory.

Crashes are real: a forked child process saves or trains and is ended by SIGKILL (or
ends itself with ``os._exit`` at a chosen step of the write protocol, which, like a
kill, runs no cleanup). After every crash the directory must load, verify, and hold
at least every save that the child reported as committed.
"""
import errno
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from experiment_io.storage.generations import previous_name
from experiment_io.storage.lock import RunLock
import experiment_io.storage.atomic as storage
from experiment_io.storage import manifest as run_manifest
from experiment_io.platform import archive
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, save_payloads
from experiment_io.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ExperimentIOError,
    RunLockedError,
)
from experiment_io.loading.loaders import load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io import setup_training, train_model, SetupParams

from helpers import (
    build_run,
    flip_bit,
    fork_child,
    kill_storm,
    make_database,
    make_training_modules,
    record_torch_loads,
    saver,
    sigkill_after,
    snapshot_directory,
)

torch.set_num_threads(1)


def check_loads(directory, database, committed):
    """The directory loads and verifies; the loaded step is at least ``committed``."""
    check = load_checkpoint_from_cwd(directory=directory, database=database, restore_rng=False)
    step = check["controller"].position.step
    assert step >= committed, f"loaded step {step} < committed step {committed}"
    try:
        assert isinstance(load_model_from_cwd(directory=directory), torch.nn.Module)
    except CheckpointNotFoundError as e:  # only before the first best model was ever committed
        assert "no best model yet" in str(e) and check["metric_tracker"].best_model_state is None
    return step


@pytest.mark.slow
def test_kill_storm_while_saving(tmp_path):
    """70 SIGKILLs at random instants of a process that saves without pause."""
    save, database = build_run(tmp_path)
    save(0)
    rng = random.Random(1)
    committed, step = 0, 1
    for _ in range(70):
        start = step

        def body(report, start=start):
            save = saver(str(tmp_path))
            s = start
            while True:
                save(s)
                report(s)
                s += 1

        reports = sigkill_after(body, rng.uniform(0.0, 0.08))
        if reports:
            committed = reports[-1]
        loaded = check_loads(str(tmp_path), database, committed)
        step = loaded + 1
    assert committed > 0, "the writer never committed a save; the storm tested nothing"


@pytest.mark.slow
@pytest.mark.parametrize("async_save,kills", [(False, 35), (True, 25)], ids=["sync", "async"])
def test_kill_storm_while_training_with_a_save_every_batch(tmp_path, async_save, kills):
    """SIGKILLs of a training process that checkpoints after every batch (in the background with async_save),
    restarted by the start-or-resume one-liner: kills in the first save of a run included.
    ``python tests/scripts/kill_storm.py --kills 1000`` runs the long storm."""
    committed = kill_storm(tmp_path, kills, async_save=async_save, seed=2 if not async_save else 5)
    assert committed > kills // 2, "training made too little progress for the storm to test anything"


# Each step of the write protocol at which a crash is simulated, and which of the
# three files of a "better" save (last, best, best model) it hits.
STAGES = ["written", "fsynced", "rotated", "replaced", "directory_fsynced", "file_saved"]


@pytest.mark.slow
@pytest.mark.parametrize("nth_file", [1, 2, 3])
@pytest.mark.parametrize("stage", STAGES)
def test_crash_at_each_step_of_the_write_protocol(tmp_path, stage, nth_file):
    save, database = build_run(tmp_path)
    for step in range(1, 4):  # step 3 is a "better" save of three files
        save(step)
    committed = 3

    def body(report):
        calls = {"n": 0}

        def crash(at_stage, path):
            if at_stage == stage:
                calls["n"] += 1
                if calls["n"] == nth_file:
                    os._exit(99)

        observing = storage.observe_write_steps(crash)  # kept referenced: the hook stays on until the child ends
        observing.__enter__()
        saver(str(tmp_path))(6)  # a better save: three files
        report(6)

    pid, read_reports = fork_child(body)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 99, "the simulated crash did not happen"
    assert read_reports() == []
    # nothing of the crashed save was committed: every loader gives the committed step,
    # and strict mode too finds the committed generation intact, whichever file holds it
    assert check_loads(str(tmp_path), database, committed) == 3
    strict = load_checkpoint_from_cwd(directory=str(tmp_path), database=database, restore_rng=False, strict=True)
    assert strict["controller"].position.step == 3
    assert isinstance(load_model_from_cwd(directory=str(tmp_path), strict=True), torch.nn.Module)


@pytest.mark.slow
def test_crash_before_the_manifest_keeps_the_previous_generation(tmp_path):
    save, database = build_run(tmp_path)
    for step in (1, 2, 3):
        save(step)

    def body(report):
        def crash(at_stage, path):
            if at_stage == "manifest":
                os._exit(99)

        observing = storage.observe_write_steps(crash)  # kept referenced: the hook stays on until the child ends
        observing.__enter__()
        saver(str(tmp_path))(6)

    pid, _ = fork_child(body)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 99
    # every new file is in place but uncommitted: the loader takes the committed generation
    assert check_loads(str(tmp_path), database, 3) == 3


@pytest.mark.slow
def test_leftover_temporaries_are_ignored_and_cleaned(tmp_path):
    save, database = build_run(tmp_path)
    save(3)

    def body(report):
        def crash(at_stage, path):
            if at_stage == "fsynced":
                os._exit(99)

        observing = storage.observe_write_steps(crash)  # kept referenced: the hook stays on until the child ends
        observing.__enter__()
        saver(str(tmp_path))(4)

    pid, _ = fork_child(body)
    os.waitpid(pid, 0)
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert leftovers, "the crash should have left a temporary file"
    assert check_loads(str(tmp_path), database, 3) == 3
    RunWriter(str(tmp_path))  # the next writer cleans up
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


DAMAGES = {
    "bit flip": lambda path: flip_bit(path),
    "bit flip near the end": lambda path: flip_bit(path, os.path.getsize(path) - 30),
    "empty": lambda path: open(path, "wb").close(),
    "truncated mid-file": lambda path: os.truncate(path, os.path.getsize(path) // 2),
    "one byte short": lambda path: os.truncate(path, os.path.getsize(path) - 1),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", [LAST_NAME, BEST_NAME, BEST_MODEL_NAME, STRUCTURE_NAME])
def test_damaged_file_is_detected_before_unpickling(run_copy, name, damage, monkeypatch):
    directory, database = run_copy
    DAMAGES[damage](directory / name)
    loads = record_torch_loads(monkeypatch)

    strict_loaders = {
        LAST_NAME: lambda: load_checkpoint_from_cwd(directory=str(directory), database=database, strict=True),
        STRUCTURE_NAME: lambda: load_checkpoint_from_cwd(directory=str(directory), database=database, strict=True),
        BEST_NAME: lambda: load_checkpoint_from_cwd(directory=str(directory), database=database, strict=True, which="best"),
        BEST_MODEL_NAME: lambda: load_model_from_cwd(directory=str(directory), strict=True),
    }
    with pytest.raises(CorruptCheckpointError, match=name):
        strict_loaders[name]()
    assert name not in [loaded for loaded, _ in loads], "a damaged file was unpickled"

    if name == STRUCTURE_NAME:
        # the structure file has no other generation: no fallback can help
        with pytest.raises(CorruptCheckpointError, match=STRUCTURE_NAME):
            load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
        return
    # Without strict, the loaders fall back to the newest generation that verifies.
    check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert check["controller"].position.step == (6 if name == LAST_NAME else 7)
    best = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False, which="best")
    assert best["controller"].position.step == (3 if name == BEST_NAME else 6)
    model = load_model_from_cwd(directory=str(directory))
    reference = best["metric_tracker"].best_model_state if name != BEST_NAME else check["metric_tracker"].best_model_state
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), "the fallback did not give the newest best model"
    assert name not in loads


def test_fallback_reaches_best_when_both_generations_of_last_are_bad(run_copy, caplog):
    directory, database = run_copy
    flip_bit(directory / LAST_NAME)
    flip_bit(directory / previous_name(LAST_NAME))
    with caplog.at_level("WARNING"):
        check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert check["controller"].position.step == 6  # the newest best save
    assert LAST_NAME in caplog.text and BEST_NAME in caplog.text


def test_failed_load_modifies_no_file(run_copy):
    directory, database = run_copy
    flip_bit(directory / LAST_NAME)
    before = snapshot_directory(directory)
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint_from_cwd(directory=str(directory), database=database, strict=True)
    load_checkpoint_from_cwd(directory=str(directory), database=database)
    assert snapshot_directory(directory) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_disk_full_or_io_error_during_a_save(run_copy, code, monkeypatch):
    directory, database = run_copy
    before = snapshot_directory(directory)
    real_save = archive.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial data")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(archive, "save", failing_save)
    writer = RunWriter(str(directory))
    with pytest.raises(CheckpointWriteError) as excinfo:
        save_payloads(writer, {LAST_NAME: {"experiment_io": {"kind": "checkpoint"}}})
    assert isinstance(excinfo.value, OSError)
    assert os.strerror(code) in str(excinfo.value)
    monkeypatch.setattr(archive, "save", real_save)
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]
    assert snapshot_directory(directory) == before
    assert check_loads(str(directory), database, 7) == 7


@pytest.mark.slow
def test_second_writer_gets_a_clear_error(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    try:
        database = make_database()
        tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32, max_epochs=1))
        code = (
            "import sys; sys.path.insert(0, %r)\n"
            "from helpers import train_tiny_run\n"
            "from experiment_io.errors import RunLockedError\n"
            "try:\n    train_tiny_run(%r)\nexcept RunLockedError as e:\n    print('LOCKED', e); sys.exit(0)\n"
            "sys.exit(1)\n"
        ) % (os.path.dirname(__file__), str(tmp_path))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout
        with pytest.raises(RunLockedError):
            train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path))
    finally:
        lock.release()
    assert not (tmp_path / LAST_NAME).exists()


@pytest.mark.slow
def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = (
        "import sys, time; from experiment_io.storage.lock import RunLock\n"
        "RunLock(%r).acquire(); print('HELD', flush=True); time.sleep(60)\n"
    ) % str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "HELD"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        RunLock(str(tmp_path)).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    lock = RunLock(str(tmp_path)).acquire()  # the dead holder's lock is taken over
    lock.release()
    from helpers import train_tiny_run
    train_tiny_run(tmp_path)
    assert (tmp_path / LAST_NAME).exists()


def test_every_error_is_a_library_error(run_copy):
    directory, database = run_copy
    os.remove(directory / run_manifest.MANIFEST_NAME)
    with pytest.raises(ExperimentIOError, match="no experiment_manifest.json"):
        load_checkpoint_from_cwd(directory=str(directory), database=database)


def test_run_killed_before_its_first_commit_starts_fresh(tmp_path):
    """Only the structure file was renamed into place; no manifest was ever written."""
    _, database = build_run(str(tmp_path))
    os.remove(tmp_path / run_manifest.MANIFEST_NAME)
    with pytest.raises(CheckpointNotFoundError, match="before its first save"):
        load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    assert load_checkpoint_from_cwd(directory=str(tmp_path), database=database, missing_ok=True) is None


class KilledBeforeCommit(BaseException):
    """Ends a save after a state file was renamed into place, before the manifest recorded it."""


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("step", ["replaced", "file_saved"])
def test_a_run_killed_during_its_first_save_starts_again(tmp_path, async_save, step, capsys):
    """The first last_checkpoint.pt is in place, the manifest records only the structure file (train_model's
    saves are made durable behind the loop: the fsyncs come after the commit, so these are the steps before it)."""
    database = make_database()

    def kill_first_checkpoint(at, path):
        if at == step and os.path.basename(path) == LAST_NAME:
            raise KilledBeforeCommit(at)

    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32,
                                                                                  max_epochs=2))
    with storage.observe_write_steps(kill_first_checkpoint), pytest.raises(KilledBeforeCommit):
        train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                    async_save=async_save)
    assert (tmp_path / LAST_NAME).exists() and LAST_NAME not in run_manifest.read_manifest(str(tmp_path))[1]
    assert load_checkpoint_from_cwd(directory=str(tmp_path), database=database, missing_ok=True) is None
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint has been written"):
        load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    from experiment_io.frontends.cli import main
    assert main(["verify", str(tmp_path)]) == 0
    assert f"ignored  {LAST_NAME}" in capsys.readouterr().out
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32,
                                                                                  max_epochs=2))
    leftover = (tmp_path / LAST_NAME).read_bytes()
    train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path))  # starts afresh
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    assert check["controller"].current_epoch == 2
    aside = [n for n in os.listdir(tmp_path) if n.startswith(LAST_NAME + ".orphan-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == leftover  # nothing is lost


KILLED_IN_FIRST_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from helpers import make_database, make_training_modules
from experiment_io import SetupParams, setup_training, train_model
from experiment_io.storage import atomic as storage

def kill(at, path):
    if at == "file_saved" and os.path.basename(path) == "last_checkpoint.pt":
        os.kill(os.getpid(), signal.SIGKILL)  # after the rename into place, before the manifest's commit

tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32,
                                                                              max_epochs=2))
with storage.observe_write_steps(kill):
    train_model(tm, make_database(), controller, tracker, None, None, quiet=True, directory={run!r})
"""


def test_files_of_saves_killed_before_their_commit_are_kept_bounded(tmp_path):
    """Every SIGKILL between a first save's renames and its commit leaves files no manifest records; the next
    start sets them aside, and only the newest few per name are kept, each removal said."""
    import subprocess
    import sys
    from experiment_io.storage.writer import ORPHANS_KEPT

    code = KILLED_IN_FIRST_SAVE.format(tests=os.path.dirname(os.path.abspath(__file__)), run=str(tmp_path))
    outputs = []
    for _ in range(ORPHANS_KEPT + 2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr[-2000:]
        outputs.append(proc.stderr)
    aside = sorted(n for n in os.listdir(tmp_path) if ".orphan-" in n)
    by_name = {}
    for name in aside:
        by_name.setdefault(name.split(".orphan-")[0], []).append(name)
    assert by_name and all(len(names) <= ORPHANS_KEPT for names in by_name.values())
    assert any(len(names) == ORPHANS_KEPT for names in by_name.values())
    assert any("removed" in out and "set aside earlier" in out for out in outputs)
