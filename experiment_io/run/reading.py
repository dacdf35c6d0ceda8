"""Reading the files of a run: verified first, and proven unchanged while they were read.

The loaders of :mod:`experiment_io.loading.loaders` read through these functions.
Files are chosen by :class:`~experiment_io.storage.generations.Search`; every file is
verified against the manifest before anything in it is unpickled. While the
structure file is loaded, the state file is looked for and verified in a second
thread. A model file for prediction is then memory-mapped
(``torch.load(mmap=True)``): its bytes, in the page cache since the
verification, are copied straight into the model's parameters. A checkpoint
loaded to resume goes into memory of its own, made resident while the file is
verified (:mod:`experiment_io.platform.residence`), and its tensors become the model's and
the optimizer's without a second copy: a resume needs about the checkpoint's size
in memory, not twice that. After reading a file, the reader checks that its path
still names the file it verified; a writer that replaced it meanwhile makes the
load start over (:func:`until_stable`).
"""
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import torch

try:
    from mmap import MAP_PRIVATE
except ImportError:  # pragma: no cover - Windows: torch maps files its own way
    MAP_PRIVATE = None  # type: ignore[misc, assignment]

from experiment_io.format import codec as fmt
from experiment_io.errors import (CheckpointNotFoundError, CorruptCheckpointError, IncompatibleCheckpointError,
                                  NotACheckpointError)
from experiment_io.storage.generations import Search, base_name, previous_name
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME
from experiment_io.run.trust import load_structure
from experiment_io.experiment.metric_tracker import MetricTracker
from experiment_io.storage.appended import read_prefix
from experiment_io.experiment.training_modules import TrainingModules
from experiment_io.platform.files import NotARegularFile, descriptor_path
from experiment_io.storage.verification import PartMismatch, Verifier, check_archive, remembering_mismatches
from experiment_io.platform.residence import tensors_in
from experiment_io.storage.interface import RunStorage, as_storage
from experiment_io.storage.manifest import MANIFEST_NAME, manifest_identity, manifest_path, read_manifest

__all__ = ["restore_tracker", "require_file", "run_verifier", "verified_record", "load_state_file",
           "load_structure_file", "check_pairing", "until_stable", "verified_source",
           "Replaced"]

if TYPE_CHECKING:
    from experiment_io.platform.residence import Destination

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def require_file(path: Union[str, os.PathLike], what: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{what} {path} does not exist" + (
            " (it is a directory; give the file inside it)" if os.path.isdir(path) else "") + ".")



class Replaced(Exception):
    """A file was replaced (by a writer) between its verification and its load."""


#: How many times a load starts over when files it read were replaced meanwhile
#: (waiting a little longer each time, to let a writer's save end).
_ATTEMPTS = 10


def until_stable(load: Callable[[], _T], directory: Union[RunStorage, str, os.PathLike, None] = None) -> _T:
    """Run ``load()`` until no file it read was replaced while it ran.

    :param directory: the run's storage or directory; a load that fails (no intact generation,
        an unreadable file) while a writer replaced the directory's manifest is run
        again too: the files it found were those of a newer save than the manifest
        it had read.
    """
    with remembering_mismatches():
        return _until_stable(load, directory)


def _until_stable(load, directory):
    replaced = None
    for attempt in range(_ATTEMPTS):
        before = manifest_identity(directory) if directory is not None else None
        try:
            return load()
        except Replaced as e:
            replaced = e.args[0]
        except PartMismatch as e:  # found after the file was mapped: load again, taking that file for damaged
            log.warning("%s", e)
            replaced = e.path
            continue
        except (CorruptCheckpointError, CheckpointNotFoundError, NotACheckpointError):
            if directory is None or manifest_identity(directory) == before:
                raise
            replaced = manifest_path(directory)
        log.info("%s was replaced while it was loaded (a process is writing the run); loading again", replaced)
        time.sleep(0.005 * attempt)
    raise CorruptCheckpointError(
        f"{replaced} was replaced by a new file each of the {_ATTEMPTS} times it was loaded: a live process keeps "
        "writing into the run directory (the files are not damaged). Load again when it pauses, or load the files "
        "of a copy of the directory."
    )


