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


def _verified_record(path, verify):
    """Verify ``path`` against the manifest of its directory; return its record (or ``None``)."""
    directory, name = os.path.split(os.path.abspath(path))
    manifest = storage.read_manifest(directory)
    if manifest is None or name not in manifest[1]:
        if not verify:
            log.warning("loading %s without verification (verify=False)", path)
            return None
        where = "there is no manifest beside it" if manifest is None else f"{storage.MANIFEST_NAME} has no record of it"
        raise CorruptCheckpointError(
            f"{path} cannot be verified: {where}. Keep {storage.MANIFEST_NAME} with the checkpoint files "
            "(copy the run directory whole), or pass verify=False to load it unverified."
        )
    record = manifest[1][name]
    if verify:
        storage.verify_file(path, record)
    return record


def _load_state_file(path, kinds, map_location, verify):
    _exists(path, "checkpoint file")
    record = _verified_record(path, verify)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a foreign or damaged file
        raise NotACheckpointError(f"{path} is not a readable experiment_io state file: {e}") from e
    return payload, fmt.check_payload(payload, path, kinds), record


def _load_structure_file(path, allow, trusted, verify):
    _exists(path, "structure file")
    record = _verified_record(path, verify)
    payload = load_structure(path, allow=allow, trusted=trusted, digest=record and record["digest"])
    fmt.check_payload(payload, path, ("structure",))
    return payload, record


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


