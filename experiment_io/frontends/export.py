"""``experiment-io export``: a run's model weights as a plain ``state_dict`` or safetensors file.

Only state files are read (``torch.load(weights_only=True)``, after verification),
never the structure file.
"""
import argparse
import os
import sys

import torch

from experiment_io.errors import ExperimentIOError
from experiment_io.frontends.describe import shown
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, epoch_checkpoint_name, epoch_model_name
from experiment_io.run.reading import load_state_file, run_verifier
from experiment_io.storage import atomic as storage
from experiment_io.storage.generations import Search
from experiment_io.storage.run_directory import RunDirectory
from experiment_io.version import __version__

__all__ = ["cmd_export"]


def _model_state(run, which, epoch):
    """The verified model ``state_dict`` of a run (state files only, never the structure file), and its record."""
    verifier = run_verifier(run.storage)
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
                  f"{shown(os.path.basename(path))} (step {record.get('step', '?')})", file=sys.stderr)
        return payload["model"], os.path.basename(path), header
    what = f"epoch {epoch}" if epoch is not None else f"the {which} model"
    raise ExperimentIOError(f"{run.location} holds no intact file with {what}" + (
        " (epoch files are kept with store_every, store_all_better or a retention; experiment-io list shows them)"
        if epoch is not None else ""))


def cmd_export(args: argparse.Namespace) -> int:
    """Write the weights of the model ``args`` asks for to ``args.out``."""
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
