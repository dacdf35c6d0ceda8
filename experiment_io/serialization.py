"""Loading runs back: resume training, or get the best model for prediction.

Every file is verified against the run's manifest before anything in it is
unpickled. State files load with ``torch.load(weights_only=True)``; the structure
file goes through the trust gate (:mod:`experiment_io.trust`). After a load, every
tensor lies on a known device (see :mod:`experiment_io.devices`).

A load reads each file it uses once to verify it, and only the files it uses (and
those it skips because they do not verify): candidates are verified one by one,
best first, and the search stops at the first that verifies. The state file is
verified in a second thread while the (already verified) structure file is
unpickled. State files are then
memory-mapped (``torch.load(mmap=True)``): their bytes, in the page cache since the
verification, are copied straight into the model's parameters, with no second copy
in between; the other tensors of the state (optimizer state, best model state, ...)
are then copied into memory of their own, so that no file stays mapped after the
load. After reading a file, the loader checks that its path still names the file it
verified; a writer that replaced it meanwhile makes the load start over.
"""
import logging
import os
import threading

import torch

from . import format as fmt
from . import storage
from .checkpoint import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, TrainingPosition
from .asynchronous import with_own_memory
from .databases import restore_database
from .devices import check_location_args, resolve_device
from .errors import (
    CheckpointNotFoundError,
    ExperimentIOError,
    CorruptCheckpointError,
    DeviceError,
    IncompatibleCheckpointError,
    MissingDatabaseError,
    NotACheckpointError,
)
from .metric_tracker import MetricTracker
from .rng import placed_on_cpu, set_rng_state
from .skeleton import materialize
from .training_modules import TrainingModules
from .trust import load_structure

__all__ = ["load_checkpoint", "load_checkpoint_from_cwd", "load_model_from_cwd"]

log = logging.getLogger(__name__)

_CHECKPOINT_NAMES = {"last": LAST_NAME, "best": BEST_NAME}


def _exists(path, what):
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{what} {path} does not exist" + (
            " (it is a directory; give the file inside it)" if os.path.isdir(path) else "") + ".")


def _read_manifest(directory):
    manifest = storage.read_manifest(directory)
    return manifest[1] if manifest else None


class _Replaced(Exception):
    """A file was replaced (by a writer) between its verification and its load."""


#: How many times a load starts over when files it read were replaced meanwhile.
_ATTEMPTS = 5


def _until_stable(load):
    """Run ``load()`` until no file it read was replaced while it ran."""
    replaced = None
    for _ in range(_ATTEMPTS):
        try:
            return load()
        except _Replaced as e:
            replaced = e.args[0]
            log.info("%s was replaced while it was loaded (a process is writing the run); loading again", replaced)
    raise CorruptCheckpointError(
        f"{replaced} was replaced by a new file each of the {_ATTEMPTS} times it was loaded: a process keeps "
        "writing into the run directory. Load again when it pauses (or load the files of a copy of the directory)."
    )


def _verified_record(path, verify, verifier=None):
    """Verify a file named by the user against the manifest of its directory.

    The file may match the record of its own name or of the other generation of its
    name (a crash between a rename and the manifest's commit leaves it so).

    :return: ``(record, verifier)``; without ``verify`` the record of the file's name
        (or ``None``) and no verifier.
    """
    directory, name = os.path.split(os.path.abspath(path))
    files = _read_manifest(directory)
    if not verify:
        log.warning("loading %s without verification (verify=False)", path)
        return (files.get(name) if files else None), None
    base = name.replace(".prev.", ".")
    if files is None or not ({base, storage.previous_name(base)} & set(files)):
        where = "there is no manifest beside it" if files is None else f"{storage.MANIFEST_NAME} has no record of it"
        raise CorruptCheckpointError(
            f"{path} cannot be verified: {where}. Keep {storage.MANIFEST_NAME} with the checkpoint files "
            "(copy the run directory whole), or pass verify=False to load it unverified."
        )
    if verifier is None or verifier.directory != directory:
        verifier = storage.Verifier(directory, files)
    records = [files[n] for n in (base, storage.previous_name(base)) if n in files]
    for record in records:
        if verifier.matches(path, record):
            return record, verifier
    problem = verifier.describe(os.path.abspath(path), files.get(name))
    raise CorruptCheckpointError(f"{problem}. The file was truncated or modified after it was written.")


