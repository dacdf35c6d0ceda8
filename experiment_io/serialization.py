"""Loading runs back: resume training, or get the best model for prediction.

Every file is verified against the run's manifest before anything in it is
unpickled. State files load with ``torch.load(weights_only=True)``; the structure
file goes through the trust gate (:mod:`experiment_io.trust`). After a load, every
tensor lies on a known device (see :mod:`experiment_io.devices`).
"""
import logging
import os

import torch

from . import format as fmt
from . import storage
from .checkpoint import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, TrainingPosition
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


def _verified_record(path, verify):
    """Verify a file named by the user against the manifest of its directory; return its record.

    The file may match the record of its own name or of the other generation of its
    name (a crash between a rename and the manifest's commit leaves it so).
    """
    directory, name = os.path.split(os.path.abspath(path))
    files = _read_manifest(directory)
    if not verify:
        log.warning("loading %s without verification (verify=False)", path)
        return files.get(name) if files else None
    base = name.replace(".prev.", ".")
    if files is None or not ({base, storage.previous_name(base)} & set(files)):
        where = "there is no manifest beside it" if files is None else f"{storage.MANIFEST_NAME} has no record of it"
        raise CorruptCheckpointError(
            f"{path} cannot be verified: {where}. Keep {storage.MANIFEST_NAME} with the checkpoint files "
            "(copy the run directory whole), or pass verify=False to load it unverified."
        )
    generations, problems = storage.find_generations(directory, base, files)
    for found, record in generations:
        if os.path.samefile(found, path):
            return record
    problem = next((p for p in problems if p.startswith(os.path.abspath(path))), f"{path}: does not verify")
    raise CorruptCheckpointError(f"{problem}. The file was truncated or modified after it was written.")


