"""3. Loads: load_model_from_cwd() and load_checkpoint_from_cwd() (verification included).

Against torch.load(mmap=True) + touching every element, and plain torch.load;
warm (page cache) and cold (page cache dropped) against a raw read. Each load runs
in a fresh process, as a restart or a prediction script does (--quick: in the
benchmark's process, which is faster to measure).
"""
import os
import shutil
import time

import torch

import harness
from experiment_io import load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.run.payloads import BEST_MODEL_NAME, LAST_NAME, STRUCTURE_NAME
from experiment_io.storage.manifest import read_manifest
from experiment_io.storage.parts import record_parts, verify_parts
from experiment_io.storage.verification import file_digest
from fixtures import build_run, tensors_of, tiny_database, touch

NAME = "load"
OUR_MODEL = "load_model_from_cwd(mmap=True) + touch"
MMAP_BEST = "torch.load(best_model.pt, mmap=True) + touch"
MMAP_MODEL = "torch.load(mmap=True) + touch, structure and best_model"
PLAIN_MODEL = "torch.load(structure) + torch.load(best_model) (plain)"
RAW_MODEL = "raw read of structure + best_model"
DIGEST_BEST = "digest of best_model.pt alone, one core"
DIGEST_PARTS = "digest of best_model.pt's parts, every core"
OUR_CHECKPOINT = "load_checkpoint_from_cwd()"
PLAIN_CHECKPOINT = "torch.load(structure) + torch.load(last) (plain)"
MMAP_CHECKPOINT = "torch.load(mmap=True) + touch, structure and last"
RAW_CHECKPOINT = "raw read of structure + last"
MODEL_METHODS = [OUR_MODEL, MMAP_BEST, MMAP_MODEL, PLAIN_MODEL, DIGEST_BEST, DIGEST_PARTS]
CHECKPOINT_METHODS = [OUR_CHECKPOINT, PLAIN_CHECKPOINT, MMAP_CHECKPOINT]


def load_methods(run):
    """The load methods, each a function of nothing, for the run directory ``run``."""
    files = {name: os.path.join(run, name) for name in (STRUCTURE_NAME, LAST_NAME, BEST_MODEL_NAME)}

    def our_model():
        model = load_model_from_cwd(directory=run, mmap=True)
        touch(model.state_dict().values())

    def our_checkpoint():
        load_checkpoint_from_cwd(directory=run, database=tiny_database(), restore_rng=False)

    def mmap_touch(*names):
        for name in names:
            touch(tensors_of(torch.load(files[name], mmap=True, weights_only=name != STRUCTURE_NAME)))

    def plain(*names):
        for name in names:
            torch.load(files[name], weights_only=name != STRUCTURE_NAME)

    def digest_parts(name):
        record = read_manifest(run)[1][name]
        fd = os.open(files[name], os.O_RDONLY)
        try:
            assert verify_parts(fd, record_parts(record) or [(0, record["size"], record["digest"].split(":")[1])]) is None
        finally:
            os.close(fd)

    def raw_read(*names):
        buffer = bytearray(4 * harness.MiB)
        for name in names:
            with open(files[name], "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass

    return {
        OUR_MODEL: our_model,
        MMAP_BEST: lambda: mmap_touch(BEST_MODEL_NAME),
        MMAP_MODEL: lambda: mmap_touch(STRUCTURE_NAME, BEST_MODEL_NAME),
        PLAIN_MODEL: lambda: plain(STRUCTURE_NAME, BEST_MODEL_NAME),
        RAW_MODEL: lambda: raw_read(STRUCTURE_NAME, BEST_MODEL_NAME),
        DIGEST_BEST: lambda: file_digest(files[BEST_MODEL_NAME]),
        DIGEST_PARTS: lambda: digest_parts(BEST_MODEL_NAME),
        OUR_CHECKPOINT: our_checkpoint,
        PLAIN_CHECKPOINT: lambda: plain(STRUCTURE_NAME, LAST_NAME),
        MMAP_CHECKPOINT: lambda: mmap_touch(STRUCTURE_NAME, LAST_NAME),
        RAW_CHECKPOINT: lambda: raw_read(STRUCTURE_NAME, LAST_NAME),
    }


def child(method, run):
    """Time one load method in this (fresh) process: ``{"seconds": ...}``.

    ``torch._dynamo`` is imported first, outside the timing: the first call of an
    optimizer's ``load_state_dict`` in a process imports it (about 1 s here), which
    any resume pays whatever it loads with, and which would hide the I/O.
    """
    import torch._dynamo  # noqa: F401
    fn = load_methods(run)[method]
    started = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - started}


class _Timer:
    """Runs load methods side by side, each in a fresh process or in this one; keeps what the loads took."""

    def __init__(self, run, seed, fresh_processes):
        self.run, self.seed, self.fresh = run, seed, fresh_processes
        if not fresh_processes:
            import torch._dynamo  # noqa: F401  (see child)
            self.here = load_methods(run)

    def _method(self, method):
        def timed():
            if self.fresh:
                seconds = harness.in_fresh_process("bench_load", "child", method=method, run=self.run)["seconds"]
            else:
                started = time.perf_counter()
                self.here[method]()
                seconds = time.perf_counter() - started
            self.times[method].append(seconds)
        return timed

    def __call__(self, methods, reps, setup=None):
        """``{method: summary}`` of ``reps`` repetitions (no warm-up: each load is a first load)."""
        self.times = {m: [] for m in methods}
        harness.side_by_side({m: self._method(m) for m in methods}, reps, seed=self.seed, setup=setup, warmup=False)
        return {m: harness.summary(self.times[m]) for m in methods}


