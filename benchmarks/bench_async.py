"""2. Time the training loop is blocked by one checkpoint: asynchronous vs synchronous saves.

The state (1 GiB; --quick: 64 MiB) is that of a model in its training loop: the
parameters of bias-free linear layers plus SGD's momentum buffers, half each.
``async_save=True`` does what ``train_model`` does (the parameters and optimizer
state are copied by the background thread while the next batch's forward and
backward pass runs; the loop waits before the optimizer step); ``"copy"`` copies
the whole state before returning.
"""
import os
import shutil
import statistics
import time

import torch

import harness
from experiment_io.format import codec as fmt
from experiment_io.training.asynchronous import BackgroundWriter
from experiment_io.storage.generations import previous_name
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import LAST_NAME, save_payloads

NAME = "async"
SYNC = "synchronous save (save_payloads)"
OVERLAP = "True: blocked (call + wait before step)"
COPY = "'copy': blocked (copy of the whole state)"


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


def _submit(background, writer, payloads, defer=()):
    """What an asynchronous save of ``train_model`` does: stage ``payloads``, write them in the background."""
    background.submit(payloads, lambda staged: save_payloads(writer, staged), f"{', '.join(payloads)} (benchmark)",
                      defer=defer)


def async_save(directory, size, reps, seed):
    """Sync save vs the two asynchronous modes, in the loop of a model whose state is ``size`` bytes."""
    width = 2048 if size >= 256 * harness.MiB else 512
    n = max(1, size // 2 // (width * width * 4))
    step = _Step(n, width)
    nbytes = sum(t.nbytes for t in step.deferred())
    sync_writer = RunWriter(os.path.join(directory, "sync-run"))
    modes = ("copy", "overlap")
    writers = {mode: RunWriter(os.path.join(directory, f"async-{mode}-run")) for mode in modes}
    background = {mode: BackgroundWriter() for mode in modes}
    first = {}
    for mode in modes:  # the first save allocates the staging buffers
        started = time.perf_counter()
        _submit(background[mode], writers[mode], {LAST_NAME: step.payload()},
                defer=step.deferred() if mode == "overlap" else ())
        background[mode].staged()
        first[mode] = time.perf_counter() - started
        background[mode].wait()
    compute_alone, compute_during, written = [], [], []
    blocked = {"copy": [], "overlap": [], "overlap_staged_wait": []}

    def training_step():
        started = time.perf_counter()
        step.forward_backward()
        return time.perf_counter() - started

    def sync():
        save_payloads(sync_writer, {LAST_NAME: step.payload()})

    def without_save():  # the step alone, for the compute time it takes undisturbed
        compute_alone.append(training_step())
        step.update()

    def async_copy():
        started = time.perf_counter()
        _submit(background["copy"], writers["copy"], {LAST_NAME: step.payload()})
        blocked["copy"].append(time.perf_counter() - started)

    def async_overlap():
        # what train_model does: save, compute the next batch, wait (if needed) before the optimizer step
        started = time.perf_counter()
        _submit(background["overlap"], writers["overlap"], {LAST_NAME: step.payload()}, defer=step.deferred())
        call = time.perf_counter() - started
        compute_during.append(training_step())
        started = time.perf_counter()
        background["overlap"].staged()
        wait = time.perf_counter() - started
        step.update()
        blocked["overlap"].append(call + wait)
        blocked["overlap_staged_wait"].append(wait)

    def setup(name):
        for bw in background.values():
            if bw.in_flight:
                bw.wait()
                written.append(bw.written_s)
        for writer in [sync_writer, *writers.values()]:
            harness.remove(writer.path(LAST_NAME), writer.path(previous_name(LAST_NAME)))
        harness.settle()

    times = harness.side_by_side({"sync": sync, "step": without_save, "copy": async_copy, "overlap": async_overlap},
                                 reps, seed=seed, setup=setup, warmup=False)
    setup(None)
    results = {
        SYNC: harness.summary(times["sync"]),
        COPY: harness.summary(blocked["copy"]),
        OVERLAP: harness.summary(blocked["overlap"]),
        "True: of which the wait before step": harness.summary(blocked["overlap_staged_wait"]),
        "background copy + write (not blocking)": harness.summary(written),
        "True: first save, blocked (allocates)": harness.summary([first["overlap"]]),
    }
    harness.rows(f"2. Time the training loop is blocked by one checkpoint of {nbytes / harness.MiB:.0f} MiB "
                 f"({n} linear layers {width}x{width} + SGD momentum; relative to a synchronous save; "
                 "<= 0.15 is the target)", results, SYNC, nbytes=nbytes)
    alone, during = statistics.median(compute_alone), statistics.median(compute_during)
    print(f"   the next batch's forward + backward pass: {alone:.3f} s alone, {during:.3f} s while the background "
          f"thread copies and writes (+{during - alone:.3f} s)")
    for writer in [sync_writer, *writers.values()]:
        shutil.rmtree(writer.directory, ignore_errors=True)
    sync_r, overlap_r, copy_r = results[SYNC], results[OVERLAP], results[COPY]
    return {"state_bytes": nbytes, "staging_bytes": background["overlap"].staging.nbytes, "results": results,
            "blocked_vs_sync": overlap_r["median"] / sync_r["median"],
            "blocked_vs_sync_of_minima": overlap_r["min"] / sync_r["min"],
            "copy_blocked_vs_sync": copy_r["median"] / sync_r["median"],
            "compute_alone_s": alone, "compute_during_background_s": during,
            "slowdown_vs_sync": (during - alone) / sync_r["median"]}


def run(args, results):
    results["async"] = async_save(args.directory, (64 if args.quick else 1024) * harness.MiB, args.reps, args.seed)


def summarize(results):
    if "async" not in results:
        return
    r = results["async"]
    harness.target_line("async_save=True: loop blocked / synchronous save", r["blocked_vs_sync"], 0.15, "lower",
                        minima=r["blocked_vs_sync_of_minima"])
    harness.target_line("async_save='copy': loop blocked / synchronous save", r["copy_blocked_vs_sync"], 0.15, "lower")
    print(f"  {'async_save=True: slowdown of the overlapped step / synchronous save':68s} "
          f"{r['slowdown_vs_sync']:7.3f}  (not a target: compute shared with the copy)")