def _torch_load(path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a foreign or damaged file
        raise NotACheckpointError(f"{path} is not a readable experiment_io state file: {e}") from e


def _load_state_file(path, kinds, map_location, record):
    payload = _torch_load(path, map_location)
    return payload, fmt.check_payload(payload, path, kinds)


def _load_structure_file(path, allow, trusted, record):
    payload = load_structure(path, allow=allow, trusted=trusted, digest=record and record["digest"])
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
    """The device for the model and training loss, or ``None`` to leave them where ``map_location`` put them."""
    check_location_args(map_location, model_device)
    if map_location is not None:
        return None
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


def _place(training_modules, device, map_location):
    model, loss, evaluator = training_modules
    device = device if device is not None else _plain_device(map_location)
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
    try:
        _place(training_modules, device, map_location)
        model, loss, evaluator = training_modules
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
    structure_record = _verified_record(structure_fname, verify)
    state_record = _verified_record(state_fname, verify)
    structure = _load_structure_file(structure_fname, allow, trusted, structure_record)
    state, header = _load_state_file(state_fname, ("checkpoint",), _location(map_location), state_record)
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
        if os.path.isfile(os.path.join(directory, STRUCTURE_NAME)):
            raise CorruptCheckpointError(
                f"{directory} holds {STRUCTURE_NAME} but no {storage.MANIFEST_NAME}, so nothing in it can be verified. "
                "Restore the manifest, or load the files by path with load_checkpoint(..., verify=False)."
            )
        raise CheckpointNotFoundError(
            f"{directory} holds no experiment_io run (no {storage.MANIFEST_NAME} or {STRUCTURE_NAME}). "
            "Change to the directory train_model ran in, or start a new run."
        )
    return directory, files


def _pick(directory, files, roles, strict, structure_digest=None, newest_first=False):
    """The first intact generation, in the order of ``roles``, that belongs to ``structure_digest``.

    :param roles: file names, each optionally suffixed ``":current"`` (only the
        generation holding the committed record of that name) or ``":older"`` (only
        the previous generation).
    :param newest_first: take the generation with the highest step first, whatever
        its role (ties go to the earlier role).
    :return: ``(path, record, problems)``.
    :raises CorruptCheckpointError: in strict mode at the first problem; otherwise
        when no generation verifies.
    """
    problems, candidates = [], []
    for rank, role in enumerate(roles):
        name, _, which = role.partition(":")
        generations, role_problems = storage.find_generations(directory, name, files)
        if which == "current":
            generations = [g for g in generations if g[1] is files.get(name)]
        elif which == "older":
            generations = [g for g in generations if g[1] is not files.get(name)]
            role_problems = []  # reported with the current generation already
        if strict and role_problems:
            raise CorruptCheckpointError(f"{role_problems[0]} (strict=True: no fallback to another generation).")
        problems += [p for p in role_problems if p not in problems]
        candidates += [(path, record, rank) for path, record in generations]
    if newest_first:
        candidates.sort(key=lambda c: (-c[1].get("step", 0), c[2]))
    for path, record, _ in candidates:
        if structure_digest is not None and record.get("structure_digest") not in (None, structure_digest):
            problems.append(f"{path}: written for another structure file than the one loaded")
            if strict:
                raise IncompatibleCheckpointError(f"{problems[-1]} (strict=True).")
            continue
        if problems:
            log.warning("using %s; skipped: %s", path, "; ".join(problems))
        return path, record, problems
    names = sorted({role.partition(":")[0] for role in roles})
    if not problems:
        raise CheckpointNotFoundError(
            f"{directory} has no {' or '.join(names)}: no checkpoint has been written there yet. "
            "Start the run from the beginning."
        )
    listed = "\n  - ".join(problems)
    raise CorruptCheckpointError(f"no intact generation of {' or '.join(names)} in {directory}:\n  - {listed}")


def _pick_structure_and_state(directory, files, roles, strict, newest_first=False):
    """A structure generation and a state generation written for it (newest first)."""
    structures, structure_problems = storage.find_generations(directory, STRUCTURE_NAME, files)
    if strict and structure_problems:
        raise CorruptCheckpointError(f"{structure_problems[0]} (strict=True: no fallback to another generation).")
    if not structures:
        raise CorruptCheckpointError(f"no intact {STRUCTURE_NAME} in {directory}:\n  - " + "\n  - ".join(structure_problems))
    error = None
    for structure_path, structure_record in structures:
        try:
            state_path, state_record, _ = _pick(directory, files, roles, strict, structure_record["digest"], newest_first)
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            error = error or e
            continue
        if structure_problems:
            log.warning("using %s; skipped: %s", structure_path, "; ".join(structure_problems))
        return structure_path, structure_record, state_path, state_record
    raise error


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
    try:
        directory, files = _run_directory(directory)
        structure_path, structure_record, state_path, state_record = _pick_structure_and_state(
            directory, files, roles, strict, newest_first=True)
    except CheckpointNotFoundError:
        if missing_ok:
            log.info("no checkpoint in %s: starting fresh", directory or os.getcwd())
            return None
        raise
    structure = _load_structure_file(structure_path, allow, trusted, structure_record)
    state, header = _load_state_file(state_path, ("checkpoint",), _location(map_location), state_record)
    return _assemble(structure, structure_path, state, header, state_path, map_location=map_location,
                     model_device=model_device, database=database, restart_db=restart_db, allow=allow,
                     restore_rng=restore_rng)


def load_model_from_cwd(map_location=None, model_device=None, *, directory=None, strict=False, allow=(), trusted=False):
    """Load the best model of the run in the current directory, ready for prediction.

    The model comes from the structure file with the weights of ``best_model.pt``; if
    that does not verify (or the run did not store it), the best model state carried
    by ``last_checkpoint.pt``, then by ``best_checkpoint.pt``, is used. It is returned
    in evaluation mode.

    :param map_location: as for :func:`torch.load`.
    :param model_device: ``'cpu'``, ``'cuda:N'`` or ``'auto'``; not with ``map_location``.
    :param strict: raise at the first file that does not verify instead of falling back.
    :return: the :class:`torch.nn.Module`.
    """
    check_location_args(map_location, model_device)
    directory, files = _run_directory(directory)
    structure_path, structure_record, model_path, record = _pick_structure_and_state(
        directory, files, [BEST_MODEL_NAME + ":current", LAST_NAME, BEST_NAME, BEST_MODEL_NAME + ":older"], strict)
    structure = _load_structure_file(structure_path, allow, trusted, structure_record)
    payload, header = _load_state_file(model_path, ("model", "checkpoint"), _location(map_location), record)
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
    target = device if device is not None else _plain_device(map_location)
    if target is not None:
        model.to(target)
    _load_model_state(model, model_state, model_path)
    model.eval()
    log.info("best model (after %s epochs) loaded from %s", header.get("epochs_done"), model_path)
    return model
