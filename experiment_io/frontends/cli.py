"""The command line: inspect and verify run directories without loading any pickle.

::

    experiment-io info   [DIR]            the files of a run and what they hold
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
whose committed generation is lost while an older one is intact.
"""
import argparse
import datetime
import logging
import os
import sys
from typing import Optional, Sequence

import torch

from experiment_io.format import codec as fmt
from experiment_io.storage import atomic as storage
from experiment_io.errors import ExperimentIOError
from experiment_io.storage.generations import Search, base_name, is_previous_name, previous_name
from experiment_io.run.payloads import (BEST_MODEL_NAME, BEST_NAME, LAST_NAME, epoch_checkpoint_name, epoch_model_name,
                                        run_status)
from experiment_io.run.reading import load_state_file, restore_tracker, verified_source
from experiment_io.storage.run_directory import RunDirectory
from experiment_io.storage.verification import Verifier, check_archive
from experiment_io.version import __version__
from experiment_io.storage.manifest import MANIFEST_NAME, read_manifest

__all__ = ["main"]


def _manifest(run):
    manifest = read_manifest(run.storage)
    if manifest is None:
        raise ExperimentIOError(f"{run.location} has no {MANIFEST_NAME}: it holds no experiment_io run")
    return manifest[1]


def _verifier(run):
    return Verifier(run.storage, _manifest(run))


def _roles(files):
    """The file names of a run without their previous generations, in a stable order."""
    return sorted({base_name(name) for name in files})


def _when(record):
    try:
        return datetime.datetime.fromtimestamp(record["written_at"]).strftime("%Y-%m-%d %H:%M:%S")
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return "?"


def _what(record):
    """What a file holds, in words: the epoch its state is from, and why a retention keeps it."""
    if record.get("retired") is True:
        return "being removed (no longer kept by the retention)"
    held = _held(record)
    return f"{held}; kept: {record['kept']}" if record.get("kept") else held


def _held(record):
    done, kind = record.get("epochs_done"), record.get("kind")
    if kind == "structure" or done is None:
        return ""
    if record.get("samples_done"):
        why = f", stopped by {record['interrupted']}" if record.get("interrupted") else ""
        return f"in epoch {done} ({record['samples_done']} samples){why}"
    if done == 0:
        return "before the first epoch" + (f", stopped by {record['interrupted']}" if record.get("interrupted") else "")
    return f"{'model' if kind == 'model' else 'state'} after epoch {done - 1}"


def cmd_info(args: argparse.Namespace) -> int:
    run = RunDirectory(args.directory)
    files = _manifest(run)
    print(f"run directory {run.location}")
    status = run_status(files)
    print(f"run: {status.describe()}" if status is not None else "run: no checkpoint committed yet")
    print("epochs are numbered from 0; 'done' counts finished epochs (a file written after epoch 2 has 3 done)")
    print(f"{'file':32} {'kind':10} {'done':>5} {'step':>8} {'ranks':>5} {'size':>12}  written              holds")
    _print_provenance(files.get(LAST_NAME))
    for name in sorted(files):
        record = files[name]
        print(f"{name:32} {record.get('kind', '?'):10} {record.get('epochs_done', ''):>5} {record.get('step', ''):>8} "
              f"{record.get('world_size', ''):>5} {record['size']:>12}  {_when(record)}  {_what(record)}")
    return 0


def _print_provenance(record):
    """Where the newest checkpoint was written: host, command, SLURM job, git commit, resumes."""
    if not isinstance(record, dict):
        return
    parts = []
    if record.get("host"):
        parts.append(f"host {record['host']}")
    if record.get("slurm_job_id"):
        restarts = record.get("slurm_restart_count")
        parts.append(f"SLURM job {record['slurm_job_id']}" + (f" (restart {restarts})" if restarts else ""))
    if "world_size" in record:
        parts.append(f"{record['world_size']} rank(s)")
    if "resumes" in record:
        parts.append(f"resumed {record['resumes']} time(s)")
    if record.get("git_commit"):
        dirty = " with uncommitted changes" if record.get("git_dirty") else ""
        parts.append(f"git commit {record['git_commit'][:12]}{dirty}")
    versions = [f"{name} {record[key]}"
                for name, key in (("experiment_io", "library_version"), ("torch", "torch_version")) if record.get(key)]
    if parts or versions:
        print(f"{LAST_NAME} written by: " + ", ".join(parts + versions))
    if record.get("command"):
        print(f"command: {record['command']}")


