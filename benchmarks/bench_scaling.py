"""7. Scaling: the cost of an epoch as the run grows, of a save as the state grows, and of many tensors.

7a. The small model on 400 training samples (an epoch of a few milliseconds, the
    case where bookkeeping shows) trained for 10,000 epochs (--quick: 300) by
    ``train_model`` with its defaults and by the hand-written loop with hippynn-style
    saves; the wall time of each epoch (saves included) in windows of 50 epochs
    ending at epochs 100, 1,000 and 10,000, and the size of ``last_checkpoint.pt``
    there. A constant cost per epoch shows as equal medians in every window.
7b. A durable save against the state's size, 64 MiB to 4 GiB (--quick: 8 and 32 MiB),
    against the paced raw write + fsync of the same bytes (the disk's limit) and
    ``torch.save`` + fsync.
7c. Saves and loads of 64 MiB (--quick: 8 MiB) split into 1 to 100,000 tensors
    (--quick: 1 to 1,000), against ``torch.save``/``torch.load``.
"""
import os
import shutil
import time

import torch

import harness
from bench_save import _paced
from bench_small import hand_written_loop, small_experiment
from experiment_io import train_model
from experiment_io.run.payloads import LAST_NAME, save_payloads
from experiment_io.storage.generations import previous_name
from experiment_io.storage.verification import Verifier
from experiment_io.storage.writer import RunWriter
from experiment_io.training.asynchronous import with_own_memory
from fixtures import make_state, state_payload

NAME = "scaling"


def _windows(marks, width=50):
    """``{mark: range}``: the ``width`` epochs that end at each mark (0-based epochs ``mark - width .. mark - 1``)."""
    return {mark: range(max(0, mark - width), mark) for mark in marks}


def epoch_cost(directory, epochs, marks, seed):
    """Wall time of every epoch of ``train_model`` and of the hand-written loop, and the checkpoint's size."""
    ends, sizes = {"train_model": [], "hand-written loop, hippynn-style saves": []}, {}
    where = os.path.join(directory, "scaling-run")

    def ours():
        database, tm, controller, tracker = small_experiment(seed, n=500)
        controller.max_epochs = epochs
        shutil.rmtree(where, ignore_errors=True)
        times = ends["train_model"]
        times.append(time.perf_counter())

        def at_epoch_end(epoch, better):
            times.append(time.perf_counter())
            if epoch + 1 in marks:
                sizes[epoch + 1] = os.path.getsize(os.path.join(where, LAST_NAME))

        train_model(tm, database, controller, tracker, [at_epoch_end], None, quiet=True, directory=where,
                    evaluate_best=False, plots=False)

    def hand():
        database, tm, controller, tracker = small_experiment(seed, n=500)
        times = ends["hand-written loop, hippynn-style saves"]
        loop_dir = os.path.join(directory, "scaling-hand")
        shutil.rmtree(loop_dir, ignore_errors=True)
        times.append(time.perf_counter())
        for epoch in range(epochs):  # one epoch per call: each epoch's end is timed after its save
            hand_written_loop(database, tm, controller, tracker, 1, loop_dir, first=epoch)
            times.append(time.perf_counter())

    for name in harness.shuffled(["ours", "hand"], 0, seed):
        {"ours": ours, "hand": hand}[name]()
    results = {}
    for method, stamps in ends.items():
        per_epoch = [b - a for a, b in zip(stamps, stamps[1:])]
        results[method] = {mark: harness.summary([per_epoch[e] for e in window if e < len(per_epoch)])
                           for mark, window in _windows(marks).items()}
    shutil.rmtree(where, ignore_errors=True)
    return results, sizes


