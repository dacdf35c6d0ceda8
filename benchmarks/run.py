"""Benchmarks of experiment_io's saves and loads against plain torch and raw I/O.

    python benchmarks/run.py            # full sizes (a few minutes)
    python benchmarks/run.py --quick    # small sizes (under a minute; loads measured in-process)
    python benchmarks/run.py --dir /scratch/me --reps 7 --only save,async

Each section runs its methods side by side: every repetition runs every method
once, in turn, so that all methods see the same state of the machine; a warm-up
round comes first and is not counted. A table gives, per method, the median of the
repetitions with their min and max, and the ratio that the section is about. The
results, with the machine they were measured on, are also written as JSON to
``benchmarks/results/<date>-<full|quick>.json`` (or ``--json``).

Sections:

save      durable save of a state of 64 float32 tensors (1 GiB; --quick: 64 MiB)
          through experiment_io (atomic write, digest, fsync) vs raw write+fsync of the
          same bytes vs torch.save+fsync vs torch.save
async     time the training loop is blocked by one checkpoint with async_save vs a
          synchronous save of the same state
load      load_model_from_cwd() and load_checkpoint_from_cwd() (verification
          included) vs torch.load(mmap=True) + touching every element, and vs plain
          torch.load; warm (page cache) and cold (page cache dropped) vs a raw read
small     a small scientific model checkpointed every epoch (last + best): cost per
          epoch vs the same dicts saved with torch.save, and as a fraction of the epoch
many      5,000 tensors of 1,000 float32: save and load time per tensor vs torch
memory    peak extra memory (RSS) of a sync save, an async save and the loads, as a
          fraction of the state's size, each measured in a fresh subprocess
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from experiment_io import Evaluator, SetupParams, TrainingModules, setup_training, storage, train_model  # noqa: E402
from experiment_io import format as fmt  # noqa: E402
from experiment_io.asynchronous import BackgroundSaver, with_own_memory  # noqa: E402
from experiment_io.checkpoint import (  # noqa: E402
    BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, RunWriter, TrainingPosition, checkpoint_payload,
    model_payload, save_payload, structure_payload,
)
from experiment_io.databases import Database  # noqa: E402
from experiment_io.serialization import load_checkpoint_from_cwd, load_model_from_cwd  # noqa: E402

from bench_models import BigModel, SmallNet  # noqa: E402  (importable, so that the trust gate admits them)

MiB = 1024 * 1024
SECTIONS = ("save", "async", "load", "small", "many", "memory")


# --- measuring ------------------------------------------------------------------------


def make_state(n_tensors, tensor_bytes):
    """``{"t0": ..., ...}``: float32 tensors of ``tensor_bytes`` each, every element written."""
    return {f"t{i}": torch.full((tensor_bytes // 4,), float(i + 1)) for i in range(n_tensors)}


def state_nbytes(state):
    return sum(t.nbytes for t in state.values())


def settle():
    """Flush dirty pages, so that one measurement does not pay for the previous one's writeback."""
    os.sync()


def remove(*paths):
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def drop_page_cache(paths):
    """Evict ``paths`` from the page cache; return how.

    ``posix_fadvise(DONTNEED)`` on each file (it drops clean pages, which fsynced
    checkpoint files are, and leaves the rest of the machine's cache alone); where
    that is not available, ``/proc/sys/vm/drop_caches`` if writable.
    """
    os.sync()
    if hasattr(os, "posix_fadvise"):
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        return None


def steady_allocator():
    """Put the C allocator in the state of a process that has run for a while.

    glibc serves large blocks with fresh memory maps until a freed block raises its
    threshold (up to 32 MiB); afterwards blocks up to that size come from memory the
    process already holds. Depending on which section runs first, the same load
    would otherwise run with fresh pages (page faults on every byte) or not. Here
    the threshold is raised once, at the start; fresh-process figures are measured
    separately (sections load and memory).
    """
    block = torch.empty(32 * MiB, dtype=torch.uint8)
    del block


def interleaved(methods, reps, *, setup=None, warmup=True):
    """Time each method ``reps`` times, the methods in turn within each repetition.

    The order rotates from one repetition to the next, so that no method always
    follows the same one (a method that leaves work for the machine, e.g. dirty
    pages, would otherwise always slow down the same next one).

    :param methods: ``{name: fn}``; ``fn()`` is timed (``setup(name)`` before it is not).
    :return: ``{name: [seconds, ...]}``.
    """
    times = {name: [] for name in methods}
    names = list(methods)
    for rep in range(-1 if warmup else 0, reps):
        shift = max(rep, 0) % len(names)
        for name in names[shift:] + names[:shift]:
            fn = methods[name]
            if setup is not None:
                setup(name)
            started = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - started
            if rep >= 0:
                times[name].append(elapsed)
    return times