def _place(training_modules, device, map_location):
    model, loss, evaluator = training_modules
    if device is None and map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        device = torch.device(map_location)
    if device is not None:
        model.to(device)
        if isinstance(loss, torch.nn.Module):
            loss.to(device)
    for fn in evaluator.evaluation_losses.values():
        if isinstance(fn, torch.nn.Module):
            fn.to("cpu")


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
    :param verify: check every file against the manifest first (``False`` loads
        files that have no manifest, with a warning).
    :return: ``{"training_modules", "controller", "metric_tracker", "database"}``.
    :raises CheckpointNotFoundError, NotACheckpointError, CorruptCheckpointError,
        FormatVersionError, IncompatibleCheckpointError, UnsafeCheckpointError,
        MissingDatabaseError, DatabaseRestartError, DeviceError: see :mod:`experiment_io.errors`.
    """
    check_location_args(map_location, model_device)
    structure, structure_record = _load_structure_file(structure_fname, allow, trusted, verify)
    state, header, _ = _load_state_file(state_fname, ("checkpoint",), map_location if map_location is not None else "cpu", verify)
    _check_pairing(state_fname, header, structure_fname, structure_record)
    device = _target_device(map_location, model_device, header, state_fname)

    training_modules = structure["training_modules"]
    if not isinstance(training_modules, TrainingModules):
        raise NotACheckpointError(f"{structure_fname} does not hold TrainingModules")
    controller = structure["controller"]
    _place(training_modules, device, map_location)
    model, loss, evaluator = training_modules
    _load_model_state(model, state["model"], state_fname)
    if isinstance(loss, torch.nn.Module):
        loss.load_state_dict(state["loss"])
    try:
        evaluator.load_state_dict(state["evaluator"])
        controller.load_state_dict(state["controller"])
    except (KeyError, ValueError) as e:
        raise IncompatibleCheckpointError(f"{state_fname} does not fit the objects of {structure_fname}: {e}") from e
    metric_tracker = MetricTracker.from_state_dict(state["metric_tracker"])
    position = TrainingPosition.from_state_dict(state["position"])
    position.interrupted = None
    controller.resume_position = position
    if restore_rng:
        set_rng_state(placed_on_cpu(state["rng"]))

    if database is None and restart_db:
        descriptor = structure["database"]
        if descriptor is None:
            raise MissingDatabaseError(
                f"the run in {os.path.dirname(os.path.abspath(structure_fname))} was trained on an in-memory Database, "
                "which cannot be rebuilt from the checkpoint. Pass database=<the same Database> to the load function."
            )
        database = restore_database(descriptor, allow=allow)
    if database is not None and state.get("database") is not None and hasattr(database, "load_state_dict"):
        database.load_state_dict(state["database"])
    log.info("loaded %s (%s epochs done, step %s) with %s", state_fname, header.get("epochs_done"), header.get("step"), structure_fname)
    return {"training_modules": training_modules, "controller": controller, "metric_tracker": metric_tracker, "database": database}


def _run_directory(directory):
    directory = os.path.abspath(directory if directory is not None else os.getcwd())
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"run directory {directory} does not exist.")
    if not os.path.isfile(os.path.join(directory, STRUCTURE_NAME)):
        raise CheckpointNotFoundError(
            f"{directory} holds no experiment_io run ({STRUCTURE_NAME} is missing). "
            "Change to the directory train_model ran in, or start a new run."
        )
    return directory


def load_checkpoint_from_cwd(map_location=None, model_device=None, restart_db=True, *, which="last",
                             directory=None, **kwargs):
    """Load the run in the current directory, ready for ``train_model(**check)``.

    :param which: ``"last"`` (the newest checkpoint: it also carries the best model
        and the whole metric history) or ``"best"`` (restart from the best epoch).
    :param directory: the run directory (default: the current working directory).
    :param kwargs: further options of :func:`load_checkpoint` (``database``,
        ``allow``, ``trusted``, ``restore_rng``, ``verify``).
    :return: as :func:`load_checkpoint`.
    """
    if which not in _CHECKPOINT_NAMES:
        raise ValueError(f"which={which!r}; choose 'last' or 'best'")
    directory = _run_directory(directory)
    state_path = os.path.join(directory, _CHECKPOINT_NAMES[which])
    if not os.path.isfile(state_path):
        raise CheckpointNotFoundError(
            f"{directory} has no {_CHECKPOINT_NAMES[which]}: the run wrote its structure but no checkpoint yet. "
            "Start it again from the beginning."
        )
    return load_checkpoint(os.path.join(directory, STRUCTURE_NAME), state_path, restart_db=restart_db,
                           map_location=map_location, model_device=model_device, **kwargs)


def load_model_from_cwd(map_location=None, model_device=None, *, directory=None, allow=(), trusted=False, verify=True):
    """Load the best model of the run in the current directory, ready for prediction.

    The model comes from the structure file with the weights of ``best_model.pt``
    (or, when the run did not store it, the best model state carried by
    ``last_checkpoint.pt``), in evaluation mode.

    :param map_location: as for :func:`torch.load`.
    :param model_device: ``'cpu'``, ``'cuda:N'`` or ``'auto'``; not with ``map_location``.
    :return: the :class:`torch.nn.Module`.
    """
    check_location_args(map_location, model_device)
    directory = _run_directory(directory)
    structure_path = os.path.join(directory, STRUCTURE_NAME)
    structure, structure_record = _load_structure_file(structure_path, allow, trusted, verify)
    location = map_location if map_location is not None else "cpu"
    model_path = os.path.join(directory, BEST_MODEL_NAME)
    if os.path.isfile(model_path):
        payload, header, _ = _load_state_file(model_path, ("model",), location, verify)
        model_state = payload["model"]
    else:
        model_path = os.path.join(directory, LAST_NAME)
        payload, header, _ = _load_state_file(model_path, ("checkpoint",), location, verify)
        model_state = payload["metric_tracker"]["best_model_state"]
        if model_state is None:
            raise CheckpointNotFoundError(f"{directory} holds no best model yet: no epoch has finished.")
        log.info("%s is absent; using the best model state carried by %s", BEST_MODEL_NAME, LAST_NAME)
    _check_pairing(model_path, header, structure_path, structure_record)
    device = _target_device(map_location, model_device, header, model_path)
    model = structure["training_modules"].model
    if device is not None:
        model.to(device)
    elif map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(torch.device(map_location))
    _load_model_state(model, model_state, model_path)
    model.eval()
    log.info("best model (after %s epochs) loaded from %s", header.get("epochs_done"), model_path)
    return model
