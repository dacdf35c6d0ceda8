"""The fast paths of saving and loading are still exact and still verified.

Saves: ``torch.save`` without CRC-32 (the files load bit for bit, with and without
mmap, and the previous setting is restored), small writes gathered into blocks and
the kernel asked to write back early (the bytes and the digest are those of the
data, whatever the pattern of writes). Loads: candidates verified lazily (the same
generation as verifying everything, reading only what is needed, each file once),
state files memory-mapped (nothing stays mapped after the load), files replaced
while they are read (the load starts over), and digests that catch a damaged byte
that ``torch.load`` alone would load silently.
"""
import errno
import itertools
import os
import random
import threading
import zipfile
from unittest import mock

import xxhash

import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from experiment_io.storage import verification
from experiment_io.storage.generations import previous_name
from experiment_io.storage.generations import Generation, Role, Search
import experiment_io.run.reading as reading
import experiment_io.run.picking as picking
import experiment_io.storage.atomic as storage
from experiment_io.storage import hashing, parts
from experiment_io.format import codec
from experiment_io.storage import manifest as run_manifest
from experiment_io.platform import maps, switch, writeback
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, save_payload
from experiment_io.errors import CheckpointNotFoundError, CorruptCheckpointError, ExperimentIOError
from experiment_io.loading.loaders import load_checkpoint, load_checkpoint_from_cwd, load_model_from_cwd

from helpers import assert_bitwise_equal, build_run, flip_bit, make_database, make_training_modules, saver, train_tiny_run

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.complex64]


def random_tensor(dtype, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=generator)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=generator).to(dtype)


# --- saving payloads ---------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 7), max_size=3), seed=st.integers(0, 1000),
       mmap=st.booleans())
def test_payload_files_round_trip_bit_for_bit(tmp_path, dtype, shape, seed, mmap):
    tensor = random_tensor(dtype, shape, seed)
    payload = {"t": tensor, "view": tensor.view(-1)[1:] if tensor.numel() > 1 else tensor, "n": [1, 2.5, "x", None]}
    path = tmp_path / f"p{seed}{dtype}{mmap}.pt".replace("torch.", "")
    record = storage.atomic_write(path, lambda f: save_payload(payload, f))
    assert record == verification.file_digest(path)
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert_bitwise_equal(loaded, payload)
    # the view still shares the storage of the tensor it views, as in the original
    assert loaded["view"].untyped_storage().data_ptr() == loaded["t"].untyped_storage().data_ptr()


def test_files_are_standard_zip_archives_and_no_setting_changes(tmp_path):
    """save_payload writes the CRC-32 of every record (zip tools accept the files) and changes no global setting."""
    path = tmp_path / "a.pt"
    torch.serialization.set_crc32_options(False)  # a user's own setting is left alone
    try:
        storage.atomic_write(path, lambda f: save_payload({"w": torch.arange(1000.0)}, f))
        assert torch.serialization.get_crc32_options() is False
    finally:
        torch.serialization.set_crc32_options(True)
    storage.atomic_write(path, lambda f: save_payload({"w": torch.arange(1000.0)}, f))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert any(info.CRC != 0 for info in archive.infolist())


def test_run_files_load_with_plain_torch_load(tmp_path):
    train_tiny_run(tmp_path)
    for name in (LAST_NAME, BEST_NAME, BEST_MODEL_NAME):
        for mmap in (False, True):
            payload = torch.load(tmp_path / name, weights_only=True, mmap=mmap)
            if name == BEST_MODEL_NAME:  # the model's plain state_dict, as hippynn's best_model.pt
                model = make_training_modules().model
                model.load_state_dict(payload)
            else:
                assert payload["experiment_io"]["format_version"] >= 1
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / STRUCTURE_NAME))


# --- the hashing writer -------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.sampled_from([0, 1, 7, 4096, hashing.DIRECT_WRITE - 1, hashing.DIRECT_WRITE,
                                       hashing.WRITE_BLOCK - 3, hashing.WRITE_BLOCK + 5, 2 * hashing.WRITE_BLOCK + 1]),
                      max_size=12),
       seed=st.integers(0, 2**16))
