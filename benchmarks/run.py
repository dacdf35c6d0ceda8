"""Benchmarks of experiment_io's saves and loads against plain torch and raw I/O.

    python benchmarks/run.py            # full sizes (about 12 minutes)
    python benchmarks/run.py --quick    # small sizes (every section runs; not a measurement)
    python benchmarks/run.py --dir /scratch/me --reps 7 --only save,async --seed 3

Each section (a module ``bench_<section>.py``) runs its methods side by side:
every repetition runs every method once, in an order shuffled for that repetition
(seeded by ``--seed`` and the repetition), after a warm-up round that is not
counted (see ``harness.py``). The results, with the machine they were measured on
and the seed, are written as JSON to ``benchmarks/results/<date>-<full|quick>.json``
(or ``--out``).
"""
import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

import harness  # first: it puts the library and this directory on sys.path
import bench_async
import bench_load
import bench_many
import bench_memory
import bench_save
import bench_scaling
import bench_small

SECTIONS = {module.NAME: module for module in (bench_save, bench_async, bench_load, bench_small, bench_many, bench_memory,
                                               bench_scaling)}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: checks that every section runs (in well under a minute or two); "
                             "its figures measure nothing")
    parser.add_argument("--dir", help="directory for the files (default: a temporary directory under /tmp); "
                                      "put it on the disk you want to measure")
    parser.add_argument("--reps", type=int, help="repetitions per method (default: 5, --quick: 3)")
    parser.add_argument("--only", help=f"comma-separated sections among {', '.join(SECTIONS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order of the methods (default: 0)")
    parser.add_argument("--out", help="where to write the JSON results (default: benchmarks/results/<date>-<mode>.json)")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    args.sections = [name for name in SECTIONS if name in chosen]  # always in the order of SECTIONS
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    args.reps = args.reps or (3 if args.quick else 5)
    return args


def main(argv=None):
    args = parse(argv)
    mode = "quick" if args.quick else "full"
    base = args.dir or "/tmp"
    os.makedirs(base, exist_ok=True)
    args.directory = tempfile.mkdtemp(prefix="experiment_io-bench-", dir=base)
    harness.steady_allocator()
    started = time.perf_counter()
    report = {"mode": mode, "reps": args.reps, "seed": args.seed, "order": "shuffled per repetition",
              "sections": args.sections, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": harness.machine(args.directory)}
    print(f"experiment_io benchmarks ({mode}, {args.reps} repetitions, order shuffled with seed {args.seed}, "
          "medians [min, max] in seconds)")
    print(harness.describe_machine(report["machine"], args.directory))
    try:
        for name in args.sections:
            section_started = time.perf_counter()
            SECTIONS[name].run(args, report)
            report.setdefault("section_seconds", {})[name] = time.perf_counter() - section_started
    finally:
        shutil.rmtree(args.directory, ignore_errors=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    print(f"\nSUMMARY ({report['seconds']:.0f} s)")
    for name in args.sections:
        SECTIONS[name].summarize(report)
    path = args.out or os.path.join(harness.HERE, "results", f"{datetime.date.today().isoformat()}-{mode}.json")
    print(f"results written to {harness.write_json(report, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