def summary(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": samples}


def touch(tensors):
    """Read every element (sum) of every tensor (meta tensors have none)."""
    total = 0.0
    for t in tensors:
        if t.device.type != "meta":
            total += float(t.sum())
    return total


def rows(title, results, baseline, *, nbytes=None, ratio="time", scale=1.0):
    """Print a table of ``results`` (``{name: summary}``) with ratios to ``baseline``.

    :param scale: multiplies the times printed (e.g. ``1e6`` for microseconds).
    """
    print(f"\n{title}")
    header = f"  {'method':58s} {'median':>9s} {'min':>9s} {'max':>9s}"
    header += f" {'GB/s':>7s}" if nbytes else ""
    header += f" {'vs ' + baseline if baseline else '':>18s}"
    print(header)
    base = results[baseline]["median"] if baseline else None
    for name, s in results.items():
        line = f"  {name:58s} {s['median'] * scale:9.4f} {s['min'] * scale:9.4f} {s['max'] * scale:9.4f}"
        if nbytes:
            line += f" {nbytes / s['median'] / 1e9:7.2f}"
        if base:
            value = base / s["median"] if ratio == "throughput" else s["median"] / base
            line += f" {value:17.3f}x"
        print(line)


# --- 1. durable save --------------------------------------------------------------------


def bench_save(directory, size, reps):
    n_tensors, tensor_bytes = 64, size // 64
    state = make_state(n_tensors, tensor_bytes)
    payload = {fmt.HEADER_KEY: fmt.make_header("model", epochs_done=0, step=0), "model": state}
    nbytes = state_nbytes(state)
    paths = {name: os.path.join(directory, f"save-{i}.pt") for i, name in enumerate(
        ["raw", "eio", "eio-writer", "tsave", "tsave-nofsync"])}
    writer = RunWriter(os.path.join(directory, "save-run"))

    def raw():
        fd = os.open(paths["raw"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in state.values():
                view = memoryview(t.numpy()).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    file_size = []

    def eio():
        file_size.append(storage.atomic_write(paths["eio"], lambda f: save_payload(payload, f)).size)

    def eio_writer():
        writer.save({LAST_NAME: payload})

    def tsave(fsync=True):
        path = paths["tsave" if fsync else "tsave-nofsync"]
        with open(path, "wb") as f:
            torch.save(payload, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    methods = {
        "raw write + fsync of the tensor bytes": raw,
        "experiment_io: atomic_write(save_payload) (digest, fsync)": eio,
        "experiment_io: RunWriter.save (+ generation, manifest)": eio_writer,
        "torch.save + fsync": tsave,
        "torch.save (no fsync)": lambda: tsave(False),
    }

    def setup(name):
        # every file of the section goes before each save: the page cache does not grow from one
        # measurement to the next, and each save finds the memory the previous one freed
        remove(*paths.values(), writer.path(LAST_NAME), writer.path(storage.previous_name(LAST_NAME)))
        settle()

    times = interleaved(methods, reps, setup=setup)
    results = {name: summary(t) for name, t in times.items()}
    rows(f"1. Durable save of {n_tensors} float32 tensors, {nbytes / MiB:.0f} MiB "
         "(throughput relative to raw write + fsync; >= 0.9 is the target)",
         results, "raw write + fsync of the tensor bytes", nbytes=nbytes, ratio="throughput")
    file_size = file_size[-1]
    for path in paths.values():
        remove(path)
    shutil.rmtree(writer.directory, ignore_errors=True)
    raw = results["raw write + fsync of the tensor bytes"]
    return {"state_bytes": nbytes, "file_bytes": file_size, "results": results,
            "throughput_vs_raw": {name: raw["median"] / s["median"] for name, s in results.items()},
            "throughput_vs_raw_of_minima": {name: raw["min"] / s["min"] for name, s in results.items()}}


def breakdown(directory, size, reps):
    """Where the time of a save goes: serialization with/without CRC, hashing, copy to page cache, fsync."""
    state = make_state(64, size // 64)

    class Null:
        def write(self, data):
            return len(memoryview(data).cast("B"))

        def flush(self):
            pass

    def serialize(crc):
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(crc)
        try:
            torch.save(state, Null())
        finally:
            torch.serialization.set_crc32_options(before)

    import xxhash

    def digest():
        h = xxhash.xxh3_128()
        for t in state.values():
            h.update(memoryview(t.numpy()).cast("B"))

    path = os.path.join(directory, "breakdown.bin")
    fsync_times = []

    def write_then_fsync():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for t in state.values():
            view = memoryview(t.numpy()).cast("B")
            while view:
                view = view[os.write(fd, view):]
        started = time.perf_counter()
        os.fsync(fd)
        fsync_times.append(time.perf_counter() - started)
        os.close(fd)

    methods = {
        "torch.save to a null sink, CRC-32 on (torch's default)": lambda: serialize(True),
        "torch.save to a null sink, CRC-32 off (experiment_io)": lambda: serialize(False),
        "xxh3-128 digest of the bytes": digest,
        "write to the page cache + fsync": write_then_fsync,
    }
    times = interleaved(methods, reps, setup=lambda name: (remove(path), settle()))
    fsync_times = fsync_times[1:]  # without the warm-up
    results = {name: summary(t) for name, t in times.items()}
    results["  of which fsync"] = summary(fsync_times)
    rows(f"   Where the time of a save goes ({size / MiB:.0f} MiB)", results, None)
    remove(path)
    return {"results": results}


# --- 2. asynchronous save -----------------------------------------------------------------


class _Step:
    """One training step of a model whose parameters are the benchmark's state.

    ``n`` bias-free linear layers of ``width`` x ``width`` float32 (16 MiB each at
    width 2048), SGD with momentum (its buffers are state too). :meth:`forward_backward`
    computes the next batch's gradients (it changes no parameter), :meth:`update`
    is the optimizer step.
    """

    def __init__(self, n, width, batch=4):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n)])
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-6, momentum=0.9)
        self.x = torch.randn(batch, width)
        self.forward_backward()
        self.update()  # the momentum buffers exist from here on

    def forward_backward(self):
        self.optimizer.zero_grad(set_to_none=False)
        self.model(self.x).square().mean().backward()

    def update(self):
        self.optimizer.step()

    def payload(self):
        return {fmt.HEADER_KEY: fmt.make_header("model", epochs_done=0, step=0),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def deferred(self):
        return list(self.model.parameters()) + [v for s in self.optimizer.state.values() for v in s.values()
                                                if isinstance(v, torch.Tensor)]


def bench_async(directory, size, reps):
    """Sync save vs the two asynchronous modes, in the loop of a model whose state is ``size`` bytes.

    The state is the parameters plus SGD's momentum: ``size`` / 2 of each.
    """
    width = 2048 if size >= 256 * MiB else 512
    n = max(1, size // 2 // (width * width * 4))
    step = _Step(n, width)
    nbytes = sum(t.nbytes for t in step.deferred())
    sync_writer = RunWriter(os.path.join(directory, "sync-run"))
    savers = {mode: BackgroundSaver(RunWriter(os.path.join(directory, f"async-{mode}-run"))) for mode in ("copy", "overlap")}
    first = {}
    for mode, saver in savers.items():  # the first save allocates the staging buffers
        started = time.perf_counter()
        saver.save({LAST_NAME: step.payload()}, defer=step.deferred() if mode == "overlap" else ())
        saver.staged()
        first[mode] = time.perf_counter() - started
        saver.wait()
    compute_alone, compute_during, background = [], [], []
    blocked = {"copy": [], "overlap": [], "overlap_staged_wait": []}

    def training_step():
        started = time.perf_counter()
        step.forward_backward()
        return time.perf_counter() - started

    def sync():
        sync_writer.save({LAST_NAME: step.payload()})

    def without_save():  # the step alone, for the compute time it takes undisturbed
        compute_alone.append(training_step())
        step.update()

    def async_copy():
        saver = savers["copy"]
        started = time.perf_counter()
        saver.save({LAST_NAME: step.payload()})
        blocked["copy"].append(time.perf_counter() - started)

    def async_overlap():
        # what train_model does: save, compute the next batch, wait (if needed) before the optimizer step
        saver = savers["overlap"]
        started = time.perf_counter()
        saver.save({LAST_NAME: step.payload()}, defer=step.deferred())
        call = time.perf_counter() - started
        compute_during.append(training_step())
        started = time.perf_counter()
        saver.staged()
        wait = time.perf_counter() - started
        step.update()
        blocked["overlap"].append(call + wait)
        blocked["overlap_staged_wait"].append(wait)

    def setup(name):
        for saver in savers.values():
            if saver.in_flight:
                saver.wait()
                background.append(saver.written_s)
        for writer in [sync_writer] + [saver.writer for saver in savers.values()]:
            remove(writer.path(LAST_NAME), writer.path(storage.previous_name(LAST_NAME)))
        settle()

    times = interleaved({"sync": sync, "step": without_save, "copy": async_copy, "overlap": async_overlap}, reps,
                        setup=setup, warmup=False)
    setup(None)
    results = {
        "synchronous save (RunWriter.save)": summary(times["sync"]),
        "'copy': blocked (copy of the whole state)": summary(blocked["copy"]),
        "True: blocked (call + wait before step)": summary(blocked["overlap"]),
        "True: of which the wait before step": summary(blocked["overlap_staged_wait"]),
        "background copy + write (not blocking)": summary(background),
        "True: first save, blocked (allocates)": summary([first["overlap"]]),
    }
    rows(f"2. Time the training loop is blocked by one checkpoint of {nbytes / MiB:.0f} MiB "
         f"({n} linear layers {width}x{width} + SGD momentum; relative to a synchronous save; <= 0.15 is the target)",
         results, "synchronous save (RunWriter.save)", nbytes=nbytes)
    alone, during = statistics.median(compute_alone), statistics.median(compute_during)
    print(f"   the next batch's forward + backward pass: {alone:.3f} s alone, {during:.3f} s while the background "
          f"thread copies and writes (+{during - alone:.3f} s)")
    for saver in savers.values():
        shutil.rmtree(saver.writer.directory, ignore_errors=True)
    shutil.rmtree(sync_writer.directory, ignore_errors=True)
    sync_r = results["synchronous save (RunWriter.save)"]
    overlap_r = results["True: blocked (call + wait before step)"]
    copy_r = results["'copy': blocked (copy of the whole state)"]
    return {"state_bytes": nbytes, "staging_bytes": savers["overlap"].staging.nbytes, "results": results,
            "blocked_vs_sync": overlap_r["median"] / sync_r["median"],
            "blocked_vs_sync_of_minima": overlap_r["min"] / sync_r["min"],
            "copy_blocked_vs_sync": copy_r["median"] / sync_r["median"],
            "compute_alone_s": alone, "compute_during_background_s": during,
            "slowdown_vs_sync": (during - alone) / sync_r["median"]}


# --- 3. loads ---------------------------------------------------------------------------------


def build_run(directory, size):
    """A run directory as train_model leaves it for a model of ``size`` bytes.

    Files: the structure (the objects, without the weights), the last checkpoint
    (model, SGD controller, the best model state in the metric tracker) and
    best_model.pt.
    """
    model = BigModel(64, size // 64 // 4)
    evaluator = Evaluator(model, {"mse": torch.nn.MSELoss()})
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                                             SetupParams(stopping_key="mse", batch_size=1, max_epochs=1,
                                                         optimizer=torch.optim.SGD))
    writer = RunWriter(directory)
    writer.save({STRUCTURE_NAME: structure_payload(tm, controller, None)})
    digest = writer.record(STRUCTURE_NAME)["digest"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    tracker.register_metrics({"train": {"loss": 1.0}, "valid": {"mse": 1.0}}, 0, epoch_time=1.0)
    tracker.record_best_model(model)
    controller.push_epoch(0, True, 1.0)
    database = Database({"x": torch.zeros(4, 1).numpy(), "y": torch.zeros(4, 1).numpy()}, ["x"], ["y"], 0, 0.25, 0.25)
    position = TrainingPosition(epoch=1, step=1)
    payload = checkpoint_payload(tm, controller, tracker, database, position, digest)
    writer.save({LAST_NAME: payload, BEST_MODEL_NAME: model_payload(payload["model"], 1, 1, digest, "cpu")})
    return database


def _tiny_database():
    return Database({"x": torch.zeros(4, 1).numpy(), "y": torch.zeros(4, 1).numpy()}, ["x"], ["y"], 0, 0.25, 0.25)


def _load_methods(run):
    """The load methods, each a function of nothing, for the run directory ``run``."""
    files = {name: os.path.join(run, name) for name in (STRUCTURE_NAME, LAST_NAME, BEST_MODEL_NAME)}

    def our_model():
        model = load_model_from_cwd(directory=run)
        touch(model.state_dict().values())

    def our_checkpoint():
        load_checkpoint_from_cwd(directory=run, database=_tiny_database(), restore_rng=False)

    def mmap_touch(*names):
        for name in names:
            touch(tensors_of(torch.load(files[name], mmap=True, weights_only=name != STRUCTURE_NAME)))

    def plain(*names):
        for name in names:
            torch.load(files[name], weights_only=name != STRUCTURE_NAME)

    def raw_read(*names):
        buffer = bytearray(4 * MiB)
        for name in names:
            with open(files[name], "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass

    return {
        "load_model_from_cwd() + touch": our_model,
        "torch.load(best_model.pt, mmap=True) + touch": lambda: mmap_touch(BEST_MODEL_NAME),
        "torch.load(mmap=True) + touch, structure and best_model": lambda: mmap_touch(STRUCTURE_NAME, BEST_MODEL_NAME),
        "torch.load(structure) + torch.load(best_model) (plain)": lambda: plain(STRUCTURE_NAME, BEST_MODEL_NAME),
        "raw read of structure + best_model": lambda: raw_read(STRUCTURE_NAME, BEST_MODEL_NAME),
        "load_checkpoint_from_cwd()": our_checkpoint,
        "torch.load(structure) + torch.load(last) (plain)": lambda: plain(STRUCTURE_NAME, LAST_NAME),
        "torch.load(mmap=True) + touch, structure and last": lambda: mmap_touch(STRUCTURE_NAME, LAST_NAME),
        "raw read of structure + last": lambda: raw_read(STRUCTURE_NAME, LAST_NAME),
    }


def load_child(method, run):
    """Time one load method in this fresh process; print the seconds as JSON.

    ``torch._dynamo`` is imported first, outside the timing: the first call of an
    optimizer's ``load_state_dict`` in a process imports it (about 1 s here), which
    any resume pays whatever it loads with, and which would hide the I/O.
    """
    import torch._dynamo  # noqa: F401
    fn = _load_methods(run)[method]
    started = time.perf_counter()
    fn()
    print(json.dumps({"seconds": time.perf_counter() - started}))


def bench_load(directory, size, reps, *, fresh_processes=True):
    """Each load runs in a fresh process, as a restart script or a prediction script does.

    In one long process the figures depend on the C allocator's state (whether the
    memory of the loaded tensors is fresh, page-faulted byte by byte, or memory the
    process already holds), which earlier measurements change. A fresh process is
    the state in which a restart loads its checkpoint. With ``fresh_processes=False``
    (``--quick``) the loads run in this process instead, which is faster to measure.
    """
    run = os.path.join(directory, "load-run")
    build_run(run, size)
    sizes = {name: os.path.getsize(os.path.join(run, name)) for name in (STRUCTURE_NAME, LAST_NAME, BEST_MODEL_NAME)}
    if not fresh_processes:
        import torch._dynamo  # noqa: F401  (see load_child)
        in_process = _load_methods(run)

    def child(method):
        if not fresh_processes:
            def run_here():
                started = time.perf_counter()
                in_process[method]()
                child.times.setdefault(method, []).append(time.perf_counter() - started)
            return run_here

        def run_child():
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "load", "--method", method,
                                  "--dir", run], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"load child {method!r} failed:\n{out.stderr[-3000:]}")
            elapsed = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
            child.times.setdefault(method, []).append(elapsed)
        return run_child

    def timed(methods, reps, setup=None, warmup=True):
        child.times = {}
        interleaved({m: child(m) for m in methods}, reps, setup=setup, warmup=warmup)
        count = reps + (1 if warmup else 0)
        return {m: summary(child.times[m][-reps:]) for m in methods if len(child.times[m]) == count}

    model_methods = ["load_model_from_cwd() + touch", "torch.load(best_model.pt, mmap=True) + touch",
                     "torch.load(mmap=True) + touch, structure and best_model",
                     "torch.load(structure) + torch.load(best_model) (plain)"]
    checkpoint_methods = ["load_checkpoint_from_cwd()", "torch.load(structure) + torch.load(last) (plain)",
                          "torch.load(mmap=True) + touch, structure and last"]
    results = {"warm_model": timed(model_methods, reps, warmup=False)}  # build_run left the files in the page cache
    where = "fresh process" if fresh_processes else "in this process"
    rows(f"3a. Load the best model, warm page cache, {where}; structure {sizes[STRUCTURE_NAME] / MiB:.0f} MiB, "
         f"best_model.pt {sizes[BEST_MODEL_NAME] / MiB:.0f} MiB (target: <= 1.1 x mmap + touch)",
         results["warm_model"], "torch.load(best_model.pt, mmap=True) + touch")
    results["warm_checkpoint"] = timed(checkpoint_methods, reps, warmup=False)
    rows(f"3b. Load the last checkpoint, warm page cache, {where}; last_checkpoint.pt {sizes[LAST_NAME] / MiB:.0f} MiB"
         " (model + best model state) (target: <= 1.2 x plain torch.loads of its files)",
         results["warm_checkpoint"], "torch.load(structure) + torch.load(last) (plain)")

    how = {}

    def cold(names):
        def setup(name):
            how["method"] = drop_page_cache([os.path.join(run, n) for n in names])
        return setup

    cold_reps = 2
    results["cold_model"] = timed(model_methods[:2] + ["raw read of structure + best_model"], cold_reps,
                                  setup=cold([STRUCTURE_NAME, BEST_MODEL_NAME]), warmup=False)
    rows("3c. Load the best model, cold (the run's files dropped from the page cache before each)",
         results["cold_model"], "raw read of structure + best_model")
    results["cold_checkpoint"] = timed(checkpoint_methods[:2] + ["raw read of structure + last"], cold_reps,
                                       setup=cold([STRUCTURE_NAME, LAST_NAME]), warmup=False)
    rows("3d. Load the last checkpoint, cold", results["cold_checkpoint"], "raw read of structure + last")
    print(f"   page cache dropped with {how.get('method')}")
    shutil.rmtree(run, ignore_errors=True)
    wm, wc = results["warm_model"], results["warm_checkpoint"]
    ratios = {
        "model_vs_mmap_touch_best_model": wm["load_model_from_cwd() + touch"]["median"]
        / wm["torch.load(best_model.pt, mmap=True) + touch"]["median"],
        "model_vs_mmap_touch_structure_and_best_model": wm["load_model_from_cwd() + touch"]["median"]
        / wm["torch.load(mmap=True) + touch, structure and best_model"]["median"],
        "model_vs_plain_loads": wm["load_model_from_cwd() + touch"]["median"]
        / wm["torch.load(structure) + torch.load(best_model) (plain)"]["median"],
        "checkpoint_vs_plain_loads": wc["load_checkpoint_from_cwd()"]["median"]
        / wc["torch.load(structure) + torch.load(last) (plain)"]["median"],
    }
    return {"file_bytes": sizes, "cold_method": how.get("method"), "results": results, "ratios": ratios}


def tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


# --- 4. a small scientific model -----------------------------------------------------------------


def small_experiment(seed=0, n=8192):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    y = torch.sin(x).sum(dim=1, keepdim=True)
    database = Database({"x": x.numpy(), "y": y.numpy()}, ["x"], ["y"], seed, 0.1, 0.1)
    model = SmallNet()
    evaluator = Evaluator(model, {"mse": torch.nn.MSELoss(), "mae": torch.nn.L1Loss()}, batch_size=1024)
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                                             SetupParams(stopping_key="mse", batch_size=64, max_epochs=10**6,
                                                         optimizer=torch.optim.Adam))
    return database, tm, controller, tracker


def bench_small(directory, epochs, reps):
    database, tm, controller, tracker = small_experiment()
    n_params = sum(p.numel() for p in tm.model.parameters())
    # train a few epochs so that Adam's state and a best model exist, as in a real run
    controller.max_epochs = 2
    train_model(tm, database, controller, tracker, None, None, quiet=True, directory=os.path.join(directory, "small-warm"))
    run = os.path.join(directory, "small-run")
    writer = RunWriter(run)
    writer.save({STRUCTURE_NAME: structure_payload(tm, controller, None)})
    digest = writer.record(STRUCTURE_NAME)["digest"]
    position = TrainingPosition(epoch=controller.current_epoch, step=100)
    payload = checkpoint_payload(tm, controller, tracker, database, position, digest)
    files = {LAST_NAME: payload, BEST_NAME: payload,
             BEST_MODEL_NAME: model_payload(payload["model"], position.epoch, position.step, digest, "cpu")}
    n_tensors = sum(1 for _ in tensors_of(payload))
    plain_dir = os.path.join(directory, "small-plain")
    os.makedirs(plain_dir, exist_ok=True)

    def plain(fsync):
        for name, p in files.items():
            with open(os.path.join(plain_dir, name), "wb") as f:
                torch.save(p, f)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())

    saver = BackgroundSaver(RunWriter(os.path.join(directory, "small-async")))

    def async_blocked():
        saver.wait()
        started = time.perf_counter()
        saver.save(files)
        return time.perf_counter() - started

    blocked = []
    methods = {
        "experiment_io sync save: last + best + best_model + manifest": lambda: writer.save(files),
        "torch.save of the same dicts (no fsync)": lambda: plain(False),
        "torch.save of the same dicts + fsync each": lambda: plain(True),
        "async_save: loop blocked (staging) [+ wait for the previous]": lambda: blocked.append(async_blocked()),
    }
    times = interleaved(methods, reps, setup=lambda name: None)
    saver.wait()
    results = {name: summary(t) for name, t in times.items()}
    results["async_save: loop blocked (staging only)"] = summary(blocked[-reps:])

    # epoch time of the same experiment, with a checkpoint every epoch (train_model, sync and async)
    walls, epoch_times = {"sync": [], "async": []}, {"sync": [], "async": []}

    def train_run(mode):
        def run():
            database2, tm2, controller2, tracker2 = small_experiment()
            controller2.max_epochs = epochs
            where = os.path.join(directory, f"small-train-{mode}")
            shutil.rmtree(where, ignore_errors=True)
            started = time.perf_counter()
            train_model(tm2, database2, controller2, tracker2, None, None, quiet=True, async_save=mode == "async",
                        directory=where)
            walls[mode].append((time.perf_counter() - started) / epochs)
            epoch_times[mode].append(statistics.median(tracker2.epoch_times))
        return run

    interleaved({"sync": train_run("sync"), "async": train_run("async")}, max(3, reps // 2), warmup=False)
    epoch_runs = {mode: {"wall_per_epoch_s": statistics.median(walls[mode]),
                         "epoch_time_s": statistics.median(epoch_times[mode])} for mode in walls}
    epoch_time = epoch_runs["sync"]["epoch_time_s"]
    rows(f"4. Small model ({n_params} parameters, {n_tensors} tensors per checkpoint): checkpoint cost per epoch "
         f"(epoch of {len(database.splits['train'])} samples: {epoch_time * 1e3:.1f} ms)", results,
         "torch.save of the same dicts (no fsync)")
    fractions = {name: s["median"] / epoch_time for name, s in results.items()}
    for name, fraction in fractions.items():
        print(f"   {name}: {100 * fraction:.1f} % of the epoch time")
    for mode, values in epoch_runs.items():
        print(f"   train_model, {mode} saves: {values['wall_per_epoch_s'] * 1e3:.1f} ms per epoch (wall, save included), "
              f"{values['epoch_time_s'] * 1e3:.1f} ms training + evaluation")
    for path in ("small-warm", "small-run", "small-plain", "small-async", "small-train-sync", "small-train-async"):
        shutil.rmtree(os.path.join(directory, path), ignore_errors=True)
    return {"parameters": n_params, "tensors_per_checkpoint": n_tensors, "epoch_time_s": epoch_time,
            "results": results, "fraction_of_epoch": fractions, "train_model": epoch_runs}


# --- 5. many small tensors -----------------------------------------------------------------------


def bench_many(directory, n, reps):
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(n)}
    payload = {fmt.HEADER_KEY: fmt.make_header("model", epochs_done=0, step=0), "model": state}
    writer = RunWriter(os.path.join(directory, "many-run"))
    path = writer.path(LAST_NAME)
    plain_path = os.path.join(directory, "many-plain.pt")

    def tsave(fsync):
        with open(plain_path, "wb") as f:
            torch.save(payload, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    def our_load():
        verifier = storage.Verifier(writer.directory, writer.files)
        assert verifier.matches(path, writer.files[LAST_NAME])
        with_own_memory(torch.load(path, weights_only=True, mmap=True))

    saves = {
        "experiment_io RunWriter.save (digest, fsync, manifest)": lambda: writer.save({LAST_NAME: payload}),
        "torch.save (no fsync)": lambda: tsave(False),
        "torch.save + fsync": lambda: tsave(True),
    }
    save_times = interleaved(saves, reps, setup=lambda name: settle())
    loads = {
        "experiment_io load path (verify, mmap, own memory)": our_load,
        "torch.load (plain)": lambda: torch.load(plain_path, weights_only=True),
        "torch.load(mmap=True)": lambda: torch.load(plain_path, weights_only=True, mmap=True),
    }
    load_times = interleaved(loads, reps)
    results = {"save": {k: summary([t / n for t in v]) for k, v in save_times.items()},
               "load": {k: summary([t / n for t in v]) for k, v in load_times.items()}}
    rows(f"5a. {n} tensors of 1,000 float32: save time per tensor (microseconds)", results["save"],
         "torch.save (no fsync)", scale=1e6)
    rows(f"5b. {n} tensors of 1,000 float32: load time per tensor (microseconds)", results["load"],
         "torch.load (plain)", scale=1e6)
    shutil.rmtree(writer.directory, ignore_errors=True)
    remove(plain_path)
    return {"tensors": n, "results": results}


# --- 6. memory ------------------------------------------------------------------------------------


def _statm():
    with open("/proc/self/statm") as f:
        size, resident, shared = (int(x) for x in f.read().split()[:3])
    page = os.sysconf("SC_PAGE_SIZE")
    return resident * page, (resident - shared) * page


class PeakSampler:
    """Samples the process's RSS (total, and anonymous = resident - file-backed) in a thread."""

    def __init__(self, interval=0.0005):
        self.interval, self.peak_total, self.peak_anon = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total, anon = _statm()
            self.peak_total, self.peak_anon = max(self.peak_total, total), max(self.peak_anon, anon)
            time.sleep(self.interval)

    def __enter__(self):
        self.before_total, self.before_anon = _statm()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        total, anon = _statm()
        self.peak_total, self.peak_anon = max(self.peak_total, total), max(self.peak_anon, anon)


def memory_child(kind, directory, size):
    """Run one operation in this (fresh) process; print its peak extra RSS as JSON."""
    torch.set_num_threads(2)
    if kind in ("sync", "async"):
        state = make_state(64, size // 64)
        payload = {fmt.HEADER_KEY: fmt.make_header("model", epochs_done=0, step=0), "model": state}
        writer = RunWriter(directory)
        saver = BackgroundSaver(writer) if kind == "async" else None
        with PeakSampler() as peak:
            if saver is None:
                writer.save({LAST_NAME: payload})
            else:
                saver.save({LAST_NAME: payload})
                saver.wait()
    else:
        database = _tiny_database()
        with PeakSampler() as peak:
            if kind == "load_model":
                load_model_from_cwd(directory=directory)
            else:
                load_checkpoint_from_cwd(directory=directory, database=database, restore_rng=False)
    print(json.dumps({"before_total": peak.before_total, "before_anon": peak.before_anon,
                      "peak_total": peak.peak_total, "peak_anon": peak.peak_anon}))


def bench_memory(directory, size):
    results = {}

    def child(kind, where):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--dir", where,
                              "--size", str(size)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    for kind in ("sync", "async"):
        where = os.path.join(directory, f"memory-{kind}")
        os.makedirs(where, exist_ok=True)
        results[kind] = child(kind, where)
        shutil.rmtree(where, ignore_errors=True)
    run = os.path.join(directory, "memory-load")
    build_run(run, size)
    for kind in ("load_model", "load_checkpoint"):
        results[kind] = child(kind, run)
    shutil.rmtree(run, ignore_errors=True)
    print(f"\n6. Peak extra memory (RSS) as a fraction of the state ({size / MiB:.0f} MiB), each in a fresh process")
    print(f"  {'operation':58s} {'anonymous':>10s} {'total RSS':>10s}")
    names = {"sync": "synchronous save", "async": "async_save (staging copy + background write)",
             "load_model": "load_model_from_cwd()",
             "load_checkpoint": "load_checkpoint_from_cwd() (last holds 2 states)"}
    fractions = {}
    for kind, r in results.items():
        anon = (r["peak_anon"] - r["before_anon"]) / size
        total = (r["peak_total"] - r["before_total"]) / size
        fractions[kind] = {"anonymous": anon, "total": total}
        print(f"  {names[kind]:58s} {anon:10.3f} {total:10.3f}")
    print("   anonymous = resident - file-backed pages (copies made by the process); total RSS also counts\n"
          "   memory-mapped file pages while they are mapped. A load keeps what it returns: the model (1 state)\n"
          "   and, for load_checkpoint_from_cwd, the best model state the checkpoint carries (1 state); about\n"
          "   67 MiB more, whatever the state's size (not a copy of a state).")
    return {"state_bytes": size, "raw": results, "fractions": fractions}


# --- the machine ---------------------------------------------------------------------------------


def machine(directory):
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 1024 ** 2, 1)
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with contextlib.suppress(OSError, ValueError):
        target = os.path.realpath(directory)
        best = ("", "", "")
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[1]):
                    best = (device, mount, fstype)
        info["disk"] = {"device": best[0], "mount": best[1], "filesystem": best[2]}
        name = os.path.basename(best[0])
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{name}/queue/rotational") as f:
                info["disk"]["rotational"] = f.read().strip() == "1"
    info["cuda"] = torch.cuda.is_available()
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (runs in well under a minute)")
    parser.add_argument("--dir", help="directory for the files (default: a temporary directory under /tmp); "
                                      "put it on the disk you want to measure")
    parser.add_argument("--reps", type=int, help="repetitions per method (default: 5, --quick: 3)")
    parser.add_argument("--only", help=f"comma-separated sections among {', '.join(SECTIONS)}")
    parser.add_argument("--json", help="where to write the results (default: benchmarks/results/<date>-<mode>.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "load":
        return load_child(args.method, args.dir)
    if args.child:
        return memory_child(args.child, args.dir, args.size)

    sections = args.only.split(",") if args.only else SECTIONS
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose among {SECTIONS}")
    reps = args.reps or (3 if args.quick else 5)
    size = 64 * MiB if args.quick else 1024 * MiB
    base = args.dir or "/tmp"
    os.makedirs(base, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="experiment_io-bench-", dir=base)
    steady_allocator()
    started = time.perf_counter()
    report = {"mode": "quick" if args.quick else "full", "reps": reps, "state_bytes": size,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(directory)}
    m = report["machine"]
    print(f"experiment_io benchmarks ({report['mode']}, {reps} repetitions, medians [min, max] in seconds)")
    print(f"machine: {m.get('cpus')} CPUs ({m.get('cpu', '?')}), {m.get('memory_gib', '?')} GiB, "
          f"torch {m['torch']}, CUDA {'yes' if m['cuda'] else 'no'}; files in {directory} on "
          f"{m.get('disk', {}).get('device', '?')} ({m.get('disk', {}).get('filesystem', '?')})")
    try:
        if "save" in sections:
            report["save"] = bench_save(directory, size, reps)
            report["save_breakdown"] = breakdown(directory, size, reps)
        if "async" in sections:
            report["async"] = bench_async(directory, size, reps)
        if "load" in sections:
            report["load"] = bench_load(directory, (128 if args.quick else 1024) * MiB, min(reps, 3),
                                        fresh_processes=not args.quick)
        if "small" in sections:
            report["small"] = bench_small(directory, 5 if args.quick else 10, reps if args.quick else 2 * reps)
        if "many" in sections:
            report["many"] = bench_many(directory, 1000 if args.quick else 5000, reps)
        if "memory" in sections:
            report["memory"] = bench_memory(directory, (64 if args.quick else 512) * MiB)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    print(f"\nSUMMARY ({report['seconds']:.0f} s)")
    summary_lines(report)
    path = args.json or os.path.join(HERE, "results", f"{datetime.date.today().isoformat()}-{report['mode']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"results written to {path}")
    return 0


def summary_lines(report):
    def line(text, value, target, better="higher", minima=None):
        met = value >= target if better == "higher" else value <= target
        extra = f", of minima {minima:.3f}" if minima is not None else ""
        print(f"  {text:68s} {value:7.3f}  (target {'>=' if better == 'higher' else '<='} {target}: "
              f"{'met' if met else 'MISSED'}{extra})")

    name = "experiment_io: atomic_write(save_payload) (digest, fsync)"
    if "save" in report:
        line("durable save throughput / raw write + fsync", report["save"]["throughput_vs_raw"][name], 0.9,
             minima=report["save"]["throughput_vs_raw_of_minima"][name])
    if "async" in report:
        line("async_save=True: loop blocked / synchronous save", report["async"]["blocked_vs_sync"], 0.15, "lower",
             minima=report["async"]["blocked_vs_sync_of_minima"])
        line("async_save='copy': loop blocked / synchronous save", report["async"]["copy_blocked_vs_sync"], 0.15,
             "lower")
        print(f"  {'async_save=True: slowdown of the overlapped step / synchronous save':68s} "
              f"{report['async']['slowdown_vs_sync']:7.3f}  (not a target: compute shared with the copy)")
    if "load" in report:
        r = report["load"]["ratios"]
        line("load_model_from_cwd / mmap + touch of best_model.pt", r["model_vs_mmap_touch_best_model"], 1.1, "lower")
        line("load_model_from_cwd / mmap + touch of structure + best_model.pt",
             r["model_vs_mmap_touch_structure_and_best_model"], 1.1, "lower")
        line("load_model_from_cwd / plain torch.load of structure + best_model.pt", r["model_vs_plain_loads"], 1.1,
             "lower")
        line("load_checkpoint_from_cwd / plain torch.load of structure + last", r["checkpoint_vs_plain_loads"], 1.2,
             "lower")
    if "memory" in report:
        f = report["memory"]["fractions"]
        line("sync save: peak extra anonymous memory / state", f["sync"]["anonymous"], 0.1, "lower")
        line("async save: peak extra anonymous memory / state (one staging copy)", f["async"]["anonymous"], 1.1, "lower")


if __name__ == "__main__":
    sys.exit(main())