def test_any_pattern_of_writes_gives_the_data_and_its_digest(tmp_path, sizes, seed):
    """Whatever the writes, the file holds them and its record describes it: one part, the whole file's digest;
    more, consecutive parts that cover it, each the digest of its bytes, large writes in parts of their own."""
    rng = random.Random(seed)
    chunks = [rng.randbytes(n) for n in sizes]
    path = tmp_path / f"w{seed}.bin"

    def write(f):
        for i, chunk in enumerate(chunks):  # bytes, bytearrays and memoryviews, as torch.save passes them
            f.write(chunk if i % 3 == 0 else bytearray(chunk) if i % 3 == 1 else memoryview(chunk))

    with mock.patch.object(hashing, "PART_AT_MOST", 6 * 1024 * 1024):  # parts cut within the sizes written here
        record = storage.atomic_write(path, write)
    data = b"".join(chunks)
    assert path.read_bytes() == data
    assert record.size == len(data)
    if record.parts is None:
        assert record == verification.file_digest(path)
        large = [n for n in sizes if n >= parts.PART_AT_LEAST]  # a large write alone in the file is its one part
        assert not large or len([n for n in sizes if n]) == 1
        return
    assert record.digest == codec.parts_digest(record.parts) and len(record.parts) > 1
    offset, starts = 0, set()
    for size, digest in record.parts:
        assert 0 < size <= 6 * 1024 * 1024
        assert xxhash.xxh3_128(data[offset:offset + size]).hexdigest() == digest
        starts.add(offset)
        offset += size
    assert offset == len(data)
    written = 0
    for n in sizes:  # a large write starts a part, and the bytes after it start another
        if n >= parts.PART_AT_LEAST:
            assert written in starts and (written + n in starts or written + n == len(data))
        written += n
    assert verification.Verifier(tmp_path, {path.name: record.as_dict()}).matches(path, record.as_dict())


@pytest.mark.parametrize("size", [0, 1, verification.READ_BLOCK - 1, verification.READ_BLOCK, verification.READ_BLOCK + 1,
                                  3 * verification.READ_BLOCK + 17])
def test_digest_while_writing_equals_digest_of_the_file(tmp_path, size):
    data = random.Random(size).randbytes(size)
    record = storage.atomic_write_bytes(tmp_path / "d.bin", data)
    assert record == verification.file_digest(tmp_path / "d.bin")
    assert verification.Verifier(str(tmp_path), {}).digest(tmp_path / "d.bin") == record


