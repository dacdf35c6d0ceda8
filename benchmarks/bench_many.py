"""5. Many small tensors: 5,000 tensors of 1,000 float32 (--quick: 1,000), save and load time per tensor vs torch."""
import os
import shutil

import torch

import harness
from experiment_io.training.asynchronous import with_own_memory
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import LAST_NAME, save_payloads
from experiment_io.storage.verification import Verifier
from fixtures import state_payload

NAME = "many"


def many_tensors(directory, n, reps, seed):
    payload = state_payload({f"t{i}": torch.full((1000,), float(i)) for i in range(n)})
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
        # what experiment_io's loaders do with a state file: verify it, map it, copy it out of the map
        verifier = Verifier(writer.directory, writer.files)
        assert verifier.matches(path, writer.files[LAST_NAME])
        with_own_memory(torch.load(path, weights_only=True, mmap=True))

    saves = {
        "experiment_io save_payloads (digest, fsync, manifest)": lambda: save_payloads(writer, {LAST_NAME: payload}),
        "torch.save (no fsync)": lambda: tsave(False),
        "torch.save + fsync": lambda: tsave(True),
    }
    save_times = harness.side_by_side(saves, reps, seed=seed, setup=lambda name: harness.settle())
    loads = {
        "experiment_io load path (verify, mmap, own memory)": our_load,
        "torch.load (plain)": lambda: torch.load(plain_path, weights_only=True),
        "torch.load(mmap=True)": lambda: torch.load(plain_path, weights_only=True, mmap=True),
    }
    load_times = harness.side_by_side(loads, reps, seed=seed)
    results = {"save": {k: harness.summary([t / n for t in v]) for k, v in save_times.items()},
               "load": {k: harness.summary([t / n for t in v]) for k, v in load_times.items()}}
    harness.rows(f"5a. {n} tensors of 1,000 float32: save time per tensor (microseconds)", results["save"],
                 "torch.save (no fsync)", scale=1e6)
    harness.rows(f"5b. {n} tensors of 1,000 float32: load time per tensor (microseconds)", results["load"],
                 "torch.load (plain)", scale=1e6)
    shutil.rmtree(writer.directory, ignore_errors=True)
    harness.remove(plain_path)
    return {"tensors": n, "results": results}


def run(args, results):
    results["many"] = many_tensors(args.directory, 1000 if args.quick else 5000, args.reps, args.seed)


def summarize(results):
    pass  # no target: the figures are read from the table