def verified_record(path: Union[str, os.PathLike], verify: bool,
                    verifier: Optional[Verifier] = None) -> tuple[Optional[dict[str, Any]], Optional[Verifier]]:
    """Verify a file named by the user against the manifest of its directory.

    The file may match the record of its own name or of the other generation of its
    name (a crash between a rename and the manifest's commit leaves it so).

    :return: ``(record, verifier)``; without ``verify`` the record of the file's name
        (or ``None``) and no verifier.
    """
    directory, name = os.path.split(os.path.abspath(path))
    manifest = read_manifest(directory)
    files = manifest[1] if manifest else None
    if not verify:
        log.warning("loading %s without verification (verify=False)", path)
        return (files.get(name) if files else None), None
    base = base_name(name)
    if files is None or not ({base, previous_name(base)} & set(files)):
        where = "there is no manifest beside it" if files is None else f"{MANIFEST_NAME} has no record of it"
        raise CorruptCheckpointError(
            f"{path} cannot be verified: {where}. Keep {MANIFEST_NAME} with the checkpoint files "
            "(copy the run directory whole), or pass verify=False to load it unverified."
        )
    if verifier is None or verifier.directory != directory:
        verifier = Verifier(directory, files)
    records = [files[n] for n in (base, previous_name(base)) if n in files]
    for record in records:
        if verifier.matches(path, record):
            return record, verifier
    problem = verifier.describe(os.path.abspath(path), files.get(name))
    raise CorruptCheckpointError(f"{problem}. The file was truncated or modified after it was written.")