def test_writes_without_early_writeback(tmp_path):
    data = os.urandom(3 * hashing.WRITEBACK_EVERY)
    record = _write_through(tmp_path / "x", lambda f: f.write(data), writeback.Writeback(None))
    assert record == verification.file_digest(tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == data


def _write_through(path, write, pacing):
    """Write ``path`` through a hashing writer with the write-back pacing ``pacing``; its record."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = hashing.HashingWriter(fd, pacing)
        write(writer)
        writer.flush()
        return writer.record()
    finally:
        os.close(fd)


@pytest.mark.usefixtures("fast_paths_on")
def test_early_writeback_that_fails_is_given_up(tmp_path):
    calls = []

    def failing(fd, offset, nbytes, flags):
        calls.append((offset, nbytes))
        return -1

    pacing = writeback.Writeback(failing)
    data = os.urandom(3 * hashing.WRITEBACK_EVERY)
    _write_through(tmp_path / "x", lambda f: [f.write(data[i:i + 2**20]) for i in range(0, len(data), 2**20)], pacing)
    assert (tmp_path / "x").read_bytes() == data
    assert len(calls) == 1 and pacing.function is None  # tried once, then given up for this file


@pytest.mark.usefixtures("fast_paths_on")
def test_with_the_fast_paths_off_nothing_is_written_back_early(monkeypatch):
    monkeypatch.setenv(switch.ENVIRONMENT_VARIABLE, "0")
    assert writeback.Writeback(lambda *a: 0).function is None and writeback.Writeback().function is None


@pytest.mark.usefixtures("fast_paths_on")
@pytest.mark.skipif(writeback.sync_file_range() is None, reason="no sync_file_range here")
def test_early_writeback_covers_the_file_in_order(tmp_path):
    calls, real = [], writeback.sync_file_range()

    def recording(fd, offset, nbytes, flags):
        calls.append((offset, nbytes))
        return real(fd, offset, nbytes, flags)

    tensors = {str(i): torch.randn(2**20) for i in range(6)}  # 24 MiB
    _write_through(tmp_path / "t.pt", lambda f: save_payload(tensors, f), writeback.Writeback(recording))
    assert calls and calls[0][0] == 0
    assert all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:]))  # contiguous ranges, in order


def test_a_failing_write_still_reports_the_error(tmp_path, monkeypatch):
    real_write = os.write

    def full(fd, data):
        if len(data) >= hashing.DIRECT_WRITE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(storage.CheckpointWriteError, match="No space left"):
        storage.atomic_write(tmp_path / "big.pt", lambda f: save_payload({"w": torch.zeros(2**20)}, f))
    assert os.listdir(tmp_path) == []


# --- lazy verification ---------------------------------------------------------------


@pytest.fixture
def digested(monkeypatch):
    """Records the path of every file digested."""
    paths, real = [], verification.Verifier.digest

    def digest(self, path):
        if os.path.abspath(path) not in self._digests:
            paths.append(os.path.basename(path))
        return real(self, path)

    monkeypatch.setattr(verification.Verifier, "digest", digest)
    return paths


def test_load_checkpoint_reads_only_the_files_it_uses(run_copy, digested):
    directory, database = run_copy
    check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert check["controller"].position.step == 7
    assert sorted(digested) == sorted([STRUCTURE_NAME, LAST_NAME])  # each once; no older generation read


def test_load_model_reads_only_the_files_it_uses(run_copy, digested):
    directory, _ = run_copy
    load_model_from_cwd(directory=str(directory))
    assert sorted(digested) == sorted([STRUCTURE_NAME, BEST_MODEL_NAME])


def test_load_by_path_reads_each_file_once(run_copy, digested):
    directory, database = run_copy
    load_checkpoint(directory / STRUCTURE_NAME, directory / BEST_NAME, database=database, restore_rng=False)
    assert sorted(digested) == sorted([STRUCTURE_NAME, BEST_NAME])


def all_generations(directory, name, files):
    """Digest both files of ``name``; those matching a record of the pair, newest first."""
    records = [files[n] for n in (name, previous_name(name)) if n in files]
    found = []
    for candidate in (name, previous_name(name)):
        path = os.path.join(directory, candidate)
        if not os.path.exists(path):
            continue
        actual = verification.file_digest(path)
        match = next((r for r in records if (r["digest"], r["size"]) == (actual.digest, actual.size)), None)
        if match is not None:
            found.append((path, match))
    found.sort(key=lambda g: (g[1].get("step", 0), g[1].get("written_at", 0)), reverse=True)
    return found


def reference_pick(directory, files, roles, newest_first):
    """The pre-lazy selection: verify every generation of every role, then choose."""
    candidates = []
    for rank, role in enumerate(roles):
        name, _, which = role.partition(":")
        generations = all_generations(str(directory), name, files)
        if which == "current":
            generations = [g for g in generations if g[1] is files.get(name)]
        elif which == "older":
            generations = [g for g in generations if g[1] is not files.get(name)]
        candidates += [(path, record, rank) for path, record in generations]
    if newest_first:
        candidates.sort(key=lambda c: (-c[1].get("step", 0), c[2]))
    return candidates[0][0] if candidates else None


DAMAGE = {
    "flip": flip_bit,
    "cut": lambda path: os.truncate(path, os.path.getsize(path) // 2),
    "delete": os.remove,
}
GENERATION_FILES = [LAST_NAME, previous_name(LAST_NAME), BEST_NAME, previous_name(BEST_NAME),
                    BEST_MODEL_NAME, previous_name(BEST_MODEL_NAME)]


def crash_states(directory):
    """Rename patterns that a crash between two steps of a save leaves (new file in place, old moved aside)."""
    return {
        "none": lambda: None,
        "last rotated, new not yet in place": lambda: os.replace(directory / LAST_NAME, directory / previous_name(LAST_NAME)),
        "best model rotated": lambda: os.replace(directory / BEST_MODEL_NAME, directory / previous_name(BEST_MODEL_NAME)),
    }


@pytest.mark.parametrize("crash", ["none", "last rotated, new not yet in place", "best model rotated"])
@pytest.mark.parametrize("damaged", [(), *[(n,) for n in GENERATION_FILES],
                                     *itertools.combinations(GENERATION_FILES[:4], 2),
                                     (LAST_NAME, BEST_NAME, previous_name(LAST_NAME))])
def test_lazy_pick_equals_verifying_everything(run_copy, crash, damaged):
    directory, database = run_copy
    crash_states(directory)[crash]()
    rng = random.Random(str(damaged) + crash)
    for name in damaged:
        if (directory / name).exists():
            DAMAGE[rng.choice(sorted(DAMAGE))](directory / name)
    files = run_manifest.read_manifest(str(directory))[1]
    for roles, newest_first in (([LAST_NAME, BEST_NAME], True), ([BEST_NAME], True),
                                ([BEST_MODEL_NAME + ":current", LAST_NAME, BEST_NAME, BEST_MODEL_NAME + ":older"], False)):
        expected = reference_pick(directory, files, roles, newest_first)
        try:
            typed = [Role(r.partition(":")[0], {"": Generation.ANY, "current": Generation.CURRENT,
                                                "older": Generation.PREVIOUS}[r.partition(":")[2]]) for r in roles]
            path = Search(verification.Verifier(str(directory), files), typed, newest_first=newest_first).first().path
        except (CorruptCheckpointError, CheckpointNotFoundError):
            path = None
        assert path == expected, (roles, damaged, crash)


def test_strict_raises_at_the_first_damaged_file_it_needs(run_copy):
    directory, database = run_copy
    flip_bit(directory / previous_name(LAST_NAME))  # not needed: last_checkpoint.pt is intact
    check = load_checkpoint_from_cwd(directory=str(directory), database=database, strict=True, restore_rng=False)
    assert check["controller"].position.step == 7
    flip_bit(directory / LAST_NAME)
    with pytest.raises(CorruptCheckpointError, match=LAST_NAME):
        load_checkpoint_from_cwd(directory=str(directory), database=database, strict=True)


# --- memory-mapped loads ---------------------------------------------------------------


def mapped_files():
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("loader", ["load_checkpoint_from_cwd", "load_model_from_cwd", "load_checkpoint"])
def test_no_file_stays_mapped_after_a_load(run_copy, loader):
    """Resumes, and model loads with ``mmap=False``, hold no file."""
    directory, database = run_copy
    if loader == "load_checkpoint_from_cwd":
        result = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    elif loader == "load_model_from_cwd":
        result = load_model_from_cwd(directory=str(directory), mmap=False)
    else:
        result = load_checkpoint(directory / STRUCTURE_NAME, directory / LAST_NAME, database=database, restore_rng=False)
    assert not {p for p in mapped_files() if p.startswith(str(directory))}
    # and nothing of the result depends on the files any more
    for name in os.listdir(directory):
        os.truncate(directory / name, 0)
    if isinstance(result, dict):
        optimizer_state = result["controller"].optimizer.state_dict()["state"]
        assert all(torch.isfinite(t).all() for s in optimizer_state.values() for t in s.values())
        assert all(torch.isfinite(t).all() for t in result["metric_tracker"].best_model_state.values())


def test_mapped_load_equals_plain_load(run_copy):
    directory, database = run_copy
    check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    plain = torch.load(directory / LAST_NAME, weights_only=True)
    for name, value in check["training_modules"].model.state_dict().items():
        assert torch.equal(value, plain["model"][name])
    state = check["controller"].optimizer.state_dict()
    assert state["param_groups"] == plain["controller"]["optimizer"]["param_groups"]
    for k, v in check["metric_tracker"].best_model_state.items():
        assert torch.equal(v, plain["metric_tracker"]["best_model_state"][k])


def test_a_file_that_cannot_be_mapped_is_read(run_copy, monkeypatch):
    directory, database = run_copy
    real_load = torch.load

    def no_mmap(*args, mmap=None, **kwargs):
        if mmap:
            raise OSError(errno.ENODEV, "mmap not supported by this file system")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_mmap)
    check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert check["controller"].position.step == 7


def test_a_file_replaced_while_it_is_read_is_read_as_it_was_verified(run_copy, monkeypatch):
    """A writer commits step 8 while the verified step-7 file is read: the load gets step 7, whole."""
    directory, database = run_copy
    real_load, replaced = torch.load, []

    def load_then_save(path, *args, **kwargs):
        result = real_load(path, *args, **kwargs)
        if os.path.basename(os.path.realpath(str(path))) == LAST_NAME and not replaced:
            replaced.append(True)
            saver(str(directory))(8)  # a writer commits step 8 meanwhile
        return result

    monkeypatch.setattr(torch, "load", load_then_save)
    check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert replaced and check["controller"].position.step == 7  # the bytes that were verified, not a mixture


def test_a_file_replaced_after_its_verification_makes_the_load_start_over(run_copy, monkeypatch, caplog):
    directory, database = run_copy
    real_open, replaced = verification.Verifier.open_verified, []

    def replaced_first(self, path):
        if os.path.basename(path) == LAST_NAME and not replaced:
            replaced.append(True)
            saver(str(directory))(8)  # renamed over the path between its verification and its read
        return real_open(self, path)

    monkeypatch.setattr(verification.Verifier, "open_verified", replaced_first)
    with caplog.at_level("INFO", logger="experiment_io"):
        check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert check["controller"].position.step == 8 and "loading again" in caplog.text


def test_a_directory_that_never_stops_changing_gives_a_clear_error(run_copy, monkeypatch):
    directory, database = run_copy
    real_open, save, steps = verification.Verifier.open_verified, saver(str(directory)), itertools.count(8)

    def replaced_every_time(self, path):
        if os.path.basename(path) == LAST_NAME:
            save(next(steps))
        return real_open(self, path)

    monkeypatch.setattr(verification.Verifier, "open_verified", replaced_every_time)
    with pytest.raises(ExperimentIOError, match="keeps writing"):
        load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)


# --- digests still protect the fast path ----------------------------------------------


def tensor_data_offset(path, key):
    """Offset in the file of the first byte of the data of one storage (no CRC guards it)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(f"data/{key}"))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_length + extra_length