def _torch_load(path, map_location, *, mmap=False):
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a foreign or damaged file
        if mmap:  # a file system without mmap, or a file of the legacy format: read it instead
            return _torch_load(path, map_location)
        raise NotACheckpointError(f"{path} is not a readable experiment_io state file: {e}") from e


def _load_state_file(path, kinds, map_location, record, verifier=None):
    """Load a verified state file through a memory map; check its kind and version."""
    payload = _torch_load(path, map_location, mmap=True)
    if verifier is not None and not verifier.unchanged(path):
        raise _Replaced(path)
    return payload, fmt.check_payload(payload, path, kinds)


def _load_structure_file(path, allow, trusted, record, verifier=None):
    payload = load_structure(path, allow=allow, trusted=trusted, digest=record and record["digest"])
    if verifier is not None and not verifier.unchanged(path):
        raise _Replaced(path)
    fmt.check_payload(payload, path, ("structure",))
    return payload


def _check_pairing(state_path, header, structure_path, structure_record):
    expected = header.get("structure_digest")
    if structure_record is not None and expected is not None and expected != structure_record["digest"]:
        raise IncompatibleCheckpointError(
            f"{state_path} was written for another structure file than {structure_path} "
            f"(it expects digest {expected}, the structure file has {structure_record['digest']}). "
            "Load files of one run directory together."
        )


def _target_device(map_location, model_device, header, path):
    """The device for the model and training loss: the one a plain ``map_location``
    names, or ``None`` to leave them where another ``map_location`` put them."""
    check_location_args(map_location, model_device)
    if map_location is not None:
        return _plain_device(map_location)
    if model_device is not None:
        return resolve_device(model_device)
    saved = header.get("model_device", "cpu")
    try:
        return resolve_device(saved)
    except DeviceError as e:
        raise DeviceError(
            f"{path} holds a model saved on {saved}, which this machine does not have. "
            "Pass model_device='cpu' (or 'auto' for the best device here) to the load function."
        ) from e


def _load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise IncompatibleCheckpointError(f"the model state in {path} does not fit the model of the structure file: {e}") from e


def _plain_device(map_location):
    """The device a plain ``map_location`` (string or device) names, else ``None``."""
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return None


def _place(training_modules, device):
    """Move the model and the training loss to ``device`` (``None``: leave them); evaluation losses to the CPU."""
    model, loss, evaluator = training_modules
    if device is not None:
        model.to(device)
        if isinstance(loss, torch.nn.Module):
            loss.to(device)
    for fn in evaluator.evaluation_losses.values():
        if isinstance(fn, torch.nn.Module):
            fn.to("cpu")