def loads(directory, size, reps, seed, *, fresh_processes=True):
    """Warm and cold loads of a run directory of a ``size``-byte model."""
    run = os.path.join(directory, "load-run")
    build_run(run, size)
    sizes = {name: os.path.getsize(os.path.join(run, name)) for name in (STRUCTURE_NAME, LAST_NAME, BEST_MODEL_NAME)}
    timed = _Timer(run, seed, fresh_processes)
    where = "fresh process" if fresh_processes else "in this process"
    MiB = harness.MiB
    results = {"warm_model": timed(MODEL_METHODS, reps)}  # build_run left the files in the page cache
    harness.rows(f"3a. Load the best model, warm page cache, {where}; structure {sizes[STRUCTURE_NAME] / MiB:.0f} MiB, "
                 f"best_model.pt {sizes[BEST_MODEL_NAME] / MiB:.0f} MiB (target: <= 1.3 x mmap + touch)",
                 results["warm_model"], MMAP_BEST)
    results["warm_checkpoint"] = timed(CHECKPOINT_METHODS, reps)
    harness.rows(f"3b. Load the last checkpoint, warm page cache, {where}; last_checkpoint.pt "
                 f"{sizes[LAST_NAME] / MiB:.0f} MiB (model + best model state) "
                 "(target: <= 1.2 x plain torch.loads of its files)", results["warm_checkpoint"], PLAIN_CHECKPOINT)

    how = {}

    def cold(names):
        def setup(name):
            how["method"] = harness.drop_page_cache([os.path.join(run, n) for n in names])
        return setup

    cold_reps = reps
    results["cold_model"] = timed(MODEL_METHODS[:2] + [RAW_MODEL], cold_reps, setup=cold([STRUCTURE_NAME, BEST_MODEL_NAME]))
    harness.rows("3c. Load the best model, cold (the run's files dropped from the page cache before each; target: "
                 "<= 1.0 x a raw read)",
                 results["cold_model"], RAW_MODEL)
    results["cold_checkpoint"] = timed(CHECKPOINT_METHODS[:2] + [RAW_CHECKPOINT], cold_reps,
                                       setup=cold([STRUCTURE_NAME, LAST_NAME]))
    harness.rows("3d. Load the last checkpoint, cold (target: <= 1.0 x the plain torch.loads)", results["cold_checkpoint"],
                 PLAIN_CHECKPOINT)
    print(f"   page cache dropped with {how.get('method')}")
    shutil.rmtree(run, ignore_errors=True)
    wm, wc = results["warm_model"], results["warm_checkpoint"]
    cm, cc = results["cold_model"], results["cold_checkpoint"]
    ratios = {
        "model_vs_mmap_touch_best_model": wm[OUR_MODEL]["median"] / wm[MMAP_BEST]["median"],
        "model_vs_mmap_touch_structure_and_best_model": wm[OUR_MODEL]["median"] / wm[MMAP_MODEL]["median"],
        "model_vs_plain_loads": wm[OUR_MODEL]["median"] / wm[PLAIN_MODEL]["median"],
        # a verified load reads every byte once more than an unverified one: on every core, the least it can add
        "digest_and_mmap_touch_vs_mmap_touch": (wm[DIGEST_BEST]["median"] + wm[MMAP_BEST]["median"]) / wm[MMAP_BEST]["median"],
        "parts_digest_and_mmap_touch_vs_mmap_touch": (wm[DIGEST_PARTS]["median"] + wm[MMAP_BEST]["median"])
        / wm[MMAP_BEST]["median"],
        "checkpoint_vs_plain_loads": wc[OUR_CHECKPOINT]["median"] / wc[PLAIN_CHECKPOINT]["median"],
        "cold_model_vs_raw_read": cm[OUR_MODEL]["median"] / cm[RAW_MODEL]["median"],
        "cold_checkpoint_vs_plain_loads": cc[OUR_CHECKPOINT]["median"] / cc[PLAIN_CHECKPOINT]["median"],
    }
    return {"file_bytes": sizes, "fresh_processes": fresh_processes, "cold_method": how.get("method"),
            "results": results, "ratios": ratios}


def run(args, results):
    results["load"] = loads(args.directory, (128 if args.quick else 1024) * harness.MiB, min(args.reps, 3), args.seed,
                            fresh_processes=not args.quick)


def summarize(results):
    if "load" not in results:
        return
    r = results["load"]["ratios"]
    line = harness.target_line
    line("warm load_model_from_cwd / mmap + touch of best_model.pt", r["model_vs_mmap_touch_best_model"], 1.3, "lower")
    print(f"  {'   (digest on one core + mmap + touch: verify, then load)':68s} "
          f"{r['digest_and_mmap_touch_vs_mmap_touch']:7.3f}")
    if "parts_digest_and_mmap_touch_vs_mmap_touch" in r:
        print(f"  {'   (digest of the parts on every core + mmap + touch: a second read of every byte)':68s} "
              f"{r['parts_digest_and_mmap_touch_vs_mmap_touch']:7.3f}")
    line("cold load_model_from_cwd / raw read of structure + best_model.pt", r["cold_model_vs_raw_read"], 1.0, "lower")
    line("warm load_checkpoint_from_cwd / plain torch.load of structure + last", r["checkpoint_vs_plain_loads"], 1.2,
         "lower")
    line("cold load_checkpoint_from_cwd / plain torch.load of structure + last", r["cold_checkpoint_vs_plain_loads"],
         1.0, "lower")