def test_a_flipped_bit_in_tensor_data_loads_silently_with_torch_but_not_with_the_loader(run_copy, monkeypatch):
    directory, database = run_copy
    path = directory / BEST_MODEL_NAME
    before = torch.load(path, weights_only=True)
    offset = tensor_data_offset(path, 0)
    flip_bit(path, offset)
    after = torch.load(path, weights_only=True, mmap=True)  # torch alone: a wrong value, no error
    assert any(not torch.equal(before[k], after[k]) for k in before)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(os.path.basename(os.path.realpath(str(f))))
                        or real_load(f, *a, **k))
    with pytest.raises(CorruptCheckpointError, match=BEST_MODEL_NAME):
        load_model_from_cwd(directory=str(directory), strict=True)
    assert BEST_MODEL_NAME not in loads
    model = load_model_from_cwd(directory=str(directory))  # falls back to the best state in the last checkpoint
    reference = torch.load(directory / LAST_NAME, weights_only=True)["metric_tracker"]["best_model_state"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k])


@pytest.mark.parametrize("where", ["first byte", "middle", "last byte"])
def test_the_verifier_catches_any_changed_byte(tmp_path, where):
    path = tmp_path / "f.pt"
    record = storage.atomic_write(path, lambda f: save_payload({"w": torch.randn(3 * verification.READ_BLOCK // 4)}, f))
    size = os.path.getsize(path)
    flip_bit(path, {"first byte": 0, "middle": size // 2, "last byte": size - 1}[where])
    verifier = verification.Verifier(str(tmp_path), {"f.pt": record.as_dict()})
    assert not verifier.matches(path, record.as_dict())
    assert "expected" in verifier.describe(str(path), record.as_dict())


def test_digest_reads_the_file_where_it_cannot_be_mapped(tmp_path, monkeypatch):
    data = os.urandom(3 * verification.MAP_AT_LEAST + 5)
    record = storage.atomic_write_bytes(tmp_path / "m.bin", data)
    assert verification.file_digest(tmp_path / "m.bin") == record  # through a memory map

    def no_mmap(*args, **kwargs):
        raise OSError(errno.ENODEV, "no mmap here")

    monkeypatch.setattr(maps.mmap, "mmap", no_mmap)
    assert verification.file_digest(tmp_path / "m.bin") == record  # read in blocks


# --- the state is verified while the structure is loaded ------------------------------


def test_state_is_verified_in_a_second_thread_while_the_structure_loads(run_copy, monkeypatch):
    directory, database = run_copy
    monkeypatch.setattr(picking, "INLINE_BELOW", 0)  # this run's files are small: verified inline otherwise
    threads, real = {}, verification.Verifier.digest

    def digest(self, path):
        threads.setdefault(os.path.basename(path), threading.current_thread().name)
        return real(self, path)

    monkeypatch.setattr(verification.Verifier, "digest", digest)
    load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert threads[STRUCTURE_NAME] == threading.main_thread().name
    assert threads[LAST_NAME] == "experiment_io-verify"
    assert not any(t.name == "experiment_io-verify" for t in threading.enumerate())


def test_small_state_files_are_verified_without_a_thread(run_copy, monkeypatch):
    directory, database = run_copy
    threads, real = {}, verification.Verifier.digest
    started = []
    real_start = threading.Thread.start

    def digest(self, path):
        threads.setdefault(os.path.basename(path), threading.current_thread().name)
        return real(self, path)

    monkeypatch.setattr(verification.Verifier, "digest", digest)
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name) or real_start(self))
    load_model_from_cwd(directory=str(directory))
    assert threads[BEST_MODEL_NAME] == threading.main_thread().name
    assert "experiment_io-verify" not in started


def test_an_error_of_the_structure_load_waits_for_the_verification_thread(run_copy, monkeypatch):
    directory, database = run_copy

    def failing(*args, **kwargs):
        raise RuntimeError("the structure file could not be loaded")

    monkeypatch.setattr(reading, "load_structure", failing)
    for load in (lambda: load_checkpoint_from_cwd(directory=str(directory), database=database),
                 lambda: load_model_from_cwd(directory=str(directory))):
        with pytest.raises(RuntimeError, match="could not be loaded"):
            load()
        assert not any(t.name == "experiment_io-verify" for t in threading.enumerate())


def test_missing_ok_still_returns_none_when_the_structure_has_no_checkpoint(tmp_path):
    build_run(str(tmp_path))  # a structure file, no checkpoint yet
    assert load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database(), missing_ok=True) is None


# --- a resume's memory is made ready while the checkpoint is verified -------------------------


def _mapped_payload(tmp_path):
    """A saved payload of shared storages, views, a zero-size tensor and nesting, loaded with ``mmap=True``;
    ``(path, mapped, plain)``."""
    base = torch.arange(4096, dtype=torch.float64)
    payload = {"base": base, "view": base[10:20], "strided": base[::7], "other": torch.randn(3, 1000),
               "empty": torch.zeros(0), "nested": [{"again": base}, (torch.ones(2, dtype=torch.int8),)], "n": 3}
    path = tmp_path / "payload.pt"
    with open(path, "wb") as f:
        save_payload(payload, f)
    return path, torch.load(path, weights_only=True, mmap=True), torch.load(path, weights_only=True)


def _mapped(path):
    """Whether ``path`` is mapped into this process."""
    return str(path) in mapped_files()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("ready", ["sizes of the file", "other sizes", "none"])
def test_adopted_tensors_leave_the_map_and_keep_their_values_and_sharing(tmp_path, ready):
    from experiment_io.platform.residence import Destination, storage_sizes

    path, mapped, plain = _mapped_payload(tmp_path)
    sizes = storage_sizes(path)
    assert sorted(sizes) == sorted({t.untyped_storage().nbytes() for t in (plain["base"], plain["other"],
                                                                            plain["nested"][1][0], plain["empty"])})
    destination = Destination({"sizes of the file": sizes, "other sizes": [12345], "none": []}[ready])
    destination.fill()
    prepared = {s.data_ptr() for ready_list in destination._ready.values() for s in ready_list}
    assert _mapped(path)
    adopted = destination.adopt(mapped)
    assert adopted is mapped
    for key in ("base", "view", "strided", "other", "empty"):
        assert_bitwise_equal(adopted[key], plain[key])
        assert adopted[key].stride() == plain[key].stride()
    assert adopted["nested"][0]["again"] is adopted["base"]
    assert_bitwise_equal(adopted["nested"][1][0], plain["nested"][1][0])
    # the views still share the base's memory, which is no longer the file's
    assert adopted["view"].untyped_storage().data_ptr() == adopted["base"].untyped_storage().data_ptr()
    adopted["base"][15] = -1.0
    assert adopted["view"][5] == -1.0 and adopted["strided"][0] == 0.0
    if ready == "sizes of the file":  # the memory made ready is what the tensors now use
        assert {adopted[k].untyped_storage().data_ptr() for k in ("base", "other")} <= prepared
    del mapped, adopted
    import gc
    gc.collect()
    assert not _mapped(path)
    assert destination.ready == {}


def test_storage_sizes_of_what_is_not_an_archive_are_none(tmp_path):
    from experiment_io.platform.residence import storage_sizes

    (tmp_path / "x.pt").write_bytes(b"not a zip archive" * 100)
    assert storage_sizes(tmp_path / "x.pt") == []
    assert storage_sizes(tmp_path / "missing.pt") == []


def test_a_damaged_checkpoint_is_refused_before_its_memory_is_used(run_copy, monkeypatch):
    """The memory for the checkpoint is made ready while it is verified; a damaged file is still never loaded,
    and the previous generation is taken."""
    directory, database = run_copy
    flip_bit(directory / LAST_NAME, tensor_data_offset(directory / LAST_NAME, 0))
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(os.path.basename(os.path.realpath(str(f))))
                        or real_load(f, *a, **k))
    with pytest.raises(CorruptCheckpointError, match=LAST_NAME):
        load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False, strict=True)
    assert LAST_NAME not in loads
    check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    taken = loads[-1]  # the state file, loaded after the structure
    assert taken != LAST_NAME
    reference = real_load(directory / taken, weights_only=True)
    for name, value in check["training_modules"].model.state_dict().items():
        assert_bitwise_equal(value, reference["model"][name])


@pytest.mark.usefixtures("fast_paths_on")
def test_a_resume_makes_memory_ready_while_the_state_is_verified(run_copy, monkeypatch):
    from experiment_io.platform import residence

    directory, database = run_copy
    calls, real_fill, real_digest = [], residence.Destination.fill, verification.Verifier.digest

    def fill(self):
        calls.append(("fill", threading.current_thread().name, sum(self._sizes)))
        real_fill(self)

    def digest(self, path):
        calls.append(("digest", threading.current_thread().name, os.path.basename(path)))
        return real_digest(self, path)

    monkeypatch.setattr(residence.Destination, "fill", fill)
    monkeypatch.setattr(verification.Verifier, "digest", digest)
    monkeypatch.setattr(picking, "INLINE_BELOW", 0)  # this run's files are small: verified inline otherwise
    load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    fills = [c for c in calls if c[0] == "fill"]
    assert fills == [("fill", threading.main_thread().name, fills[0][2])] and fills[0][2] > 0
    assert ("digest", "experiment_io-verify", LAST_NAME) in calls
    calls.clear()  # a map_location function may put tensors anywhere: no CPU memory is made ready
    load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False,
                             map_location=lambda storage, location: storage)
    assert not [c for c in calls if c[0] == "fill"]