def _assemble(structure, structure_path, state, header, state_path, *, map_location, model_device, database,
              restart_db, allow, restore_rng):
    """Turn a loaded structure and state into the objects ``train_model`` takes."""
    device = _target_device(map_location, model_device, header, state_path)
    training_modules = structure["training_modules"]
    controller = structure["controller"]
    if not isinstance(training_modules, TrainingModules):
        raise NotACheckpointError(f"{structure_path} holds no TrainingModules (found {type(training_modules).__name__})")
    # the modules copy their states into their own tensors; the rest of the state is
    # kept, so it gets memory of its own instead of the file's mapping
    state = {**state, **with_own_memory({k: v for k, v in state.items() if k not in ("model", "loss", "evaluator")})}
    try:
        model, loss, evaluator = training_modules
        # a structure file of format 2 holds the modules' state tensors as meta tensors
        state["model"] = materialize(model, state["model"], state_path, device=device)
        state["loss"] = materialize(loss, state["loss"], state_path, device=device)
        _place(training_modules, device)
        _load_model_state(model, state["model"], state_path)
        if isinstance(loss, torch.nn.Module):
            loss.load_state_dict(state["loss"])
        evaluator.load_state_dict(state["evaluator"])
        controller.load_state_dict(state["controller"])
        metric_tracker = MetricTracker.from_state_dict(state["metric_tracker"])
        position = TrainingPosition.from_state_dict(state["position"])
        rng_state = placed_on_cpu(state["rng"])
    except ExperimentIOError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as e:
        raise IncompatibleCheckpointError(f"{state_path} does not fit the objects of {structure_path}: {e!r}") from e
    position.interrupted = None
    controller.resume_position = position
    if restore_rng:
        set_rng_state(rng_state)

    if database is None and restart_db:
        descriptor = structure["database"]
        if descriptor is None:
            raise MissingDatabaseError(
                f"the run in {os.path.dirname(os.path.abspath(structure_path))} was trained on an in-memory Database, "
                "which cannot be rebuilt from the checkpoint. Pass database=<the same Database> to the load function."
            )
        database = restore_database(descriptor, allow=allow)
    if database is not None and state.get("database") is not None and hasattr(database, "load_state_dict"):
        database.load_state_dict(state["database"])
    log.info("loaded %s (%s epochs done, step %s) with %s", state_path, header.get("epochs_done"), header.get("step"), structure_path)
    return {"training_modules": training_modules, "controller": controller, "metric_tracker": metric_tracker, "database": database}


def load_checkpoint(structure_fname, state_fname, restart_db=False, map_location=None, model_device=None, *,
                    database=None, allow=(), trusted=False, restore_rng=True, verify=True):
    """Load a structure file and a state file into objects that :func:`train_model` accepts.

    :param structure_fname: path of ``experiment_structure.pt``.
    :param state_fname: path of a checkpoint state file (``last_checkpoint.pt``...).
    :param restart_db: rebuild the database from the descriptor in the structure file.
    :param map_location: as for :func:`torch.load`: where every tensor goes (RNG
        states always go to the CPU).
    :param model_device: where the model and training loss go (``'cpu'``,
        ``'cuda:1'``, ``'auto'``); everything else is placed per type. Do not combine
        with ``map_location``. With neither, the model returns to the device it was
        saved from.
    :param database: a database to use instead of rebuilding one (needed for
        in-memory databases).
    :param allow: classes, functions or module names the structure file may use
        beyond the default families (see :mod:`experiment_io.trust`).
    :param trusted: load the structure file with full pickle (only for files you wrote).
    :param restore_rng: restore every random stream from the checkpoint.
    :param verify: check both files against the manifest first (``False`` loads
        files that have no manifest, with a warning).
    :return: ``{"training_modules", "controller", "metric_tracker", "database"}``.
    :raises ExperimentIOError: a subclass from :mod:`experiment_io.errors` naming the
        file and the fix; no file is modified.
    """
    check_location_args(map_location, model_device)
    _exists(structure_fname, "structure file")
    _exists(state_fname, "checkpoint file")

    def load():
        structure_record, verifier = _verified_record(structure_fname, verify)
        state_record, state_verifier = _verified_record(state_fname, verify, verifier)
        structure = _load_structure_file(structure_fname, allow, trusted, structure_record, verifier)
        state, header = _load_state_file(state_fname, ("checkpoint",), _location(map_location), state_record,
                                         state_verifier)
        return structure, structure_record, state, header

    structure, structure_record, state, header = _until_stable(load)
    _check_pairing(state_fname, header, structure_fname, structure_record)
    return _assemble(structure, structure_fname, state, header, state_fname, map_location=map_location,
                     model_device=model_device, database=database, restart_db=restart_db, allow=allow,
                     restore_rng=restore_rng)


def _location(map_location):
    return map_location if map_location is not None else "cpu"


