"""6. Peak extra memory (RSS) of a sync save, an async save and the loads, as a fraction of the state.

Each operation runs in a fresh process (512 MiB state; --quick: 64 MiB), where a
thread samples /proc/self/statm.
"""
import os
import shutil

import torch

import harness
from experiment_io import load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.training.asynchronous import BackgroundWriter
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import LAST_NAME, save_payloads
from fixtures import build_run, make_state, state_payload, tiny_database

NAME = "memory"
KINDS = {"sync": "synchronous save", "async": "async_save (staging copy + background write)",
         "load_model": "load_model_from_cwd(mmap=True)", "load_checkpoint": "load_checkpoint_from_cwd() (last holds 2 states)"}


def child(kind, directory, size):
    """Run one operation in this (fresh) process; return its RSS before and at its peak."""
    torch.set_num_threads(2)
    if kind in ("sync", "async"):
        payloads = {LAST_NAME: state_payload(make_state(64, size // 64))}
        writer = RunWriter(directory)
        with harness.PeakSampler() as peak:
            if kind == "sync":
                save_payloads(writer, payloads)
            else:
                background = BackgroundWriter()
                background.submit(payloads, lambda staged: save_payloads(writer, staged), "memory benchmark")
                background.wait()
    else:
        database = tiny_database()
        with harness.PeakSampler() as peak:
            if kind == "load_model":
                load_model_from_cwd(directory=directory, mmap=True)
            else:
                load_checkpoint_from_cwd(directory=directory, database=database, restore_rng=False)
    return peak.as_dict()


def peak_memory(directory, size):
    results = {}
    for kind in ("sync", "async"):
        where = os.path.join(directory, f"memory-{kind}")
        os.makedirs(where, exist_ok=True)
        results[kind] = harness.in_fresh_process("bench_memory", "child", kind=kind, directory=where, size=size)
        shutil.rmtree(where, ignore_errors=True)
    run = os.path.join(directory, "memory-load")
    build_run(run, size)
    for kind in ("load_model", "load_checkpoint"):
        results[kind] = harness.in_fresh_process("bench_memory", "child", kind=kind, directory=run, size=size)
    shutil.rmtree(run, ignore_errors=True)
    print(f"\n6. Peak extra memory (RSS) as a fraction of the state ({size / harness.MiB:.0f} MiB), "
          "each in a fresh process")
    print(f"  {'operation':58s} {'anonymous':>10s} {'total RSS':>10s}")
    fractions = {}
    for kind, r in results.items():
        anon = (r["peak_anon"] - r["before_anon"]) / size
        total = (r["peak_total"] - r["before_total"]) / size
        fractions[kind] = {"anonymous": anon, "total": total}
        print(f"  {KINDS[kind]:58s} {anon:10.3f} {total:10.3f}")
    print("   anonymous = resident - file-backed pages (copies made by the process); total RSS also counts\n"
          "   memory-mapped file pages while they are mapped. A load keeps what it returns: the model (1 state)\n"
          "   and, for load_checkpoint_from_cwd, the best model state the checkpoint carries (1 state); about\n"
          "   67 MiB more, whatever the state's size (not a copy of a state).")
    return {"state_bytes": size, "raw": results, "fractions": fractions}


def run(args, results):
    results["memory"] = peak_memory(args.directory, (64 if args.quick else 512) * harness.MiB)


def summarize(results):
    if "memory" not in results:
        return
    f = results["memory"]["fractions"]
    harness.target_line("sync save: peak extra anonymous memory / state", f["sync"]["anonymous"], 0.1, "lower")
    harness.target_line("async save: peak extra anonymous memory / state (one staging copy)", f["async"]["anonymous"],
                        1.1, "lower")
    # the checkpoint holds two states (the model's and the best model's)
    harness.target_line("load_checkpoint_from_cwd: peak extra total RSS / checkpoint (2 states)",
                        f["load_checkpoint"]["total"] / 2, 1.2, "lower")