def test_memory_is_made_ready_only_for_a_regular_file(tmp_path):
    """The archive's directory is read before the file is verified: a FIFO or a link in its place is not opened
    (a FIFO would block the load forever)."""
    from experiment_io.platform.residence import storage_sizes

    path, _, _ = _mapped_payload(tmp_path)
    assert storage_sizes(path)
    os.symlink(path, tmp_path / "link.pt")
    assert storage_sizes(tmp_path / "link.pt") == []
    os.mkfifo(tmp_path / "fifo.pt")
    done = []
    reader = threading.Thread(target=lambda: done.append(storage_sizes(tmp_path / "fifo.pt")), daemon=True)
    reader.start()
    reader.join(10)
    assert done == [[]]


def test_a_resume_with_a_fifo_for_its_last_checkpoint_takes_the_best_one(run_copy):
    directory, database = run_copy
    os.remove(directory / LAST_NAME)
    os.mkfifo(directory / LAST_NAME)
    outcome = []
    loader = threading.Thread(target=lambda: outcome.append(load_checkpoint_from_cwd(
        directory=str(directory), database=database, restore_rng=False)), daemon=True)
    loader.start()
    loader.join(60)
    assert outcome and outcome[0]["controller"].loaded_from == str(directory)
    best = run_manifest.read_manifest(str(directory))[1][BEST_NAME]
    assert outcome[0]["controller"].position.step == best["step"]