def torch_load(path: Union[str, os.PathLike], map_location: Any, *, mmap: bool = False, read_from: Optional[str] = None,
               destination: "Optional[Destination]" = None) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` (read from ``read_from``, a verified descriptor's path).

    :param destination: a :class:`~experiment_io.platform.residence.Destination`: the file is mapped and its
        tensors copied into the memory made ready there (``mmap`` is then implied).
    """
    source = read_from or path
    check_archive(source)
    mapped = mmap or destination is not None
    try:
        # a map of our own (MAP_PRIVATE), whatever torch's default: writes to the tensors never reach the file
        with (torch.serialization.set_default_mmap_options(MAP_PRIVATE) if mapped and MAP_PRIVATE
              else contextlib.nullcontext()):
            payload = torch.load(source, map_location=map_location, weights_only=True, mmap=mapped)
        return destination.adopt(payload) if destination is not None else payload
    except Exception as e:  # torch raises many types for a foreign or damaged file
        if mapped:  # a file system without mmap, a tensor that cannot leave the map: read the file instead
            if destination is not None:
                destination.release()
            return torch_load(path, map_location, read_from=read_from)
        raise NotACheckpointError(f"{path} is not a readable experiment_io state file: {e}") from e


@contextlib.contextmanager
def verified_source(path: Union[str, os.PathLike], verifier: Optional[Verifier], *,
                    finished_by_caller: bool = False) -> Iterator[Optional[str]]:
    """A read of a verified file. Yields the path to read: that of a descriptor opened on the very file that was
    verified, so that what a writer (or anyone) renames over ``path`` meanwhile is never read; :class:`Replaced`
    when ``path`` names another file by then.

    What a deferring verifier left unverified (the parts of a file's large tensors) is verified before the read,
    unless ``finished_by_caller``: the caller then calls
    :meth:`~experiment_io.storage.verification.Verifier.finish` with what it read, before it hands
    anything over."""
    if verifier is None:
        yield None
        return
    try:
        fd = verifier.open_verified(path)
    except (FileNotFoundError, NotARegularFile):
        fd = None
    if fd is None:
        raise Replaced(path)
    source = descriptor_path(fd)
    try:
        if not finished_by_caller:
            verifier.finish(path, read_from=source)
        yield source
    except NotACheckpointError:
        if not verifier.unchanged(path):
            raise Replaced(path) from None
        raise
    finally:
        os.close(fd)
    if source is None and not verifier.unchanged(path):  # read by path (no /proc): was it the verified file?
        raise Replaced(path)


def load_state_file(path: str, kinds: Collection[str], map_location: Any, record: Optional[Mapping[str, Any]],
                    verifier: Optional[Verifier] = None, *, mmap: bool = True,
                    destination: "Optional[Destination]" = None,
                    wanted: Optional[Callable[[Any], Any]] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a verified state file (through a memory map, with ``mmap``); check its kind and version.

    With a ``destination`` (:class:`~experiment_io.platform.residence.Destination`), the tensors are copied from
    the map into the memory it made ready. The parts of large tensors that the verifier left (it defers them,
    :mod:`experiment_io.storage.parts`) are verified once the file is mapped, in the map; with ``wanted`` (a
    function of the payload that gives what the caller will hand over), only the parts of those tensors: the
    caller must use nothing else of the payload's tensors.

    A model file of format 3 (a plain ``state_dict``) is returned as ``{"model": state_dict}`` with the header
    of its manifest record.
    """
    with verified_source(path, verifier, finished_by_caller=True) as source:
        payload = torch_load(path, map_location, mmap=mmap, read_from=source, destination=destination)
        if verifier is not None:
            chosen = wanted(payload) if wanted is not None else None
            verifier.finish(path, tensors_in(payload), None if chosen is None else tensors_in(chosen),
                            read_from=source)
    plain_model = fmt.model_from_record(payload, path, record)
    if plain_model is not None:
        if "model" not in kinds:
            raise NotACheckpointError(f"{path} is an experiment_io 'model' file, but a "
                                      f"{' or '.join(repr(k) for k in kinds)} file was expected here.")
        return plain_model
    return payload, fmt.check_payload(payload, path, kinds)


def load_structure_file(path: str, allow: Sequence[Any], trusted: bool, record: Optional[Mapping[str, Any]],
                        verifier: Optional[Verifier] = None, model_only: bool = False) -> dict[str, Any]:
    with verified_source(path, verifier) as source:
        payload = load_structure(path, allow=allow, trusted=trusted, digest=record and record["digest"],
                                 read_from=source, model_only=model_only)
    fmt.check_payload(payload, path, ("structure",))
    held = payload.get("training_modules")
    if not isinstance(held, TrainingModules) or not isinstance(held.model, torch.nn.Module):
        found = type(held.model if isinstance(held, TrainingModules) else held).__name__
        raise NotACheckpointError(f"{path} is not a structure file of experiment_io: it holds no TrainingModules "
                                  f"with a model (found {found}). Load the run's own experiment_structure.pt, or "
                                  "write one with train_model.")
    return payload


def restore_tracker(state: Mapping[str, Any], storage: RunStorage, state_path: str) -> MetricTracker:
    """The metric tracker of a checkpoint payload, with its history read back (verified) from the run's file that
    keeps it, up to where the checkpoint was saved (what a later save appended is ignored).

    :raises CorruptCheckpointError: when that file is missing or its part does not verify.
    """
    tracker_state = state["metric_tracker"]
    kept = MetricTracker.history_file(tracker_state)
    if kept is None:
        return MetricTracker.from_state_dict(tracker_state)
    name = kept.get("file")
    if not isinstance(name, str) or os.path.basename(name) != name or name.startswith("."):
        raise CorruptCheckpointError(f"{state_path} keeps its metric history in {name!r}, not a file of a run")
    if kept.get("rows") == 0:  # saved before the first epoch ended: no row to read (the file's header changed since)
        text = MetricTracker(tracker_state["stopping_key"]).to_csv()
    else:
        try:
            text = read_prefix(storage, name, kept).decode("utf-8")
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{state_path}: its metric history is lost ({e}); an older checkpoint may "
                                         "still have its part of the history") from e
        except UnicodeDecodeError as e:
            raise CorruptCheckpointError(f"{state_path}: the metric history in {storage.path(name)} is not text") from e
    try:
        return MetricTracker.from_state_dict(tracker_state, text)
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{state_path}: the metric history in {storage.path(name)} does not fit the "
                                     f"checkpoint ({e})") from e


def check_pairing(state_path: Union[str, os.PathLike], header: Mapping[str, Any],
                  structure_path: Union[str, os.PathLike], structure_record: Optional[Mapping[str, Any]]) -> None:
    expected = header.get("structure_digest")
    if structure_record is not None and expected is not None and expected != structure_record["digest"]:
        raise IncompatibleCheckpointError(
            f"{state_path} was written for another structure file than {structure_path} "
            f"(it expects digest {expected}, the structure file has {structure_record['digest']}). "
            "Load files of one run directory together."
        )



def with_remedy(error: CorruptCheckpointError, directory: Union[RunStorage, str, os.PathLike, None],
                roles: Collection[str]) -> CorruptCheckpointError:
    """``error`` (no intact checkpoint) with the way on: the best model, when it is intact and was not asked for."""
    if BEST_MODEL_NAME in roles or "\nWays on:" in str(error):
        return error
    try:  # load_model_from_cwd needs the best model and the structure file
        verifier = run_verifier(directory)
        intact = all(Search(verifier, [name]).all()[0] for name in (BEST_MODEL_NAME, STRUCTURE_NAME))
    except Exception:  # noqa: BLE001 - the remedy is a hint: the error it adds to is the one to raise
        intact = False
    if intact:
        way = (f"{BEST_MODEL_NAME} is intact: load_model_from_cwd(directory={verifier.directory!r}) loads the best "
               "model for prediction. Training cannot resume exactly without a checkpoint: start it again in another "
               "directory, or in this one with overwrite=True (which replaces the run, its best model included).")
    else:
        way = ("restore the run's files from a copy, or start the run again in another directory (or in this one "
               "with overwrite=True).")
    return CorruptCheckpointError(f"{error}\nWays on: {way}")


def run_verifier(directory: Union[RunStorage, str, os.PathLike, None], *, defer: bool = False) -> Verifier:
    """The :class:`~experiment_io.storage.verification.Verifier` of a run directory (default: the current one).

    :param defer: leave the parts of large tensors to be verified where the file is mapped
        (:class:`~experiment_io.storage.verification.Verifier`'s ``defer``); for loaders that read state files with
        :func:`load_state_file`.

    :raises CheckpointNotFoundError: for a missing directory, or one that holds no run.
    :raises CorruptCheckpointError: for state files without a manifest.
    """
    storage = as_storage(directory)
    directory = storage.location
    if not storage.exists():
        raise CheckpointNotFoundError(f"run directory {directory} does not exist.")
    manifest = read_manifest(storage)
    if manifest is None:
        names = [LAST_NAME, BEST_NAME, BEST_MODEL_NAME]
        names += [previous_name(name) for name in names]
        state_files = [name for name in names if _is_file(storage, name)]
        if not state_files and _is_file(storage, STRUCTURE_NAME):
            raise CheckpointNotFoundError(
                f"{directory} holds only the {STRUCTURE_NAME} of a run that was killed before its first save "
                "committed: there is no checkpoint to resume from. Start the run from the beginning."
            )
        if state_files:
            raise CorruptCheckpointError(
                f"{directory} holds {', '.join(state_files)} but no {MANIFEST_NAME}, so nothing in it can be verified. "
                "Restore the manifest, or load the files by path with load_checkpoint(..., verify=False)."
            )
        raise CheckpointNotFoundError(
            f"{directory} holds no experiment_io run (no {MANIFEST_NAME} or {STRUCTURE_NAME}). "
            "Change to the directory train_model ran in, or start a new run."
        )
    return Verifier(storage, manifest[1], defer=defer)


def _is_file(storage, name):
    found = storage.stat(name)
    return found is not None and found.regular
