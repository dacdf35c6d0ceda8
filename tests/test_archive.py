"""The zip container of experiment_io's files (experiment_io.platform.archive) and the digest computed while writing."""
import io
import multiprocessing
import os
import shutil
import subprocess
import zipfile
import zlib

import pytest
import torch
import xxhash

from experiment_io.platform import archive
from experiment_io.storage import atomic as storage
from experiment_io.storage import hashing
from experiment_io.storage.verification import DIGEST_NAME
from experiment_io.platform.threads import SIDE_DIGEST_BYTES, worker_thread


def tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "float": base,
        "row_view": base[1],
        "column_view": base[:, 2],
        "int64": torch.arange(5, dtype=torch.int64),
        "bfloat16": torch.linspace(0, 1, 7, dtype=torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "large": torch.randn(600_000),  # 2.4 MB: checksummed and digested on the side thread
        "nested": [{"a": torch.ones(2, 2)}, (1, "text", None)],
    }


def archive_bytes(obj):
    buffer = io.BytesIO()
    archive.save(obj, buffer)
    return buffer.getvalue()


def assert_same(loaded, expected):
    if isinstance(expected, torch.Tensor):
        assert loaded.dtype == expected.dtype and torch.equal(loaded, expected)
    elif isinstance(expected, dict):
        assert loaded.keys() == expected.keys()
        for key in expected:
            assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(loaded) is type(expected) and len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            assert_same(a, b)
    else:
        assert loaded == expected


def test_archive_loads_with_torch_load_and_views_keep_sharing(tmp_path):
    obj = tensors()
    path = tmp_path / "a.pt"
    path.write_bytes(archive_bytes(obj))
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert_same(loaded, obj)
        assert loaded["row_view"].untyped_storage().data_ptr() == loaded["float"].untyped_storage().data_ptr()
        if mmap:  # storages are mapped in place: their data is aligned as torch.save aligns it
            assert loaded["large"].data_ptr() % archive.ALIGNMENT == 0


def test_archive_holds_the_records_torch_save_writes_with_the_same_pickle():
    obj = tensors()
    ours = zipfile.ZipFile(io.BytesIO(archive_bytes(obj)))
    reference = io.BytesIO()
    torch.save(obj, reference)
    theirs = zipfile.ZipFile(reference)
    assert ours.namelist() == theirs.namelist()
    for name in theirs.namelist():
        if not name.endswith("serialization_id"):
            assert ours.read(name) == theirs.read(name), name
    assert ours.read("archive/.data/serialization_id").isdigit()
    assert len(ours.read("archive/.data/serialization_id")) == 40


def test_every_record_carries_its_crc32_and_zip_tools_accept_the_file(tmp_path):
    data = archive_bytes(tensors())
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None  # reads every record and checks its CRC-32
        for info in z.infolist():
            assert info.CRC == zlib.crc32(z.read(info.filename))
    if shutil.which("unzip"):
        path = tmp_path / "a.pt"
        path.write_bytes(data)
        result = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_damaged_record_fails_the_zip_check():
    values = torch.arange(1000, dtype=torch.float32)
    data = bytearray(archive_bytes({"x": values}))
    offset = bytes(data).index(values.numpy().tobytes())
    data[offset + 100] ^= 0xFF
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        assert z.testzip() == "archive/data/0"


@pytest.mark.usefixtures("fast_paths_on")
def test_zip64_records_are_read_by_torch_and_zipfile(monkeypatch, tmp_path):
    """Every record written with zip64 fields (as a record or an offset past 4 GiB is), tested at a small size."""
    monkeypatch.setattr(archive, "ZIP64_LIMIT", 0)
    obj = tensors()
    data = archive_bytes(obj)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        assert all(info.extra.startswith(b"\x01\x00") for info in z.infolist())  # the zip64 extra field
    path = tmp_path / "a.pt"
    path.write_bytes(data)
    for mmap in (False, True):
        assert_same(torch.load(path, weights_only=True, mmap=mmap), obj)