def test_a_map_that_fails_lets_the_ready_memory_go_and_reads_the_file(tmp_path, monkeypatch):
    from experiment_io.platform.residence import Destination, storage_sizes

    path, _, plain = _mapped_payload(tmp_path)
    destination = Destination(storage_sizes(path))
    destination.fill()
    real_load = torch.load

    def failing(*args, mmap=None, **kwargs):
        if mmap:
            raise OSError(errno.ENODEV, "mmap not supported by this file system")
        assert not destination.ready, "the memory made ready is let go before the file is read"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", failing)
    loaded = reading.torch_load(str(path), "cpu", destination=destination)
    assert_bitwise_equal(loaded["base"], plain["base"])
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()


def test_a_tensor_that_cannot_leave_the_map_makes_the_load_read_the_file(tmp_path):
    """A sparse tensor's storage cannot be re-pointed: nothing is moved, the file is read instead, and a dense
    tensor sharing the sparse tensor's values still shares them."""
    from experiment_io.platform.residence import CannotAdopt, Destination, storage_sizes

    values = torch.arange(5, dtype=torch.float32)
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2, 4, 6, 8]]), values, (10,), check_invariants=True).coalesce()
    payload = {"sparse": sparse, "values": sparse.values(), "dense": torch.ones(100)}
    path = tmp_path / "sparse.pt"
    with open(path, "wb") as f:
        save_payload(payload, f)
    mapped = torch.load(path, weights_only=True, mmap=True)
    with pytest.raises(CannotAdopt):
        Destination([]).adopt(mapped)
    destination = Destination(storage_sizes(path))
    destination.fill()
    loaded = reading.torch_load(str(path), "cpu", destination=destination)
    assert torch.equal(loaded["sparse"].to_dense(), sparse.to_dense()) and torch.equal(loaded["dense"], torch.ones(100))
    assert loaded["values"].data_ptr() == loaded["sparse"].values().data_ptr()
    del mapped, loaded
    import gc
    gc.collect()
    assert not _mapped(path)