def cmd_verify(args: argparse.Namespace) -> int:
    run = RunDirectory(args.directory)
    verifier = _verifier(run)
    files = verifier.files
    failures = rollbacks = 0
    for name in sorted(verifier.retired):
        print(f"retired  {name:32} (being removed: the retention no longer keeps it)")
    for role in _roles(files):
        generations, problems = Search(verifier, [role]).all()
        for path, record in generations:
            committed = "committed" if record is files.get(role) else "previous"
            print(f"ok       {os.path.basename(path):32} ({committed}, step {record.get('step', '-')})")
        for problem in problems:
            print(f"DAMAGED  {problem}")
        if not generations:
            failures += 1
        elif role in files and not any(record is files[role] for _, record in generations):
            rollbacks += 1
            print(f"OLDER    {role}: its committed generation (step {files[role].get('step', '-')}) is missing or "
                  "damaged; only an older one is intact, and a load goes back to it")
    for name in _uncommitted(run, {**files, **verifier.retired}):
        print(f"ignored  {name:32} (no save of it was committed: an interrupted save left it; the next save "
              "replaces it)")
    if failures:
        print(f"{failures} file(s) without any intact generation")
        return 1
    if rollbacks:
        print(f"{rollbacks} file(s) whose committed generation is lost: a load would go back to an older one")
        return 3
    print("every file has an intact generation")
    return 0


def _uncommitted(run, files):
    """State files of ``run`` that no committed save wrote (neither they nor their generation pair is
    recorded)."""
    names = sorted(n for n in run.storage.names() if n.endswith(".pt") and not n.startswith("."))
    return [n for n in names
            if n not in files and base_name(n) not in files and previous_name(base_name(n)) not in files]


