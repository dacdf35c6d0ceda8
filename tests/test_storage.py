"""Storage: atomic writes, digests, verification, stale temporaries, the manifest file."""
import errno
import os
import subprocess
import sys

import pytest

from experiment_io.storage import verification
from experiment_io.storage.generations import previous_name
from helpers import find_generations
from experiment_io.format import codec as fmt
from experiment_io import RunLock
from experiment_io.storage import atomic as storage
from experiment_io.platform.maps import _LibcMap
from experiment_io.storage.manifest import MANIFEST_NAME, read_manifest, write_manifest
from experiment_io.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ExperimentIOError,
    RunLockedError,
)

from helpers import flip_bit

OLD = b"old content that must survive"
NEW = b"new content " * 1000


def temporaries(directory):
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_atomic_write_creates_file_and_record(tmp_path):
    path = tmp_path / "data.bin"
    record = storage.atomic_write(path, lambda f: f.write(NEW))
    assert path.read_bytes() == NEW
    assert isinstance(record, verification.FileRecord)
    assert record == verification.file_digest(path)
    assert record.size == len(NEW)
    assert record.digest.startswith(verification.DIGEST_NAME + ":")
    assert record.as_dict() == {"size": len(NEW), "digest": record.digest}
    assert temporaries(tmp_path) == []


def test_atomic_write_several_writes_are_hashed_in_order(tmp_path):
    path = tmp_path / "data.bin"

    def write(f):
        f.write(b"abc")
        f.write(memoryview(b"defgh"))
        f.write(bytearray(b"ij"))

    record = storage.atomic_write(path, write)
    assert path.read_bytes() == b"abcdefghij"
    assert record == verification.file_digest(path)
    assert storage.atomic_write(tmp_path / "other.bin", lambda f: f.write(b"abcdefghij")).digest == record.digest


def test_digest_differs_for_different_content(tmp_path):
    a = storage.atomic_write_bytes(tmp_path / "a", b"x" * 100)
    b = storage.atomic_write_bytes(tmp_path / "b", b"x" * 99 + b"y")
    assert a.size == b.size and a.digest != b.digest


def test_atomic_write_replaces_existing_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(OLD)
    storage.atomic_write_bytes(path, NEW)
    assert path.read_bytes() == NEW
    assert temporaries(tmp_path) == []


def test_atomic_write_unhashed_gives_seekable_file(tmp_path):
    path = tmp_path / "data.bin"

    def write(f):
        f.write(b"0123456789")
        f.seek(2)
        f.write(b"ab")
        f.seek(0, os.SEEK_END)
        f.write(b"!")

    assert storage.atomic_write(path, write, hashed=False) is None
    assert path.read_bytes() == b"01ab456789!"
    assert temporaries(tmp_path) == []


def test_write_function_that_raises_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(OLD)

    def write(f):
        f.write(b"half of the new")
        raise RuntimeError("boom in the middle")

    with pytest.raises(RuntimeError, match="boom in the middle"):
        storage.atomic_write(path, write)
    assert path.read_bytes() == OLD
    assert temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["data.bin"]


