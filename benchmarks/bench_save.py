"""1. Durable save of a state of 64 float32 tensors (1 GiB; --quick: 64 MiB).

experiment_io (atomic write, digest, fsync) vs raw write+fsync of the same bytes vs
torch.save+fsync vs torch.save; then where the time of a save goes (torch.save's
CRC-32, the digest, the copy to the page cache, the fsync).
"""
import os
import shutil
import time

import torch
import xxhash

import harness
from experiment_io import storage
from experiment_io.generations import RunWriter, previous_name
from experiment_io.payloads import LAST_NAME, save_payload, save_payloads
from fixtures import make_state, state_nbytes, state_payload

NAME = "save"
RAW = "raw write + fsync of the tensor bytes"
EIO = "experiment_io: atomic_write(save_payload) (digest, fsync)"


def size_of(args):
    return (64 if args.quick else 1024) * harness.MiB


def _write_tensors(fd, state):
    for t in state.values():
        view = memoryview(t.numpy()).cast("B")
        while view:
            view = view[os.write(fd, view):]


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
        file_size.append(storage.atomic_write(paths["eio"], lambda f: save_payload(payload, f)).size)

    def tsave(fsync=True):
        with open(paths["tsave" if fsync else "tsave-nofsync"], "wb") as f:
            torch.save(payload, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    methods = {
        RAW: raw,
        EIO: eio,
        "experiment_io: save_payloads (+ generation, manifest)": lambda: save_payloads(writer, {LAST_NAME: payload}),
        "torch.save + fsync": tsave,
        "torch.save (no fsync)": lambda: tsave(False),
    }

    def setup(name):
        # every file of the section goes before each save: the page cache does not grow from one
        # measurement to the next, and each save finds the memory the previous one freed
        harness.remove(*paths.values(), writer.path(LAST_NAME), writer.path(previous_name(LAST_NAME)))
        harness.settle()

    results = harness.summaries(harness.side_by_side(methods, reps, seed=seed, setup=setup))
    harness.rows(f"1. Durable save of {n_tensors} float32 tensors, {nbytes / harness.MiB:.0f} MiB "
                 "(throughput relative to raw write + fsync; >= 0.9 is the target)",
                 results, RAW, nbytes=nbytes, ratio="throughput")
    harness.remove(*paths.values())
    shutil.rmtree(writer.directory, ignore_errors=True)
    raw_r = results[RAW]
    return {"state_bytes": nbytes, "file_bytes": file_size[-1], "results": results,
            "throughput_vs_raw": {name: raw_r["median"] / s["median"] for name, s in results.items()},
            "throughput_vs_raw_of_minima": {name: raw_r["min"] / s["min"] for name, s in results.items()}}


class _Null:
    """A file object that throws its bytes away."""

    def write(self, data):
        return len(memoryview(data).cast("B"))

    def flush(self):
        pass


def breakdown(directory, size, reps, seed):
    """Where the time of a save goes: serialization with/without CRC, hashing, copy to page cache, fsync.

    experiment_io always writes torch's CRC-32; the CRC-off row measures torch.save
    itself (the setting is changed for that call only, and restored).
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
        "torch.save to a null sink, CRC-32 on (as experiment_io)": lambda: serialize(True),
        "torch.save to a null sink, CRC-32 off": lambda: serialize(False),
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
        harness.target_line("durable save throughput / raw write + fsync", results["save"]["throughput_vs_raw"][EIO],
                            0.9, minima=results["save"]["throughput_vs_raw_of_minima"][EIO])
