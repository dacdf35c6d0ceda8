"""A long SIGKILL storm against train_model (the test suite runs a short one).

    python tests/scripts/kill_storm.py [--kills 1000] [--mode sync|async|both] [--dir DIR]

Each kill lands at a random instant of a training process that checkpoints after
every batch and that starts or resumes with the start-or-resume one-liner; after
each kill the run directory must load a checkpoint at least as new as the last
save the killed process reported committed (or, before any commit, start again).
Prints progress every 50 kills; exits with 0 when every kill passed.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from helpers import kill_storm  # noqa: E402

import experiment_io.training.checkpointing

experiment_io.training.checkpointing.ASYNC_MIN_BYTES = 0  # the tiny model's saves go to the background writer, as a large one's


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--mode", choices=["sync", "async", "both"], default="both")
    parser.add_argument("--dir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = args.dir or tempfile.mkdtemp(prefix="kill-storm-")
    for mode in (["sync", "async"] if args.mode == "both" else [args.mode]):
        directory = os.path.join(base, mode)
        os.makedirs(directory, exist_ok=True)
        started = time.monotonic()

        def progress(attempt, committed):
            if (attempt + 1) % 50 == 0:
                print(f"{mode}: {attempt + 1} kills, committed step {committed}, "
                      f"{time.monotonic() - started:.0f} s", flush=True)

        committed = kill_storm(directory, args.kills, async_save=mode == "async", seed=args.seed, on_kill=progress)
        print(f"{mode}: {args.kills} kills passed (last committed step {committed})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