def save_against_size(directory, sizes_mib, reps, seed):
    """Durable saves of 64-tensor states of each size, beside the paced raw write and torch.save + fsync."""
    results = {}
    for size in sizes_mib:
        state = make_state(64, size * harness.MiB // 64)
        payload = state_payload(state)
        writer = RunWriter(os.path.join(directory, f"scaling-save-{size}"))
        raw_path, plain_path = (os.path.join(directory, f"scaling-{n}-{size}.pt") for n in ("raw", "plain"))

        def paced():
            fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _paced(fd, state)
                os.fsync(fd)
            finally:
                os.close(fd)

        def plain():
            with open(plain_path, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())

        methods = {"experiment_io save_payloads": lambda: save_payloads(writer, {LAST_NAME: payload}),
                   "raw write, paced writeback + fsync": paced, "torch.save + fsync": plain}

        def setup(name):
            harness.remove(raw_path, plain_path, writer.path(LAST_NAME), writer.path(previous_name(LAST_NAME)))
            harness.settle()

        results[size] = harness.summaries(harness.side_by_side(methods, reps, seed=seed, setup=setup))
        harness.rows(f"7b. durable save of {size} MiB (64 tensors)", results[size],
                     "raw write, paced writeback + fsync", nbytes=size * harness.MiB, ratio="throughput")
        shutil.rmtree(writer.directory, ignore_errors=True)
        harness.remove(raw_path, plain_path)
        del state, payload
    return results


def against_tensor_count(directory, total_mib, counts, reps, seed):
    """Save and load of ``total_mib`` MiB split into each number of tensors."""
    results = {}
    for count in counts:
        elements = total_mib * harness.MiB // 4 // count
        payload = state_payload({f"t{i}": torch.full((elements,), float(i)) for i in range(count)})
        writer = RunWriter(os.path.join(directory, f"scaling-count-{count}"))
        path, plain_path = writer.path(LAST_NAME), os.path.join(directory, f"scaling-count-{count}.pt")

        def plain_save():
            with open(plain_path, "wb") as f:
                torch.save(payload, f)

        def our_load():  # what the loaders do with a state file: verify it, map it, copy it out of the map
            verifier = Verifier(writer.directory, writer.files)
            assert verifier.matches(path, writer.files[LAST_NAME])
            with_own_memory(torch.load(path, weights_only=True, mmap=True))

        saves = harness.side_by_side({"experiment_io save_payloads (durable)": lambda: save_payloads(
            writer, {LAST_NAME: payload}), "torch.save (no fsync)": plain_save}, reps, seed=seed,
            setup=lambda name: harness.settle())
        loads = harness.side_by_side({"experiment_io load path (verified)": our_load,
                                      "torch.load": lambda: torch.load(plain_path, weights_only=True)}, reps, seed=seed)
        results[count] = {"save": harness.summaries(saves), "load": harness.summaries(loads)}
        harness.rows(f"7c. {total_mib} MiB in {count} tensor(s): save", results[count]["save"], "torch.save (no fsync)")
        harness.rows(f"7c. {total_mib} MiB in {count} tensor(s): load", results[count]["load"], "torch.load")
        shutil.rmtree(writer.directory, ignore_errors=True)
        harness.remove(plain_path)
    return results


def run(args, results):
    if args.quick:
        epochs, marks, sizes, total, counts = 300, (100, 200, 300), (8, 32), 8, (1, 100, 1000)
    else:
        epochs, marks, sizes, total, counts = 10_000, (100, 1000, 10_000), (64, 256, 1024, 4096), 64, (1, 100, 10_000,
                                                                                                        100_000)
    cost, checkpoint_sizes = epoch_cost(args.directory, epochs, set(marks), args.seed)
    print(f"\n7a. The small model on 400 samples, {epochs} epochs: wall time per epoch (saves included), "
          "medians of the 50 epochs before each mark, milliseconds")
    print(f"  {'method':44s}" + "".join(f" {'to epoch ' + str(m):>18s}" for m in marks))
    for method, by_mark in cost.items():
        print(f"  {method:44s}" + "".join(f" {by_mark[m]['median'] * 1e3:8.2f} [{by_mark[m]['min'] * 1e3:.1f}-"
                                          f"{by_mark[m]['max'] * 1e3:.1f}]" for m in marks))
    ours, hand = cost["train_model"], cost["hand-written loop, hippynn-style saves"]
    print(f"  {'ratio':44s}" + "".join(f" {ours[m]['median'] / hand[m]['median']:17.2f}x" for m in marks))
    print("  last_checkpoint.pt: " + ", ".join(f"{checkpoint_sizes.get(m, '?')} bytes at epoch {m}" for m in marks))
    results["scaling"] = {
        "epochs": epochs, "marks": list(marks),
        "per_epoch": {method: {str(m): s for m, s in by_mark.items()} for method, by_mark in cost.items()},
        "checkpoint_bytes": {str(m): s for m, s in checkpoint_sizes.items()},
        "save_vs_size": {str(k): v for k, v in save_against_size(args.directory, sizes, args.reps, args.seed).items()},
        "tensor_count": {str(k): v for k, v in against_tensor_count(args.directory, total, counts, args.reps,
                                                                    args.seed).items()},
    }


def summarize(results):
    scaling = results["scaling"]
    marks = [str(m) for m in scaling["marks"]]
    ours = scaling["per_epoch"]["train_model"]
    hand = scaling["per_epoch"]["hand-written loop, hippynn-style saves"]
    growth = ours[marks[-1]]["median"] / ours[marks[0]]["median"]
    harness.target_line(f"train_model epoch at epoch {marks[-1]} / at epoch {marks[0]}", growth, 1.1, better="lower")
    harness.target_line(f"train_model epoch / hand-written loop (epoch {marks[0]})",
                        ours[marks[0]]["median"] / hand[marks[0]]["median"], 1.25, better="lower")
    sizes = scaling["save_vs_size"]
    for size, methods in sizes.items():
        ratio = methods["raw write, paced writeback + fsync"]["median"] / methods["experiment_io save_payloads"]["median"]
        harness.target_line(f"durable save of {size} MiB: throughput / paced raw write", ratio, 0.95)
