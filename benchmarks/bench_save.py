"""1. Durable save of a state of 64 float32 tensors (1 GiB; --quick: 64 MiB).

experiment_io (atomic write, digest, fsync) against the disk's limit (the same bytes
written raw with paced writeback, and with O_DIRECT, then fsynced; the naive raw
write, one big write then one fsync, is kept for reference), against torch.save
with and without fsync, and against the peers that are installed (safetensors,
torch.distributed.checkpoint, torchsnapshot; each made durable); then where the
time of a save goes (torch.save's CRC-32, the digest, the copy to the page cache,
the fsync).
"""
import os
import shutil
import time

import torch
import xxhash

import harness
from experiment_io import atomic_save
from experiment_io.platform import archive
from experiment_io.storage.generations import previous_name
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import LAST_NAME, save_payloads
from experiment_io.platform.writeback import _SYNC_FILE_RANGE_WRITE, sync_file_range
from experiment_io.storage.manifest import MANIFEST_NAME
from fixtures import make_state, state_nbytes, state_payload

NAME = "save"
RAW = "raw write + fsync of the tensor bytes"
PACED = "raw write, paced writeback (8 MiB) + fsync: the disk's limit"
DIRECT = "raw O_DIRECT write (8 MiB blocks) + fsync"
EIO = "experiment_io: save_payloads (+ generation, manifest)"
ATOMIC = "experiment_io: atomic_save (+ generation, manifest)"


def size_of(args):
    return (64 if args.quick else 1024) * harness.MiB


def _write_tensors(fd, state):
    for t in state.values():
        view = memoryview(t.numpy()).cast("B")
        while view:
            view = view[os.write(fd, view):]


def _paced(fd, state, block=8 * harness.MiB):
    """Write the tensors' bytes, asking the kernel to start writing back every ``block`` bytes (as a well-tuned
    writer does: the final fsync then waits for little)."""
    written = flushed = 0
    for t in state.values():
        view = memoryview(t.numpy()).cast("B")
        while view:
            n = os.write(fd, view[:block])
            view, written = view[n:], written + n
            if written - flushed >= block and sync_file_range() is not None:
                sync_file_range()(fd, flushed, written - flushed, _SYNC_FILE_RANGE_WRITE)
                flushed = written


def _direct(path, state, block=8 * harness.MiB):
    """Write the tensors' bytes with O_DIRECT (bypassing the page cache) from an aligned buffer; ``False`` where
    the file system refuses O_DIRECT."""
    import mmap
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):
        return False
    buffer = mmap.mmap(-1, block)  # page-aligned
    try:
        pending = 0
        for t in state.values():
            view = memoryview(t.numpy()).cast("B")
            while view:
                n = min(block - pending, len(view))
                buffer[pending:pending + n] = view[:n]
                pending, view = pending + n, view[n:]
                if pending == block:
                    os.write(fd, buffer)
                    pending = 0
        if pending:  # the tail, padded to the block size (the benchmark's sizes are multiples of it)
            os.write(fd, buffer)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)
        buffer.close()


def _fsync_tree(path):
    for root, _, names in os.walk(path):
        for name in names:
            _fsync_file(os.path.join(root, name))


def peers(directory, state):
    """The other libraries' durable saves of the same tensors, those that are installed: ``{name: fn}``."""
    found = {}
    try:
        from safetensors.torch import save_file
    except ImportError:
        pass
    else:
        path = os.path.join(directory, "peer.safetensors")

        def safetensors_save():
            save_file(state, path)
            _fsync_file(path)
        found["safetensors save_file + fsync"] = safetensors_save
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError:
        pass
    else:
        where = os.path.join(directory, "peer-dcp")
        found["torch.distributed.checkpoint.save (fsyncs its files)"] = lambda: dcp.save(state, checkpoint_id=where)
    try:
        import torchsnapshot
    except ImportError:
        pass
    else:
        where = os.path.join(directory, "peer-snapshot")

        def snapshot():
            shutil.rmtree(where, ignore_errors=True)
            torchsnapshot.Snapshot.take(path=where, app_state={"state": torchsnapshot.StateDict(**state)})
            _fsync_tree(where)
        found["torchsnapshot Snapshot.take + fsync"] = snapshot
    return found


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_peer_files(directory):
    harness.remove(os.path.join(directory, "peer.safetensors"))
    for peer_dir in ("peer-dcp", "peer-snapshot"):
        shutil.rmtree(os.path.join(directory, peer_dir), ignore_errors=True)