def _run_directory(directory):
    directory = os.path.abspath(directory if directory is not None else os.getcwd())
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"run directory {directory} does not exist.")
    files = _read_manifest(directory)
    if files is None:
        names = [LAST_NAME, BEST_NAME, BEST_MODEL_NAME]
        names += [storage.previous_name(name) for name in names]
        state_files = [name for name in names if os.path.isfile(os.path.join(directory, name))]
        if not state_files and os.path.isfile(os.path.join(directory, STRUCTURE_NAME)):
            raise CheckpointNotFoundError(
                f"{directory} holds only the {STRUCTURE_NAME} of a run that was killed before its first save "
                "committed: there is no checkpoint to resume from. Start the run from the beginning."
            )
        if state_files:
            raise CorruptCheckpointError(
                f"{directory} holds {', '.join(state_files)} but no {storage.MANIFEST_NAME}, so nothing in it can be verified. "
                "Restore the manifest, or load the files by path with load_checkpoint(..., verify=False)."
            )
        raise CheckpointNotFoundError(
            f"{directory} holds no experiment_io run (no {storage.MANIFEST_NAME} or {STRUCTURE_NAME}). "
            "Change to the directory train_model ran in, or start a new run."
        )
    return directory, files


class _Search:
    """The generations of some files of a run, verified one by one, best first.

    Candidates (a file and a manifest record of its size) are ranked without reading
    any file; iterating verifies them in rank order, each file read at most once,
    and yields those that verify. The first one yielded is the generation that a
    verification of every file would pick; only the files ranked before it are read.

    :param roles: file names, each optionally suffixed ``":current"`` (only the
        generation holding the committed record of that name) or ``":older"`` (only
        the previous generation).
    :param strict: consider only the committed generation (the one the manifest's
        record of its name describes, whichever file holds it after a crash) of the
        first file the manifest lists: no fallback.
    :param newest_first: rank by step first, whatever the role (ties go to the
        earlier role); otherwise by role first, then newest first.
    :ivar problems: one text per file found wrong so far.
    """

    def __init__(self, verifier, roles, strict, *, newest_first=False):
        self.verifier, self.strict, self.problems = verifier, strict, []
        files = verifier.files
        self._candidates, self._reported = [], {}
        if strict:  # only the committed generation of the first file the manifest lists
            roles = [next((r for r in roles if r.partition(":")[0] in files), roles[0]).partition(":")[0] + ":current"]
        for rank, role in enumerate(roles):
            name, _, which = role.partition(":")
            records = None
            if which:
                current = files.get(name)
                records = [files[n] for n in (name, storage.previous_name(name)) if n in files]
                records = [r for r in records if (r is current) == (which == "current")]
            pairs, problems = verifier.candidates(name, records)
            if which != "older":  # an older generation's problems are reported with the current one
                for problem in problems:
                    self.report(problem)
            for order, (path, record) in enumerate(pairs):
                step, written = record.get("step", 0), record.get("written_at", 0)
                key = (-step, rank, -written, order) if newest_first else (rank, -step, -written, order)
                self._candidates.append((key, path, record))
                self._reported.setdefault(path, which == "older")  # older-only files are not reported
        self._candidates.sort(key=lambda c: c[0])

    def report(self, problem):
        """Note a problem."""
        if problem not in self.problems:
            self.problems.append(problem)

    def __iter__(self):
        verifier = self.verifier
        for _, path, record in self._candidates:
            if verifier.matches(path, record):
                yield path, record
            elif not self._reported[path] and not any(verifier.matches(p, r) for _, p, r in self._candidates if p == path):
                self._reported[path] = True
                self.report(verifier.describe(path, verifier.files.get(os.path.basename(path))))


