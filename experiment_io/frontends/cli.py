"""The command line: inspect and verify run directories without loading any pickle.

::

    experiment-io info   [DIR]            the files of a run and what they hold
    experiment-io status [DIR]            where the run stands; exit status 0 finished, 75 preempted
                                          (resume it), 4 not finished otherwise, 1 no intact checkpoint
    experiment-io verify [DIR]            check every file against the manifest
    experiment-io metrics [DIR] [--hdf5 OUT]
                                          the metric history (printed, or exported)
    experiment-io plot [DIR] [--out OUT] the training curves as PNG images (needs matplotlib)
    experiment-io list   [DIR]            every file of the directory: generation, epoch, what it holds
    experiment-io export DIR OUT [--format safetensors|state_dict] [--which best|last | --epoch N]
                                          the model's weights, for use without experiment_io
    experiment-io lineage DIR             the checkpoints of a model (experiment_io.frontends.lineage) as a tree
    experiment-io import-hippynn SRC DST  an experiment_io run from a hippynn run
                                          directory (reads its pickles: trusted runs only)

Everything here but ``import-hippynn`` reads state files with
``torch.load(weights_only=True)`` and never opens the structure file, so it is safe
on a run directory of unknown origin.
Exit status: 0 when all is well, 1 when a check fails (for ``verify``: a file
without any intact generation), 2 for bad usage, 3 when ``verify`` finds a file
whose committed generation is lost while an older one is intact, or when
``metrics`` and ``plot`` read an older generation for that reason (they say so on
stderr), 141 when the reader of the output closed the pipe (``verify | head``).
Every name taken from the run directory is printed with its control characters
escaped.
"""
import argparse
import contextlib
import logging
import os
import sys
from typing import Optional, Sequence

import torch

from experiment_io.format import codec as fmt
from experiment_io.storage import atomic as storage
from experiment_io.errors import CheckpointNotFoundError, ExperimentIOError
from experiment_io.training.preemption import PREEMPTED_EXIT_CODE
from experiment_io.storage.generations import Search, base_name, is_previous_name, previous_name
from experiment_io.run.payloads import (BEST_NAME, LAST_NAME, run_status)
from experiment_io.run.reading import restore_tracker, run_verifier, verified_source
from experiment_io.storage.run_directory import RunDirectory
from experiment_io.storage.verification import check_archive
from experiment_io.frontends.export import cmd_export
from experiment_io.frontends.describe import EPOCH_LEGEND, epoch_of_record, provenance_line, shown, what, when
from experiment_io.version import __version__
from experiment_io.storage.manifest import MANIFEST_NAME

__all__ = ["main", "ROLLED_BACK", "BROKEN_PIPE", "NOT_FINISHED"]

#: Exit status of ``verify``, ``metrics`` and ``plot`` when the committed newest checkpoint is lost and an older
#: generation answered instead.
ROLLED_BACK = 3
#: Exit status when the output's reader closed the pipe early (128 + SIGPIPE, as the shell reports a tool it killed).
BROKEN_PIPE = 141
#: Exit status of ``status`` for a run that is not finished and did not stop on a preemption signal (a crash, a
#: kill, or no checkpoint yet); ``PREEMPTED_EXIT_CODE`` (75) for one that did, 0 for a finished run.
NOT_FINISHED = 4


def _roles(files):
    """The file names of a run without their previous generations, in a stable order."""
    return sorted({base_name(name) for name in files})