def test_torch_finds_every_storage_where_it_computes_it_is(tmp_path):
    """torch computes storage offsets from the writer's layout without reading headers (map_location="meta");
    empty storages (no data descriptor) among them."""
    obj = [torch.full((3,), float(i)) for i in range(11)] + [torch.zeros(0), torch.arange(4.0) + 100, torch.ones(0, 2),
                                                             torch.randn(600_000), torch.tensor([7.0])]
    path = tmp_path / "a.pt"
    path.write_bytes(archive_bytes(obj))
    data = path.read_bytes()
    meta = torch.load(path, map_location="meta", weights_only=True)
    for tensor, original in zip(meta, obj):
        if original.numel():
            offset = tensor.untyped_storage()._checkpoint_offset
            assert data[offset:offset + original.nbytes] == original.numpy().tobytes()
    with zipfile.ZipFile(path) as z:
        empty = z.getinfo("archive/data/11")
        assert empty.flag_bits & 0x08 == 0 and empty.file_size == 0  # as torch writes an empty record
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded, obj))


def test_the_archive_is_the_same_bytes_for_the_same_object():
    assert archive_bytes(tensors() | {"large": torch.ones(600_000)}) == archive_bytes(tensors() | {"large": torch.ones(600_000)})


def test_without_torchs_serializer_the_file_is_written_by_torch_save(monkeypatch):
    """A torch whose private serializer takes other arguments: the archive is torch.save's own."""
    real = torch.serialization._save

    def another(obj, zip_file, pickle_module, pickle_protocol, _disable_byteorder_record, new_argument=None):
        return real(obj, zip_file, pickle_module, pickle_protocol, _disable_byteorder_record)

    monkeypatch.setattr(torch.serialization, "_save", another)
    calls = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (calls.append(1), real_save(*a, **k)))
    obj = tensors()
    loaded = torch.load(io.BytesIO(archive_bytes(obj)), weights_only=True)
    assert_same(loaded, obj)
    assert calls == [1]


def test_with_the_fast_paths_off_the_file_is_written_by_torch_save(monkeypatch):
    monkeypatch.setenv("EXPERIMENT_IO_FAST_PATHS", "0")
    calls = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (calls.append(1), real_save(*a, **k)))
    obj = tensors()
    assert_same(torch.load(io.BytesIO(archive_bytes(obj)), weights_only=True), obj)
    assert calls == [1]
    monkeypatch.setenv("EXPERIMENT_IO_FAST_PATHS", "1")
    archive_bytes(obj)
    assert calls == [1]  # the archive writer again, whatever a mocked torch.save met before


@pytest.mark.parametrize("side_bytes", [1, SIDE_DIGEST_BYTES, 1 << 40])
def test_the_digest_covers_the_file_bytes_in_order_wherever_it_is_computed(tmp_path, monkeypatch, side_bytes):
    """Large writes are digested on the side thread, small ones inline; the digest is that of the file."""
    monkeypatch.setattr(hashing, "SIDE_DIGEST_BYTES", side_bytes)
    path = tmp_path / "a.pt"
    record = storage.atomic_write(str(path), lambda f: archive.save(tensors(), f))
    content = path.read_bytes()
    assert record.size == len(content)
    assert record.digest == f"{DIGEST_NAME}:{xxhash.xxh3_128(content).hexdigest()}"


def _write_in_child(path, queue):
    # no torch operation here: torch's own thread pool does not survive a fork
    try:
        record = storage.atomic_write(path, lambda f: f.write(os.urandom(3 * SIDE_DIGEST_BYTES)))
        queue.put(record.digest)
    except BaseException as e:  # reported to the parent
        queue.put(repr(e))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_writes_with_a_side_thread_of_its_own(tmp_path):
    storage.atomic_write(str(tmp_path / "parent.pt"), lambda f: archive.save({"large": torch.ones(600_000)}, f))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_write_in_child, args=(str(tmp_path / "child.pt"), queue))
    child.start()
    digest = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert digest == f"{DIGEST_NAME}:{xxhash.xxh3_128((tmp_path / 'child.pt').read_bytes()).hexdigest()}"


def test_the_library_threads_leave_outside_signals_to_the_main_thread():
    import signal
    import threading

    seen = {}

    def probe():
        seen["blocked"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    thread = worker_thread(probe, name="probe", daemon=True)
    thread.start()
    thread.join(10)
    assert {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1} <= seen["blocked"]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the caller's mask is untouched
    assert threading.current_thread() is threading.main_thread()