def _pick(verifier, roles, strict, structure_digest=None, newest_first=False):
    """The first intact generation, in the order of ``roles``, that belongs to ``structure_digest``.

    :param roles: as for :class:`_Search`.
    :param newest_first: as for :class:`_Search`.
    :return: ``(path, record, problems)``.
    :raises CorruptCheckpointError: in strict mode at the first problem; otherwise
        when no generation verifies.
    """
    search = _Search(verifier, roles, strict, newest_first=newest_first)
    for path, record in search:
        if structure_digest is not None and record.get("structure_digest") not in (None, structure_digest):
            problem = f"{path}: written for another structure file than the one loaded"
            if strict:
                raise IncompatibleCheckpointError(f"{problem} (strict=True).")
            search.problems.append(problem)
            continue
        if search.problems:
            log.warning("using %s; skipped: %s", path, "; ".join(search.problems))
        return path, record, search.problems
    names = sorted({role.partition(":")[0] for role in roles})
    if not search.problems:
        raise CheckpointNotFoundError(
            f"{verifier.directory} has no {' or '.join(names)}: no checkpoint has been written there yet. "
            "Start the run from the beginning."
        )
    listed = "\n  - ".join(search.problems)
    what = "the committed generation (strict=True: no fallback)" if strict else "an intact generation"
    raise CorruptCheckpointError(f"no {what} of {' or '.join(names)} in {verifier.directory}:\n  - {listed}")


class _Concurrently:
    """Runs ``fn()`` in a thread; :meth:`result` waits for it and returns or raises what it did."""

    def __init__(self, fn):
        self._outcome = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="experiment_io-verify", daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._outcome = (True, fn())
        except BaseException as e:  # handed to the caller by result()
            self._outcome = (False, e)

    def result(self):
        self._thread.join()
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def _pick_structure_and_state(verifier, roles, strict, newest_first, load_structure):
    """A structure generation, loaded, and a state generation written for it (newest first).

    While the structure file is loaded (``load_structure(path, record)``), the state
    file is looked for and verified in a second thread: the verification of the
    state reads its file while the structure is unpickled.

    :return: ``(structure_path, structure_record, structure, state_path, state_record)``.
    """
    structures = _Search(verifier, [STRUCTURE_NAME], strict)
    error = None
    for structure_path, structure_record in structures:
        digest = structure_record["digest"]
        state_pick = _Concurrently(lambda: _pick(verifier, roles, strict, digest, newest_first))
        try:
            structure = load_structure(structure_path, structure_record)
        except BaseException as load_error:
            try:
                state_pick.result()
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                if isinstance(load_error, Exception):  # no state for this structure: it would not be loaded
                    error = error or e
                    continue
            except Exception:  # the load's error is the one to report
                pass
            raise
        try:
            state_path, state_record, _ = state_pick.result()
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            error = error or e
            continue
        if structures.problems:
            log.warning("using %s; skipped: %s", structure_path, "; ".join(structures.problems))
        return structure_path, structure_record, structure, state_path, state_record
    if error is not None:
        raise error
    raise CorruptCheckpointError(f"no intact {STRUCTURE_NAME} in {verifier.directory}:\n  - " + "\n  - ".join(structures.problems))