def durable_save(directory, size, reps, seed):
    n_tensors, tensor_bytes = 64, size // 64
    state = make_state(n_tensors, tensor_bytes)
    payload = state_payload(state)
    nbytes = state_nbytes(state)
    paths = {name: os.path.join(directory, f"save-{i}.pt") for i, name in enumerate(
        ["raw", "eio", "tsave", "tsave-nofsync"])}
    writer = RunWriter(os.path.join(directory, "save-run"))

    def raw():
        fd = os.open(paths["raw"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_tensors(fd, state)
            os.fsync(fd)
        finally:
            os.close(fd)

    file_size = []

    def eio():
        file_size.append(save_payloads(writer, {LAST_NAME: payload})[LAST_NAME].size)

    def tsave(fsync=True):
        with open(paths["tsave" if fsync else "tsave-nofsync"], "wb") as f:
            torch.save(payload, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    def paced():
        fd = os.open(paths["raw"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _paced(fd, state)
            os.fsync(fd)
        finally:
            os.close(fd)

    methods = {
        RAW: raw,
        PACED: paced,
        EIO: eio,
        ATOMIC: lambda: atomic_save(payload, paths["eio"]),
        "torch.save + fsync": tsave,
        "torch.save (no fsync)": lambda: tsave(False),
    }
    if _direct(paths["raw"], {"probe": torch.zeros(2 * 1024 * 1024, dtype=torch.float32)}):
        methods[DIRECT] = lambda: _direct(paths["raw"], state)
    methods.update(peers(directory, state))

    def setup(name):
        # every file of the section goes before each save: the page cache does not grow from one
        # measurement to the next, and each save finds the memory the previous one freed
        harness.remove(*paths.values(), previous_name(paths["eio"]), writer.path(LAST_NAME),
                       writer.path(previous_name(LAST_NAME)))
        _remove_peer_files(directory)
        harness.settle()

    results = harness.summaries(harness.side_by_side(methods, reps, seed=seed, setup=setup))
    harness.rows(f"1. Durable save of {n_tensors} float32 tensors, {nbytes / harness.MiB:.0f} MiB "
                 "(throughput relative to the paced raw write, the disk's limit; >= 0.95 is the target)",
                 results, PACED, nbytes=nbytes, ratio="throughput")
    harness.remove(*paths.values(), previous_name(paths["eio"]), os.path.join(directory, MANIFEST_NAME))
    _remove_peer_files(directory)
    shutil.rmtree(writer.directory, ignore_errors=True)
    limit = results[PACED]
    return {"state_bytes": nbytes, "file_bytes": file_size[-1], "results": results,
            "throughput_vs_raw": {name: limit["median"] / s["median"] for name, s in results.items()},
            "throughput_vs_raw_of_minima": {name: limit["min"] / s["min"] for name, s in results.items()}}


class _Null:
    """A file object that throws its bytes away."""

    def write(self, data):
        return len(memoryview(data).cast("B"))

    def flush(self):
        pass


def breakdown(directory, size, reps, seed):
    """Where the time of a save goes: serialization with/without CRC, hashing, copy to page cache, fsync.

    experiment_io writes the archive's zip container itself, with zlib-ng's CRC-32
    (:mod:`experiment_io.platform.archive`); torch.save is timed with its own CRC-32 and without
    it (the setting is changed for that call only, and restored).
    """
    state = make_state(64, size // 64)

    def serialize(crc):
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(crc)
        try:
            torch.save(state, _Null())
        finally:
            torch.serialization.set_crc32_options(before)

    def digest():
        h = xxhash.xxh3_128()
        for t in state.values():
            h.update(memoryview(t.numpy()).cast("B"))

    path = os.path.join(directory, "breakdown.bin")
    fsync_times = []

    def write_then_fsync():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_tensors(fd, state)
            started = time.perf_counter()
            os.fsync(fd)
            fsync_times.append(time.perf_counter() - started)
        finally:
            os.close(fd)

    methods = {
        "torch.save to a null sink, torch's CRC-32": lambda: serialize(True),
        "torch.save to a null sink, CRC-32 off": lambda: serialize(False),
        "experiment_io archive.save to a null sink (zlib-ng CRC-32)": lambda: archive.save(state, _Null()),
        "xxh3-128 digest of the bytes": digest,
        "write to the page cache + fsync": write_then_fsync,
    }
    times = harness.side_by_side(methods, reps, seed=seed, setup=lambda name: (harness.remove(path), harness.settle()))
    results = harness.summaries(times)
    results["  of which fsync"] = harness.summary(fsync_times[1:])  # without the warm-up
    harness.rows(f"   Where the time of a save goes ({size / harness.MiB:.0f} MiB)", results, None)
    harness.remove(path)
    return {"results": results}


def run(args, results):
    size = size_of(args)
    results["save"] = durable_save(args.directory, size, args.reps, args.seed)
    results["save_breakdown"] = breakdown(args.directory, size, args.reps, args.seed)


def summarize(results):
    if "save" in results:
        harness.target_line("durable save throughput / paced raw write + fsync", results["save"]["throughput_vs_raw"][EIO],
                            0.95, minima=results["save"]["throughput_vs_raw_of_minima"][EIO])
        save = results["save"]["results"]
        harness.target_line("atomic_save time / save_payloads time", save[ATOMIC]["median"] / save[EIO]["median"], 1.1,
                            better="lower")