def test_a_resume_goes_on_when_its_memory_cannot_be_made_ready(run_copy, monkeypatch):
    from experiment_io.platform import residence

    directory, database = run_copy

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(residence, "_resident", no_memory)
    check = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    monkeypatch.undo()
    plain = torch.load(directory / LAST_NAME, weights_only=True)
    for name, value in check["training_modules"].model.state_dict().items():
        assert_bitwise_equal(value, plain["model"][name])
    assert not any(t.name == "experiment_io-verify" for t in threading.enumerate())


def test_a_mapped_model_never_writes_into_its_file(run_copy):
    """Whatever torch's default for maps (MAP_SHARED can be set process-wide), a model loaded with mmap=True gets
    a private map: changing its weights leaves the verified file as it was."""
    import mmap as mmap_module

    directory, _ = run_copy
    before = verification.file_digest(directory / BEST_MODEL_NAME)
    with torch.serialization.set_default_mmap_options(mmap_module.MAP_SHARED):
        model = load_model_from_cwd(directory=str(directory), mmap=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    del model
    assert verification.file_digest(directory / BEST_MODEL_NAME) == before


def test_no_memory_is_made_ready_beyond_half_of_what_is_available(tmp_path, monkeypatch):
    """The archive's directory is read before the file is verified: a directory claiming more than half the
    memory at hand makes nothing ready (the load goes on without it)."""
    from experiment_io.platform import residence

    at_hand = residence.available_memory()
    assert at_hand is None or 0 < at_hand <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    destination = residence.Destination([3 * 1024 * 1024, 3 * 1024 * 1024])
    destination.fill(memory_at_hand=10 * 1024 * 1024)
    assert destination.ready == {}
    destination = residence.Destination([2 * 1024 * 1024, 3 * 1024 * 1024])
    destination.fill(memory_at_hand=10 * 1024 * 1024)
    assert destination.ready == {2 * 1024 * 1024: 1, 3 * 1024 * 1024: 1}


def test_with_the_fast_paths_off_a_resume_makes_no_memory_ready_and_maps_through_python(run_copy, monkeypatch):
    from experiment_io.platform import residence

    directory, database = run_copy
    filled = []
    monkeypatch.setattr(residence.Destination, "fill", lambda self: filled.append(1))
    monkeypatch.setenv("EXPERIMENT_IO_FAST_PATHS", "0")
    assert maps.libc() is None
    fd = os.open(directory / LAST_NAME, os.O_RDONLY)
    try:
        assert type(maps.map_for_reading(fd, os.fstat(fd).st_size)).__name__ == "_PythonMap"
    finally:
        os.close(fd)
    off = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert filled == []
    monkeypatch.setenv("EXPERIMENT_IO_FAST_PATHS", "1")
    on = load_checkpoint_from_cwd(directory=str(directory), database=database, restore_rng=False)
    assert_bitwise_equal(off["training_modules"].model.state_dict(), on["training_modules"].model.state_dict())
    if maps.libc() is not None:
        assert filled == [1]