def load_checkpoint_from_cwd(map_location=None, model_device=None, restart_db=True, *, which="last", strict=False,
                             directory=None, database=None, allow=(), trusted=False, restore_rng=True,
                             missing_ok=False):
    """Load the run in the current directory, ready for ``train_model(**check)``.

    Every file is verified first, and the newest checkpoint that verifies is taken:
    with ``which="last"``, among ``last_checkpoint.pt``, its previous generation and
    ``best_checkpoint.pt`` (and its previous generation), the one with the highest
    step, ``last`` winning ties; each skipped file is logged with the reason.

    :param which: ``"last"`` (the newest checkpoint: it also carries the best model
        and the whole metric history) or ``"best"`` (restart from the best epoch).
    :param strict: raise at the first file that does not verify instead of falling back.
    :param directory: the run directory (default: the current working directory).
    :param database: as for :func:`load_checkpoint`.
    :param allow: as for :func:`load_checkpoint`.
    :param trusted: as for :func:`load_checkpoint`.
    :param restore_rng: as for :func:`load_checkpoint`.
    :param missing_ok: return ``None`` instead of raising when the directory holds no
        checkpoint yet (damaged files still raise). This makes the restart script and
        the first start one script::

            check = load_checkpoint_from_cwd(missing_ok=True) or start_fresh()
            train_model(**check, callbacks=None, batch_callbacks=None)

    :return: as :func:`load_checkpoint`.
    """
    if which not in _CHECKPOINT_NAMES:
        raise ValueError(f"which={which!r}; choose 'last' or 'best'")
    check_location_args(map_location, model_device)
    roles = [LAST_NAME, BEST_NAME] if which == "last" else [BEST_NAME]

    def load():
        verifier = storage.Verifier(*_run_directory(directory))
        structure_path, structure_record, structure, state_path, state_record = _pick_structure_and_state(
            verifier, roles, strict, True, lambda path, record: _load_structure_file(path, allow, trusted, record, verifier))
        state, header = _load_state_file(state_path, ("checkpoint",), _location(map_location), state_record, verifier)
        return structure, structure_path, state, header, state_path

    try:
        structure, structure_path, state, header, state_path = _until_stable(load)
    except CheckpointNotFoundError:
        if missing_ok:
            log.info("no checkpoint in %s: starting fresh", directory or os.getcwd())
            return None
        raise
    return _assemble(structure, structure_path, state, header, state_path, map_location=map_location,
                     model_device=model_device, database=database, restart_db=restart_db, allow=allow,
                     restore_rng=restore_rng)


def load_model_from_cwd(map_location=None, model_device=None, *, directory=None, strict=False, allow=(), trusted=False,
                        mmap=True):
    """Load the best model of the run in the current directory, ready for prediction.

    The model comes from the structure file with the weights of ``best_model.pt``; if
    that does not verify (or the run did not store it), the best model state carried
    by ``last_checkpoint.pt``, then by ``best_checkpoint.pt``, is used. It is returned
    in evaluation mode.

    :param map_location: as for :func:`torch.load`.
    :param model_device: ``'cpu'``, ``'cuda:N'`` or ``'auto'``; not with ``map_location``.
    :param strict: raise at the first file that does not verify instead of falling back.
    :param mmap: on the CPU, leave the weights in the verified file's memory map
        (private, copy-on-write: changing them never changes the file, and
        processes that load the same model share its pages); the file stays
        mapped, and its disk space in use after a writer replaces it, while the
        model lives. ``False`` copies them into memory of their own. Weights
        moved to a GPU never refer to the file.
    :return: the :class:`torch.nn.Module`.
    """
    check_location_args(map_location, model_device)

    def load():
        verifier = storage.Verifier(*_run_directory(directory))
        structure_path, structure_record, structure, model_path, record = _pick_structure_and_state(
            verifier, [BEST_MODEL_NAME + ":current", LAST_NAME, BEST_NAME, BEST_MODEL_NAME + ":older"], strict, False,
            lambda path, record: _load_structure_file(path, allow, trusted, record, verifier))
        payload, header = _load_state_file(model_path, ("model", "checkpoint"), _location(map_location), record, verifier)
        return verifier.directory, structure, structure_path, structure_record, payload, header, model_path

    directory, structure, structure_path, structure_record, payload, header, model_path = _until_stable(load)
    _check_pairing(model_path, header, structure_path, structure_record)
    if header["kind"] == "model":
        model_state = payload["model"]
    else:
        model_state = payload["metric_tracker"].get("best_model_state") if isinstance(payload["metric_tracker"], dict) else None
        if model_state is None:
            raise CheckpointNotFoundError(f"{directory} holds no best model yet: no epoch has finished.")
        log.info("using the best model state carried by %s", model_path)
    device = _target_device(map_location, model_device, header, model_path)
    model = structure["training_modules"].model
    # the weights stay where torch.load put them (the file's memory map, on the CPU)
    model_state = materialize(model, model_state, model_path, device=device, own_memory=not mmap)
    if device is not None:
        model.to(device)
    _load_model_state(model, model_state, model_path)
    model.eval()
    log.info("best model (after %s epochs) loaded from %s", header.get("epochs_done"), model_path)
    return model
