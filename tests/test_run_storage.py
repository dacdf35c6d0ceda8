"""The run's save, resume, verification and fallback through the storage interface, against two implementations.

:class:`~experiment_io.storage.posix.PosixStorage` is the directory of today;
:class:`storages.ShelvedStorage` keeps the files under other names in another
folder and injects faults. The same tests pass against both: the writer, the
verifier, the search for a good generation and the loaders reach the files only
through the interface.
"""
import os

import pytest
import torch

from experiment_io import load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.errors import CheckpointWriteError, CorruptCheckpointError
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME
from experiment_io.storage import atomic
from experiment_io.storage.generations import previous_name
from experiment_io.storage.writer import RunWriter
from experiment_io.storage.interface import RunStorage, as_storage
from experiment_io.storage.manifest import MANIFEST_NAME, read_manifest
from experiment_io.storage.posix import PosixStorage

from helpers import build_run, flip_bit, fork_child, saver
from storages import FaultyStorage, ShelvedStorage


@pytest.fixture(params=["posix", "shelved"])
def run_storage(request, tmp_path):
    """A factory of storages of one kind, rooted in ``tmp_path``."""
    kinds = {"posix": PosixStorage, "shelved": ShelvedStorage}
    return lambda *args, **kwargs: kinds[request.param](tmp_path / "run", *args, **kwargs)


def loaded_step(storage, database, **kwargs):
    check = load_checkpoint_from_cwd(directory=storage, database=database, restore_rng=False, **kwargs)
    return check["controller"].position.step


def test_a_directory_is_a_posix_storage_and_a_storage_is_itself(tmp_path):
    assert as_storage(tmp_path) == PosixStorage(tmp_path)
    shelved = ShelvedStorage(tmp_path)
    assert as_storage(shelved) is shelved and isinstance(shelved, RunStorage)


def test_saves_commit_and_load_through_the_storage(run_storage):
    storage = run_storage()
    save, database = build_run(storage)
    for step in range(1, 8):
        save(step)
    assert loaded_step(storage, database) == 7
    model = load_model_from_cwd(directory=storage)
    assert isinstance(model, torch.nn.Module) and not model.training
    names = set(storage.names())
    assert {STRUCTURE_NAME, LAST_NAME, previous_name(LAST_NAME), BEST_NAME, BEST_MODEL_NAME, MANIFEST_NAME} <= names
    files = read_manifest(storage)[1]
    assert files[LAST_NAME]["step"] == 7 and files[previous_name(LAST_NAME)]["step"] == 6
    if isinstance(storage, ShelvedStorage):  # nothing of the run was written where the storage did not say
        assert sorted(os.listdir(storage.location)) == ["shelf"]


def test_a_damaged_newest_generation_falls_back_to_the_previous_one(run_storage, caplog):
    storage = run_storage()
    save, database = build_run(storage)
    for step in range(1, 5):
        save(step)
    flip_bit(storage.path(LAST_NAME))
    assert loaded_step(storage, database) == 3
    assert LAST_NAME in caplog.text
    with pytest.raises(CorruptCheckpointError, match="strict=True"):
        loaded_step(storage, database, strict=True)


def test_a_missing_generation_falls_back_and_a_new_save_commits_again(run_storage):
    storage = run_storage()
    save, database = build_run(storage)
    for step in range(1, 6):
        save(step)
    assert storage.remove(LAST_NAME)
    assert loaded_step(storage, database) == 4  # the previous generation of the last checkpoint
    saver(storage)(7)
    assert loaded_step(storage, database) == 7


@pytest.mark.parametrize("step_failing", ["write", "durable", "publish"])
def test_a_failed_save_loses_nothing_committed(run_storage, step_failing):
    storage = run_storage()
    save, database = build_run(storage)
    for step in range(1, 4):
        save(step)
    faulty = (ShelvedStorage if isinstance(storage, ShelvedStorage) else FaultyStorage)(
        storage.location, faults={(step_failing, BEST_MODEL_NAME)})  # the same files, a batch that fails
    with pytest.raises(CheckpointWriteError, match="No space left"):
        saver(faulty)(6)  # a better save: last, best and best model, the last of which fails
    assert loaded_step(storage, database) == 3
    assert loaded_step(storage, database, strict=True) == 3
    assert not [n for n in storage.names() if atomic.is_temporary(n)]
    saver(storage)(6)
    assert loaded_step(storage, database) == 6


@pytest.mark.parametrize("stage", ["written", "fsynced", "rotated", "replaced", "file_saved", "manifest"])
def test_a_crash_at_any_step_of_a_save_keeps_the_committed_generation(run_storage, stage):
    storage = run_storage()
    save, database = build_run(storage)
    for step in range(1, 4):
        save(step)

    def body(report):
        def crash(at, path):
            if at == stage:
                os._exit(99)

        observing = atomic.observe_write_steps(crash)  # kept referenced: the hook stays on until the child ends
        observing.__enter__()
        saver(storage)(6)

    pid, _ = fork_child(body)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 99
    assert loaded_step(storage, database) == 3
    assert loaded_step(storage, database, strict=True) == 3
    saver(storage)(7)  # the next writer cleans up and commits
    assert loaded_step(storage, database) == 7
    assert not [n for n in storage.names() if atomic.is_temporary(n)]


def test_retired_files_are_removed_through_the_storage(run_storage):
    storage = run_storage()
    build_run(storage)
    writer = RunWriter(storage)
    writer.save_files({"extra.bin": (lambda f: f.write(b"x" * 10), {})})
    assert "extra.bin" in set(storage.names())
    writer.save_files({"other.bin": (lambda f: f.write(b"y"), {})}, retire=["extra.bin"])
    assert "extra.bin" not in set(storage.names())
    assert "extra.bin" not in read_manifest(storage)[1]