def test_keyboard_interrupt_inside_write_is_not_swallowed(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(OLD)

    def write(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write(path, write)
    assert path.read_bytes() == OLD
    assert temporaries(tmp_path) == []


def test_disk_full_becomes_checkpoint_write_error(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(OLD)

    def write(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointWriteError) as info:
        storage.atomic_write(path, write)
    error = info.value
    assert isinstance(error, OSError) and isinstance(error, ExperimentIOError)
    assert str(path) in str(error)
    assert os.strerror(errno.ENOSPC) in str(error)
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC
    assert path.read_bytes() == OLD
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("stage", ["written", "fsynced"])
def test_failure_after_writing_keeps_old_file(tmp_path, monkeypatch, stage, write_steps):
    path = tmp_path / "data.bin"
    path.write_bytes(OLD)
    seen = []

    def failing_stage(name, where):
        seen.append(name)
        if name == stage:
            assert os.path.exists(where)  # the temporary exists at this point
            raise OSError(errno.EIO, "Input/output error")

    write_steps(failing_stage)
    with pytest.raises(CheckpointWriteError):
        storage.atomic_write_bytes(path, NEW)
    assert seen[-1] == stage
    assert path.read_bytes() == OLD
    assert temporaries(tmp_path) == []


def test_write_protocol_order(tmp_path, monkeypatch, write_steps):
    path = tmp_path / "data.bin"
    seen = []
    write_steps(lambda name, where: seen.append((name, os.path.exists(path))))
    storage.atomic_write_bytes(path, NEW)
    assert seen == [("written", False), ("fsynced", False), ("replaced", True), ("directory_fsynced", True)]


def test_missing_directory_is_a_write_error(tmp_path):
    with pytest.raises(CheckpointWriteError) as info:
        storage.atomic_write_bytes(tmp_path / "no" / "such" / "dir.bin", b"x")
    assert str(tmp_path / "no" / "such" / "dir.bin") in str(info.value)


# --- verification -----------------------------------------------------------------


def verify_file(path, record):
    """What a loader does with one file: the record if it matches, else the library's error naming both digests."""
    verifier = verification.Verifier(os.path.dirname(str(path)), {})
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} is listed in the manifest but missing.")
    if not verifier.matches(path, record):
        raise CorruptCheckpointError(verifier.describe(str(path), record))
    return verifier.digest(path)


def test_verify_file_accepts_intact_file(tmp_path):
    path = tmp_path / "data.bin"
    record = storage.atomic_write_bytes(path, NEW)
    assert verify_file(path, record.as_dict()) == record


def test_verify_file_detects_bit_flip(tmp_path):
    path = tmp_path / "data.bin"
    record = storage.atomic_write_bytes(path, NEW)
    flip_bit(path)
    actual = verification.file_digest(path)
    assert actual.size == record.size and actual.digest != record.digest
    with pytest.raises(CorruptCheckpointError) as info:
        verify_file(path, record.as_dict())
    message = str(info.value)
    assert str(path) in message
    assert record.digest in message and actual.digest in message
    assert isinstance(info.value, ValueError)


def test_verify_file_detects_truncation(tmp_path):
    path = tmp_path / "data.bin"
    record = storage.atomic_write_bytes(path, NEW)
    with open(path, "r+b") as f:
        f.truncate(record.size - 1)
    actual = verification.file_digest(path)
    with pytest.raises(CorruptCheckpointError) as info:
        verify_file(path, record.as_dict())
    message = str(info.value)
    assert str(path) in message
    assert record.digest in message and actual.digest in message
    assert str(record.size) in message and str(record.size - 1) in message


def test_verify_file_detects_same_size_different_digest_record(tmp_path):
    path = tmp_path / "data.bin"
    record = storage.atomic_write_bytes(path, NEW).as_dict()
    record["digest"] = verification.DIGEST_NAME + ":" + "0" * 32
    with pytest.raises(CorruptCheckpointError):
        verify_file(path, record)


def test_verify_missing_file(tmp_path):
    path = tmp_path / "gone.bin"
    with pytest.raises(CheckpointNotFoundError) as info:
        verify_file(path, {"size": 1, "digest": "xxh3_128:00"})
    assert isinstance(info.value, FileNotFoundError)
    assert str(path) in str(info.value)


# --- stale temporaries ------------------------------------------------------------


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait() == 0  # reaped: there is no such process any more
    return proc.pid


def test_remove_stale_temporaries(tmp_path):
    live = os.getppid()
    dead = dead_pid()
    stale = f".last_checkpoint.pt.{dead}.0a1b2c3d.tmp"
    alive = f".last_checkpoint.pt.{live}.deadbeef.tmp"
    unrelated = ["last_checkpoint.pt", ".hidden", f"x.{dead}.00.tmp", f".a.{dead}.XYZ.tmp", "notes.tmp"]
    for name in [stale, alive, *unrelated]:
        (tmp_path / name).write_bytes(b"x")
    removed = storage.remove_stale_temporaries(tmp_path)
    assert removed == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted([alive, *unrelated])


@pytest.mark.slow
def test_remove_stale_temporaries_keeps_a_running_writer(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = f".best_model.pt.{proc.pid}.0123abcd.tmp"
        (tmp_path / name).write_bytes(b"x")
        assert storage.remove_stale_temporaries(tmp_path) == []
        assert os.listdir(tmp_path) == [name]
    finally:
        proc.kill()
        proc.wait()
    assert storage.remove_stale_temporaries(tmp_path) == [name]
    assert os.listdir(tmp_path) == []


def test_temporary_names_match_the_stale_pattern(tmp_path, monkeypatch, write_steps):
    """The names atomic_write gives its temporaries are those remove_stale_temporaries recognises."""
    names = []

    def record_stage(name, where):
        if name == "written":
            names.append(os.path.basename(where))

    write_steps(record_stage)
    storage.atomic_write_bytes(tmp_path / "last_checkpoint.pt", b"x")
    (name,) = names
    assert name.startswith(".last_checkpoint.pt.") and name.endswith(".tmp")
    assert f".{os.getpid()}." in name
    # A temporary of this name left by a process that died is removed.
    leftover = name.replace(f".{os.getpid()}.", f".{dead_pid()}.")
    (tmp_path / leftover).write_bytes(b"x")
    assert storage.remove_stale_temporaries(tmp_path) == [leftover]


# --- manifest file ----------------------------------------------------------------


def test_read_manifest_without_manifest(tmp_path):
    assert read_manifest(tmp_path) is None


def test_write_and_read_manifest(tmp_path):
    record = storage.atomic_write_bytes(tmp_path / "a.pt", b"abc")
    files = {"a.pt": {**record.as_dict(), "epochs_done": 1}}
    manifest_record = write_manifest(tmp_path, files, note="n")
    path = tmp_path / MANIFEST_NAME
    assert manifest_record == verification.file_digest(path)
    header, read = read_manifest(tmp_path)
    assert read == files
    assert header["note"] == "n" and header["kind"] == "manifest"
    assert temporaries(tmp_path) == []


def test_read_damaged_manifest(tmp_path):
    (tmp_path / MANIFEST_NAME).write_bytes(b"\x00\x01 not a manifest")
    with pytest.raises(CorruptCheckpointError) as info:
        read_manifest(tmp_path)
    assert MANIFEST_NAME in str(info.value)


def test_read_manifest_newer_version(tmp_path):
    data = fmt.manifest_to_bytes({}).replace(
        f'"format_version": {fmt.FORMAT_VERSION}'.encode(), f'"format_version": {fmt.FORMAT_VERSION + 1}'.encode())
    (tmp_path / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(fmt.FormatVersionError):
        read_manifest(tmp_path)


# --- generations ------------------------------------------------------------------


def test_previous_name():
    assert previous_name("last_checkpoint.pt") == "last_checkpoint.prev.pt"
    assert previous_name("experiment_manifest.json") == "experiment_manifest.prev.json"


def test_keep_previous_rotates_the_old_file(tmp_path):
    path, previous = tmp_path / "a.pt", tmp_path / "a.prev.pt"
    storage.atomic_write_bytes(path, OLD)
    record = storage.atomic_write(path, lambda f: f.write(NEW), keep_previous=previous)
    assert path.read_bytes() == NEW and previous.read_bytes() == OLD
    assert record == verification.file_digest(path)
    assert temporaries(tmp_path) == []


def test_keep_previous_without_an_old_file(tmp_path):
    path, previous = tmp_path / "a.pt", tmp_path / "a.prev.pt"
    storage.atomic_write(path, lambda f: f.write(NEW), keep_previous=previous)
    assert path.read_bytes() == NEW and not previous.exists()


def test_failed_write_with_keep_previous_changes_nothing(tmp_path):
    path, previous = tmp_path / "a.pt", tmp_path / "a.prev.pt"
    path.write_bytes(NEW)
    previous.write_bytes(OLD)

    def write(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointWriteError):
        storage.atomic_write(path, write, keep_previous=previous)
    assert path.read_bytes() == NEW and previous.read_bytes() == OLD
    assert temporaries(tmp_path) == []


def test_find_generations(tmp_path):
    old = storage.atomic_write_bytes(tmp_path / "a.prev.pt", OLD).as_dict()
    new = storage.atomic_write_bytes(tmp_path / "a.pt", NEW).as_dict()
    files = {"a.pt": {**new, "step": 10}, "a.prev.pt": {**old, "step": 5}}
    found, problems = find_generations(str(tmp_path), "a.pt", files)
    assert found == [(str(tmp_path / "a.pt"), files["a.pt"]), (str(tmp_path / "a.prev.pt"), files["a.prev.pt"])]
    assert problems == []

    flip_bit(tmp_path / "a.pt")
    found, problems = find_generations(str(tmp_path), "a.pt", files)
    assert found == [(str(tmp_path / "a.prev.pt"), files["a.prev.pt"])]
    (problem,) = problems
    assert str(tmp_path / "a.pt") in problem and new["digest"] in problem

    os.remove(tmp_path / "a.prev.pt")
    found, problems = find_generations(str(tmp_path), "a.pt", files)
    assert found == [] and len(problems) == 2 and any("missing" in p for p in problems)


def test_find_generations_matches_by_digest_whatever_the_name(tmp_path):
    """A crash between the rotation and the manifest's commit leaves the committed
    content under the previous name: it still verifies."""
    committed = storage.atomic_write_bytes(tmp_path / "a.prev.pt", OLD).as_dict()
    (tmp_path / "a.pt").write_bytes(b"uncommitted new content")
    found, problems = find_generations(str(tmp_path), "a.pt", {"a.pt": committed})
    assert found == [(str(tmp_path / "a.prev.pt"), committed)]
    assert len(problems) == 1 and problems[0].startswith(str(tmp_path / "a.pt") + ":")


# --- run lock ---------------------------------------------------------------------


def test_run_lock_admits_one_writer(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path).acquire()
        assert str(os.getpid()) in str(info.value) and str(tmp_path) in str(info.value)
        assert isinstance(info.value, BlockingIOError)
    with RunLock(tmp_path):  # released on exit
        pass


@pytest.mark.slow
def test_run_lock_of_another_process(tmp_path):
    code = ("import sys, time; from experiment_io.storage.lock import RunLock; "
            "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path).acquire()
        assert f"pid {proc.pid}" in str(info.value)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with RunLock(tmp_path):  # a dead holder's lock is taken over
        pass


@pytest.mark.usefixtures("fast_paths_on")
@pytest.mark.parametrize("cached", [True, False])
def test_a_mapped_digest_equals_a_read_one_cached_or_not(tmp_path, monkeypatch, cached):
    """A large file is digested through a map made without the GIL, part by part: each part faulted in at once
    when the file is in the page cache, read ahead sequentially when it is not; either gives the digest of reading
    the file in blocks."""
    from experiment_io.storage import verification

    path = tmp_path / "big.bin"
    data = os.urandom(3 * 1024 * 1024 + 12345)  # not a whole number of pages
    path.write_bytes(data)
    if not _LibcMap.available():
        pytest.skip("no direct mmap(2) on this system")
    chosen = []
    original = _LibcMap._mostly_cached

    def decide(self, address, size, **kwargs):
        chosen.append(original(self, address, size, **kwargs))
        return cached
    monkeypatch.setattr(_LibcMap, "_mostly_cached", decide)
    mapped = verification.file_digest(path, part=1024 * 1024 + 100)  # 4 parts, the last one short
    assert chosen and isinstance(chosen[0], bool)
    assert verification.file_digest(path, map_at_least=1 << 40) == mapped  # read in blocks instead
    assert mapped.size == len(data)