def cmd_info(args: argparse.Namespace) -> int:
    run = RunDirectory(args.directory)
    files = run_verifier(run.storage).files
    print(f"run directory {shown(run.location)}")
    status = run_status(files)
    print(f"run: {shown(status.describe())}" if status is not None else "run: no checkpoint committed yet")
    for line in provenance_line(files.get(LAST_NAME)):
        print(line)
    print(EPOCH_LEGEND)
    print(f"{'file':32} {'kind':10} {'done':>5} {'step':>8} {'ranks':>5} {'size':>12}  written              holds")
    for name in sorted(files):
        record = files[name]
        cells = [shown(record.get(key, default)) for key, default in
                 (("kind", "?"), ("epochs_done", ""), ("step", ""), ("world_size", ""), ("size", "?"))]
        print(f"{shown(name):32} {cells[0]:10} {cells[1]:>5} {cells[2]:>8} {cells[3]:>5} {cells[4]:>12}  "
              f"{when(record)}  {shown(what(record))}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Where the run stands, as an exit status a job script can act on: 0, :data:`PREEMPTED_EXIT_CODE`,
    :data:`NOT_FINISHED` or 1 (an error)."""
    run = RunDirectory(args.directory)
    if not run.exists():  # a mistyped path is an error, not a run that has not started
        raise CheckpointNotFoundError(f"run directory {run.location} does not exist")
    try:
        pick = Search(run_verifier(run.storage), [LAST_NAME, BEST_NAME], newest_first=True).first()
    except CheckpointNotFoundError:
        print(f"{shown(run.location)}: no checkpoint yet (not started, or stopped before its first save)")
        return NOT_FINISHED
    status = run_status({LAST_NAME: pick.record})
    assert status is not None
    for problem in pick.problems:
        print(f"skipped: {shown(problem)}")
    print(f"{shown(run.location)}: {shown(status.describe())} ({os.path.basename(pick.path)}, step {status.step})")
    if status.finished:
        print("finished: nothing to resume")
        return 0
    if status.interrupted:
        print(f"preempted: stopped by {shown(status.interrupted)} after saving; resume it (exit status "
              f"{PREEMPTED_EXIT_CODE})")
        return PREEMPTED_EXIT_CODE
    print("not finished, and not stopped by a signal: the process crashed or was killed before it could save "
          f"(exit status {NOT_FINISHED})")
    return NOT_FINISHED


def cmd_verify(args: argparse.Namespace) -> int:
    run = RunDirectory(args.directory)
    verifier = run_verifier(run.storage)
    files = verifier.files
    failures = rollbacks = 0
    for name in sorted(verifier.retired):
        print(f"retired  {shown(name):32} (being removed: the retention no longer keeps it)")
    for role in _roles(files):
        generations, problems = Search(verifier, [role]).all()
        for path, record in _each_file_once(generations, files):
            committed = "committed" if record is files.get(role) else "previous"
            print(f"ok       {shown(os.path.basename(path)):32} ({committed}, step {shown(record.get('step', '-'))})")
        for problem in problems:
            print(f"DAMAGED  {shown(problem)}")
        if not generations:
            failures += 1
        elif role in files and not any(record is files[role] for _, record in generations):
            rollbacks += 1
            print(f"OLDER    {shown(role)}: its committed generation (step {shown(files[role].get('step', '-'))}) is "
                  "missing or "
                  "damaged; only an older one is intact, and a load goes back to it")
    for name in _uncommitted(run, {**files, **verifier.retired}):
        print(f"ignored  {shown(name):32} (no save of it was committed: an interrupted save left it; the next save "
              "replaces it)")
    if failures:
        print(f"{failures} file(s) without any intact generation")
        return 1
    if rollbacks:
        print(f"{rollbacks} file(s) whose committed generation is lost: a load would go back to an older one")
        return ROLLED_BACK
    print("every file has an intact generation")
    return 0


def _each_file_once(generations, files):
    """``generations`` with each file once: two generations of equal content (a JSON file written again with the
    same values) verify against both records, and a file is shown with its own."""
    by_path: dict = {}
    for path, record in generations:
        if path not in by_path or record is files.get(os.path.basename(path)):
            by_path[path] = record
    return list(by_path.items())


def _uncommitted(run, files):
    """State files of ``run`` that no committed save wrote (neither they nor their generation pair is
    recorded)."""
    names = sorted(n for n in run.storage.names() if n.endswith(".pt") and not n.startswith("."))
    return [n for n in names
            if n not in files and base_name(n) not in files and previous_name(base_name(n)) not in files]


def cmd_list(args: argparse.Namespace) -> int:
    run = RunDirectory(args.directory)
    verifier = run_verifier(run.storage)
    files, retired = verifier.files, verifier.retired
    print(EPOCH_LEGEND)
    print(f"{'file':36} {'generation':12} {'epoch':>5} {'size':>12}  holds")
    for name in run.storage.names():
        found = run.storage.stat(name)
        if found is not None and found.folder:
            print(f"{shown(name) + '/':36} {'':12} {'':>5} {'':>12}  "
                  + ("training curves (PNG)" if name == "plots" else "a folder"))
            continue
        record = files.get(name) or retired.get(name)
        actual_size = found.size if found is not None else None
        if record is not None and actual_size != record.get("size"):
            record = None  # not the file its record describes (a save interrupted before its commit left it)
            unrecorded = "not the recorded file: left by a save interrupted before its commit"
        else:
            unrecorded = "no committed save wrote it"
        if name == MANIFEST_NAME:
            generation, holds = "", "the manifest: the record of every file"
        elif name == "experiment_io.storage.lock":
            generation, holds = "", "the lock of the training process"
        elif storage.is_temporary(name):
            generation, holds = "temporary", "left by an interrupted save; removed by the next one"
        elif record is None:
            generation, holds = "unrecorded", unrecorded
        elif name in retired:
            generation, holds = "retired", what(record)
        else:
            generation = "previous" if is_previous_name(name) else "committed"
            holds = what(record) or record.get("kind", "")
        epoch = epoch_of_record(record)
        size = actual_size if actual_size is not None else "?"
        print(f"{shown(name):36} {generation:12} {shown(epoch):>5} {size:>12}  {shown(holds)}")
    return 0


def _newest_tracker(run):
    """The metric tracker of the newest intact checkpoint, its path, and whether that is an older one than the
    committed last checkpoint (which is then said on stderr)."""
    verifier = run_verifier(run.storage)
    last_problems: list = []
    for name in (LAST_NAME, BEST_NAME):
        generations, problems = Search(verifier, [name]).all()
        if name == LAST_NAME:
            last_problems = problems
        if generations:
            path, record = generations[0]
            with verified_source(path, verifier) as source:  # the very file that was verified
                check_archive(source or path)
                state = torch.load(source or path, map_location="cpu", weights_only=True)
            fmt.check_payload(state, path, ("checkpoint",))
            older = name != LAST_NAME or record is not verifier.files.get(LAST_NAME)
            if older:
                why = "; ".join(last_problems) or "missing"
                print(f"warning: the committed {LAST_NAME} does not verify ({shown(why)}); this is the history of "
                      f"{shown(os.path.basename(path))} (step {shown(record.get('step', '?'))}), which may lack the "
                      "newest epochs. experiment-io verify lists what is damaged.", file=sys.stderr)
            return restore_tracker(state, run.storage, path), path, older
    raise ExperimentIOError(f"{run.location} holds no intact checkpoint")


def cmd_metrics(args: argparse.Namespace) -> int:
    tracker, path, older = _newest_tracker(RunDirectory(args.directory))
    if args.hdf5:
        tracker.to_hdf5(args.hdf5)
        print(f"metric history of {len(tracker.epochs)} epochs from {shown(path)} written to {args.hdf5}")
        return ROLLED_BACK if older else 0
    columns = [(split, name) for split, values in tracker.history.items() for name in values]
    print("epoch " + " ".join(f"{shown(split + '/' + name):>14}" for split, name in columns))
    for row, epoch in enumerate(tracker.epochs):
        marker = " *" if epoch == tracker.best_epoch else ""
        print(f"{epoch:5d} " + " ".join(f"{tracker.history[s][n][row]:14.6g}" for s, n in columns) + marker)
    print(shown(tracker.summary()))
    return ROLLED_BACK if older else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from experiment_io.training.plots import PLOTS_DIRECTORY, plot_history, plotting_available

    if not plotting_available():
        print("error: plot needs matplotlib: pip install 'experiment_io[plots]' (or pip install matplotlib)",
              file=sys.stderr)
        return 1
    run = RunDirectory(args.directory)
    tracker, path, older = _newest_tracker(run)
    out = args.out or run.folder(PLOTS_DIRECTORY)
    written = plot_history(tracker, out)
    print(f"{len(written)} plot(s) of {len(tracker.epochs)} epochs from {shown(path)} written to {out}")
    return ROLLED_BACK if older else 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from experiment_io.frontends.lineage import tree

    if not os.path.isdir(args.directory):
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return 1
    text = tree(args.directory)
    for line in text.splitlines():
        print(shown(line))
    if text.endswith("(no checkpoints)"):
        models = sorted(n for n in os.listdir(args.directory) if os.path.isdir(os.path.join(args.directory, n))
                        and not n.startswith("."))
        if models:
            print(f"{shown(args.directory)} looks like the root of several models; give one of them: "
                  + ", ".join(shown(os.path.join(args.directory, m)) for m in models[:5]))
    return 0


def cmd_import_hippynn(args: argparse.Namespace) -> int:
    from experiment_io.frontends.hippynn_runs import import_hippynn_run

    try:
        import hippynn  # noqa: F401
    except ImportError:
        print("error: import-hippynn needs hippynn installed (pip install 'experiment_io[hippynn]')", file=sys.stderr)
        return 1
    print(f"reading {args.source} with full pickle: its files run code when they are loaded, so import only "
          "runs you trust (you vouch for them by running this command)")
    status = import_hippynn_run(args.source, args.destination, overwrite=args.overwrite)
    print(f"imported into {os.path.abspath(args.destination)}: {status.describe()}")
    print("load the best model with load_model_from_cwd(directory=..., allow=['hippynn']); resume with "
          "load_checkpoint_from_cwd(directory=..., allow=['hippynn'], database=<the same database>)")
    return 0


def _parser():
    parser = argparse.ArgumentParser(prog="experiment-io",
                                     description="Inspect and verify experiment_io run directories.")
    parser.add_argument("--version", action="version", version=f"experiment_io {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, function, text in (("info", cmd_info, "list the files of a run"),
                                 ("status", cmd_status, "where the run stands, as an exit status for job scripts: "
                                                        "0 finished, 75 preempted (resume it), 4 not finished "
                                                        "otherwise, 1 no intact checkpoint"),
                                 ("verify", cmd_verify, "check every file against the manifest"),
                                 ("metrics", cmd_metrics, "print or export the metric history"),
                                 ("plot", cmd_plot, "write the training curves as PNG images (needs matplotlib)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("directory", nargs="?", default=".", help="the run directory (default: .)")
        sub.set_defaults(function=function)
        if name == "metrics":
            sub.add_argument("--hdf5", metavar="OUT", help="write the history to this HDF5 file instead")
        if name == "plot":
            sub.add_argument("--out", metavar="DIR", help="where the images go (default: DIR/plots)")
    sub = commands.add_parser("list", help="every file of a run directory: generation, epoch, what it holds")
    sub.add_argument("directory", nargs="?", default=".", help="the run directory (default: .)")
    sub.set_defaults(function=cmd_list)
    sub = commands.add_parser("export", help="write a model's weights for use without experiment_io")
    sub.add_argument("directory", help="the run directory")
    sub.add_argument("out", help="the file to write")
    sub.add_argument("--format", choices=("safetensors", "state_dict"), default="state_dict",
                     help="safetensors (needs safetensors) or a torch.save'd state_dict (default)")
    sub.add_argument("--which", choices=("best", "last"), help="the best model (default) or the newest checkpoint's")
    sub.add_argument("--epoch", type=int, metavar="N", help="the model kept for the 0-based epoch N")
    sub.set_defaults(function=cmd_export)
    sub = commands.add_parser("lineage",
                              help="the checkpoints of a model of experiment_io.frontends.lineage as a tree of forks")
    sub.add_argument("directory", help="the model's directory (<root>/<model id>, ckpts/<model id> by default)")
    sub.set_defaults(function=cmd_lineage)
    sub = commands.add_parser("import-hippynn", help="write an experiment_io run from a hippynn run directory "
                                                     "(loads its pickles: only for runs you trust)")
    sub.add_argument("source", help="the hippynn run directory")
    sub.add_argument("destination", help="the experiment_io run directory to write")
    sub.add_argument("--overwrite", action="store_true", help="replace a run already in the destination")
    sub.set_defaults(function=cmd_import_hippynn)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return its exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = args.function(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:  # the reader went away (verify . | head): stop quietly, as other tools do
        with contextlib.suppress(OSError, ValueError, AttributeError):  # stdout without a descriptor: nothing to do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except ExperimentIOError as e:
        print("error: " + "\n".join(shown(line) for line in str(e).splitlines()), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a command line ends in a message, never in a traceback
        print(f"error: {type(e).__name__}: " + "\n".join(shown(line) for line in str(e).splitlines()),
              file=sys.stderr)
        return 1
