"""Loading what :func:`~experiment_io.atomic_save` wrote: :func:`~experiment_io.verified_load`.

A file is loaded only after it verifies against the record its directory's manifest
keeps; when it does not, the previous generation is loaded if it verifies (or, with
``strict=True``, the load raises). Nothing is unpickled before it verifies, and then
only with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import torch

from experiment_io.errors import (CheckpointNotFoundError, CorruptCheckpointError, NotACheckpointError,
                                  UnsafeCheckpointError)
from experiment_io.run.reading import until_stable, verified_source
from experiment_io.storage.generations import Search, previous_name
from experiment_io.storage.manifest import MANIFEST_NAME, read_manifest
from experiment_io.storage.verification import Verifier, check_archive

__all__ = ["verified_load", "split_path"]

log = logging.getLogger(__name__)


def split_path(path: str | os.PathLike) -> tuple[str, str, str]:
    """``(absolute path, its directory, its name)``."""
    path = os.path.abspath(os.fspath(path))
    return (path, *os.path.split(path))


def _pick(path, verifier, name, strict):
    """The file holding the generation to load (only the files ranked before it are read)."""
    directory, files = verifier.directory, verifier.files
    search = Search(verifier, [name], strict)
    found = next(iter(search), None)
    problems = search.problems
    if found:
        chosen, record = found
        if record is not files.get(name):
            log.warning("%s does not verify; loading its previous generation %s instead (%s)",
                        path, chosen, "; ".join(problems))
        elif chosen != path:
            log.info("loading %s from %s, where an interrupted save left it", path, chosen)
        return chosen
    if not any(os.path.exists(os.path.join(directory, n)) for n in (name, previous_name(name))):
        raise CheckpointNotFoundError(f"{path} does not exist (nor its previous generation), although "
                                      f"{MANIFEST_NAME} lists it: it was deleted after it was saved.")
    listed = "\n  - ".join(problems or [f"{MANIFEST_NAME} records only the previous generation"])
    if strict:
        raise CorruptCheckpointError(
            f"the committed generation of {path} does not verify (strict=True: no fallback to the previous "
            f"generation):\n  - {listed}")
    raise CorruptCheckpointError(f"no intact generation of {path} in {directory}:\n  - {listed}")


def verified_load(path: str | os.PathLike, *, map_location: Any = None, strict: bool = False) -> Any:
    """Load a file written by :func:`atomic_save`, after proving it intact.

    The file is checked against the digest and size that its directory's manifest
    records. When it does not verify (truncated, bit-flipped, missing), the previous
    generation ``<name>.prev<ext>`` is loaded instead if it verifies, and a warning
    names both; after a save that a crash interrupted, the last committed
    generation is loaded, wherever the crash left it.

    Nothing is unpickled before it verifies, and then only with
    ``torch.load(..., weights_only=True)``, passed explicitly (so the
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` variable does not weaken it). There is no
    retry with ``weights_only=False``.

    :param path: the file that :func:`atomic_save` wrote.
    :param map_location: as for :func:`torch.load`.
    :param strict: load only the committed generation: raise instead of falling back
        to the previous one.
    :return: the saved object.
    :raises CheckpointNotFoundError: when the file does not exist.
    :raises CorruptCheckpointError: when no acceptable generation verifies, or when
        the file cannot be verified at all: no manifest beside it, or no record of it
        in the manifest (a file written by plain ``torch.save``).
    :raises UnsafeCheckpointError: when the file holds objects that
        ``weights_only=True`` does not admit.
    :raises NotACheckpointError: when ``torch.load`` fails otherwise (for instance,
        ``map_location`` names a device that this machine lacks).
    """
    path, directory, name = split_path(path)
    return until_stable(lambda: _load_once(path, directory, name, map_location, strict), directory)


def _load_once(path, directory, name, map_location, strict):
    """Verify, then load; :class:`~experiment_io.run.reading.Replaced` when a writer replaced the file meanwhile."""
    manifest = read_manifest(directory) if os.path.isdir(directory) else None
    files = manifest[1] if manifest else {}
    if name not in files and previous_name(name) not in files:
        if not os.path.exists(path):
            raise CheckpointNotFoundError(f"{path} does not exist.")
        where = "there is no manifest beside it" if manifest is None else f"{MANIFEST_NAME} has no record of it"
        raise CorruptCheckpointError(
            f"{path} cannot be verified: {where}. verified_load reads only files written by atomic_save, "
            f"with {MANIFEST_NAME} kept beside them (copy the directory whole). "
            "A file you trust that was written otherwise loads with torch.load(path, weights_only=True)."
        )
    verifier = Verifier(directory, files)
    chosen = _pick(path, verifier, name, strict)
    with verified_source(chosen, verifier) as source:  # the very file that was verified
        check_archive(source or chosen)
        try:
            return torch.load(source or chosen, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{chosen} holds objects that torch.load(weights_only=True) does not admit: {e}\n"
                "Save state_dicts and plain data instead, or, for classes you trust, register them with "
                "torch.serialization.add_safe_globals([...]) before loading. verified_load never loads "
                "with weights_only=False."
            ) from e
        except Exception as e:  # torch raises many types for bytes it cannot read
            raise NotACheckpointError(
                f"{chosen} verifies against its manifest record, but torch.load cannot read it: {e}") from e