def cmd_list(args: argparse.Namespace) -> int:
    run = RunDirectory(args.directory)
    verifier = _verifier(run)
    files, retired = verifier.files, verifier.retired
    print(f"{'file':36} {'generation':12} {'epoch':>5} {'size':>12}  holds")
    for name in run.storage.names():
        found = run.storage.stat(name)
        if found is not None and found.folder:
            print(f"{name + '/':36} {'':12} {'':>5} {'':>12}  "
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
            generation, holds = "retired", _what(record)
        else:
            generation = "previous" if is_previous_name(name) else "committed"
            holds = _what(record) or record.get("kind", "")
        epoch = _epoch_of_record(record)
        size = actual_size if actual_size is not None else "?"
        print(f"{name:36} {generation:12} {epoch:>5} {size:>12}  {holds}")
    return 0


def _epoch_of_record(record):
    """The 0-based epoch a file's state is from ('' when it is not from the end of an epoch)."""
    if not record or record.get("samples_done") or not isinstance(record.get("epochs_done"), int):
        return ""
    return record["epochs_done"] - 1 if record["epochs_done"] > 0 else ""


def _model_state(run, which, epoch):
    """The verified model ``state_dict`` of a run (state files only, never the structure file), and its record."""
    verifier = _verifier(run)
    if epoch is not None:
        candidates = [(epoch_model_name(epoch), "model"), (epoch_checkpoint_name(epoch), "checkpoint")]
    elif which == "last":
        candidates = [(LAST_NAME, "checkpoint")]
    else:
        candidates = [(BEST_MODEL_NAME, "model"), (BEST_NAME, "checkpoint")]
    found = [(name, kind, path, record)
             for name, kind in candidates for path, record in Search(verifier, [name]).all()[0]]
    # the committed generation of any candidate before a previous one of the first
    found.sort(key=lambda entry: entry[3] is not verifier.files.get(entry[0]))
    for name, kind, path, record in found:
        payload, header = load_state_file(path, (kind,), "cpu", record, verifier, mmap=False)
        if record is not verifier.files.get(name):
            print(f"warning: the committed {name} does not verify; exporting the previous generation "
                  f"{os.path.basename(path)} (step {record.get('step', '?')})", file=sys.stderr)
        return payload["model"], os.path.basename(path), header
    what = f"epoch {epoch}" if epoch is not None else f"the {which} model"
    raise ExperimentIOError(f"{run.location} holds no intact file with {what}" + (
        " (epoch files are kept with store_every, store_all_better or a retention; experiment-io list shows them)"
        if epoch is not None else ""))


def cmd_export(args: argparse.Namespace) -> int:
    if args.epoch is not None and args.which is not None:
        print("error: give --which or --epoch, not both", file=sys.stderr)
        return 2
    run = RunDirectory(args.directory)
    state, source, header = _model_state(run, args.which or "best", args.epoch)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if args.format == "safetensors":
        try:
            from safetensors.torch import save as safetensors_bytes
        except ImportError:
            print("error: --format safetensors needs safetensors: pip install 'experiment_io[safetensors]' "
                  "(or use --format state_dict)", file=sys.stderr)
            return 1
        metadata = {"source": run.path(source), "experiment_io_version": __version__}
        metadata.update({k: str(header[k]) for k in ("epochs_done", "step", "format_version") if k in header})
        # safetensors stores each tensor on its own: views and shared storages are written as separate copies
        data = safetensors_bytes({k: v.detach().contiguous().clone() for k, v in state.items()}, metadata=metadata)
        storage.atomic_write(args.out, lambda f: f.write(data), hashed=False)
    else:
        storage.atomic_write(args.out, lambda f: torch.save(state, f), hashed=False)
    done = header.get("epochs_done")
    print(f"{len(state)} tensors of {source} (after {done} epoch(s)) written to {args.out} as {args.format}")
    return 0


def _newest_tracker(run):
    verifier = _verifier(run)
    for name in (LAST_NAME, BEST_NAME):
        generations, _ = Search(verifier, [name]).all()
        if generations:
            path = generations[0][0]
            with verified_source(path, verifier) as source:  # the very file that was verified
                check_archive(source or path)
                state = torch.load(source or path, map_location="cpu", weights_only=True)
            fmt.check_payload(state, path, ("checkpoint",))
            return restore_tracker(state, run.storage, path), path
    raise ExperimentIOError(f"{run.location} holds no intact checkpoint")


def cmd_metrics(args: argparse.Namespace) -> int:
    tracker, path = _newest_tracker(RunDirectory(args.directory))
    if args.hdf5:
        tracker.to_hdf5(args.hdf5)
        print(f"metric history of {len(tracker.epochs)} epochs from {path} written to {args.hdf5}")
        return 0
    columns = [(split, name) for split, values in tracker.history.items() for name in values]
    print("epoch " + " ".join(f"{split + '/' + name:>14}" for split, name in columns))
    for row, epoch in enumerate(tracker.epochs):
        marker = " *" if epoch == tracker.best_epoch else ""
        print(f"{epoch:5d} " + " ".join(f"{tracker.history[s][n][row]:14.6g}" for s, n in columns) + marker)
    print(tracker.summary())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from experiment_io.training.plots import PLOTS_DIRECTORY, plot_history, plotting_available

    if not plotting_available():
        print("error: plot needs matplotlib: pip install 'experiment_io[plots]' (or pip install matplotlib)",
              file=sys.stderr)
        return 1
    run = RunDirectory(args.directory)
    tracker, path = _newest_tracker(run)
    out = args.out or run.folder(PLOTS_DIRECTORY)
    written = plot_history(tracker, out)
    print(f"{len(written)} plot(s) of {len(tracker.epochs)} epochs from {path} written to {out}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from experiment_io.frontends.lineage import tree

    if not os.path.isdir(args.directory):
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return 1
    text = tree(args.directory)
    print(text)
    if text.endswith("(no checkpoints)"):
        models = sorted(n for n in os.listdir(args.directory) if os.path.isdir(os.path.join(args.directory, n))
                        and not n.startswith("."))
        if models:
            print(f"{args.directory} looks like the root of several models; give one of them: "
                  + ", ".join(os.path.join(args.directory, m) for m in models[:5]))
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
        return args.function(args)
    except ExperimentIOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a command line ends in a message, never in a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
