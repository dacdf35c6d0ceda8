"""Loading runs back: resume training, or get the best model for prediction.

Every file is verified against the run's manifest before anything in it is
unpickled (see :mod:`experiment_io.run.reading`). State files load with
``torch.load(weights_only=True)``; the structure file goes through the trust gate
(:mod:`experiment_io.run.trust`). After a load, every tensor lies on a known device
(see :mod:`experiment_io.experiment.devices`). A checkpoint is read into memory of its own,
whose tensors the modules then take without a copy; no file stays mapped after a
resume.
"""
from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from experiment_io.experiment.controllers import TrainingPosition
from experiment_io.experiment.restartable import restore_database
from experiment_io.experiment.devices import check_location_args, place_training_modules, target_device
from experiment_io.errors import (CheckpointNotFoundError, CorruptCheckpointError, ExperimentIOError,
                                  IncompatibleCheckpointError, MissingDatabaseError, NotACheckpointError,
                                  SetupError)
from experiment_io.storage.generations import Generation, Role, base_name
from experiment_io.storage.lock import writer_now
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, epoch_checkpoint_name, epoch_model_name
from experiment_io.run.picking import pick_structure_and_state
from experiment_io.run.reading import (check_pairing, load_state_file, load_structure_file,
                                       require_file, restore_tracker, run_verifier, until_stable, verified_record,
                                       with_remedy)
from experiment_io.platform import switch
from experiment_io.platform.residence import Destination
from experiment_io.experiment.rng import placed_on_cpu, rank_rng_state, set_rank_rng_state
from experiment_io.run.skeleton import materialize
from experiment_io.storage.interface import RunStorage, as_storage
from experiment_io.storage.manifest import read_manifest
from experiment_io.format.codec import HEADER_KEY
from experiment_io.experiment.training_modules import TrainingModules

if TYPE_CHECKING:
    from experiment_io.experiment.databases import Database

__all__ = ["load_checkpoint", "load_checkpoint_from_cwd", "load_model_from_cwd"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_KEPT = re.compile(r"(?:model|checkpoint)_epoch_(\d+)\.pt")


def _directory(directory):
    """The run's directory, in words (a :class:`~experiment_io.storage.interface.RunStorage` says where it is)."""
    if isinstance(directory, RunStorage):
        return directory.location
    return os.path.abspath(directory if directory is not None else os.getcwd())


def _exists(directory):
    return as_storage(directory).exists()


def _location(map_location):
    return map_location if map_location is not None else "cpu"


def _on_cpu(map_location):
    """Whether a load with ``map_location`` puts every tensor in the CPU's memory."""
    location = _location(map_location)
    return isinstance(location, (str, torch.device)) and torch.device(location).type == "cpu"


def _load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise IncompatibleCheckpointError(f"the model state in {path} does not fit the model of the structure file: "
                                          f"{e}") from e


def _tracker(state, storage, state_path):
    try:
        return restore_tracker(state, storage, state_path)
    except ExperimentIOError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise IncompatibleCheckpointError(f"{state_path}: its metric tracker cannot be restored: {e!r}") from e


def _assemble(structure, structure_path, state, header, state_path, *, map_location, model_device, database,
              restart_db, allow, restore_rng, data_file=None):
    """Turn a loaded structure and state into the objects ``train_model`` takes."""
    device = target_device(map_location, model_device, header.get("model_device"), state_path)
    training_modules = structure["training_modules"]
    controller = structure["controller"]
    if not isinstance(training_modules, TrainingModules):
        raise NotACheckpointError(f"{structure_path} holds no TrainingModules "
                                  f"(found {type(training_modules).__name__})")
    # the state was read into memory of its own (not mapped): the modules take its tensors as they are
    try:
        model, loss, evaluator = training_modules
        # a structure file of format 2 holds the modules' state tensors as meta tensors
        state["model"] = materialize(model, state["model"], state_path, device=device, own_memory=False)
        state["loss"] = materialize(loss, state["loss"], state_path, device=device, own_memory=False)
        place_training_modules(training_modules, device)
        _load_model_state(model, state["model"], state_path)
        if isinstance(loss, torch.nn.Module):
            loss.load_state_dict(state["loss"])
        evaluator.load_state_dict(state["evaluator"])
        controller.load_state_dict(state["controller"])
        metric_tracker = state["metric_tracker"]  # restored with its history where the state was read
        position = TrainingPosition.from_state_dict(state["position"])
        rng_state, own_rng = rank_rng_state(state, state_path)
        rng_state = placed_on_cpu(rng_state)
    except ExperimentIOError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as e:
        raise IncompatibleCheckpointError(f"{state_path} does not fit the objects of {structure_path}: {e!r}") from e
    position.interrupted = None
    controller.position = position
    # train_model(**check) continues in the directory the checkpoint came from
    controller.loaded_from = os.path.dirname(os.path.abspath(state_path))
    controller._loaded_structure = header.get("structure_digest")
    if restore_rng:
        set_rank_rng_state(rng_state, own_rng)

    if database is None and restart_db:
        if structure["database"] is None:
            raise MissingDatabaseError(
                f"the run in {os.path.dirname(os.path.abspath(structure_path))} was trained on an in-memory Database, "
                "which cannot be rebuilt from the checkpoint. Pass database=<the same Database> to the load function.")
        database = restore_database(structure["database"], allow=allow, data_file=data_file,
                                    run_directory=os.path.dirname(os.path.abspath(state_path)))
    if database is not None and state.get("database") is not None and hasattr(database, "check_fingerprint"):
        database.check_fingerprint(state["database"])
    log.info("loaded %s (%s epochs done, step %s) with %s", state_path, header.get("epochs_done"), header.get("step"),
             structure_path)
    return {"training_modules": training_modules, "controller": controller, "metric_tracker": metric_tracker,
            "database": database}


def _not_yet(error, directory):
    """``error`` (no checkpoint found), telling that a live process is writing the run's first checkpoint."""
    writer = writer_now(_directory(directory))
    if not writer or not _exists(directory):
        return error
    return CheckpointNotFoundError(
        f"{_directory(directory)} holds no checkpoint yet, and {writer}: its first checkpoint is being written. "
        "Wait until it has saved (after its first epoch, or its first checkpoint_every_batches), then load; "
        "do not start another run there.")


def load_checkpoint(structure_fname: PathLike, state_fname: PathLike, restart_db: bool = False,
                    map_location: Any = None, model_device: Any = None, *, database: Database | None = None,
                    allow: Sequence = (), trusted: bool = False, restore_rng: bool = True, verify: bool = True,
                    data_file: Optional[PathLike] = None) -> dict:
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
        beyond the default families (see :mod:`experiment_io.run.trust`).
    :param trusted: load the structure file with full pickle (only for files you wrote).
    :param restore_rng: restore every random stream from the checkpoint.
    :param verify: check both files against the manifest first (``False`` loads
        files that have no manifest, with a warning).
    :param data_file: the data file the rebuilt database reads, for a data file that
        moved since the run was trained (its inputs, targets, seed and splits stay the
        run's, and the data is checked against the run's fingerprint of it). Without
        it, a data file kept inside the run directory is read where the run is now,
        then the recorded path; a file read from elsewhere is logged at WARNING.
    :return: ``{"training_modules", "controller", "metric_tracker", "database"}``.
    :raises ExperimentIOError: a subclass from :mod:`experiment_io.errors` naming the
        file and the fix; no file is modified.
    """
    check_location_args(map_location, model_device)
    require_file(structure_fname, "structure file")
    require_file(state_fname, "checkpoint file")

    def load():
        structure_record, verifier = verified_record(structure_fname, verify)
        state_record, state_verifier = verified_record(state_fname, verify, verifier)
        structure = load_structure_file(structure_fname, allow, trusted, structure_record, verifier)
        state, header = load_state_file(state_fname, ("checkpoint",), _location(map_location), state_record,
                                        state_verifier, mmap=False)
        state["metric_tracker"] = _tracker(state, as_storage(os.path.dirname(os.path.abspath(state_fname))),
                                           state_fname)
        return structure, structure_record, state, header

    structure, structure_record, state, header = until_stable(load, os.path.dirname(os.path.abspath(state_fname)))
    check_pairing(state_fname, header, structure_fname, structure_record)
    return _assemble(structure, structure_fname, state, header, state_fname, map_location=map_location,
                     model_device=model_device, database=database, restart_db=restart_db, allow=allow,
                     restore_rng=restore_rng, data_file=data_file)


def load_checkpoint_from_cwd(map_location: Any = None, model_device: Any = None, restart_db: bool = True, *,
                             which: str = "last", strict: bool = False, directory: Optional[PathLike] = None,
                             database: Database | None = None, allow: Sequence = (), trusted: bool = False,
                             restore_rng: bool = True, missing_ok: bool = False,
                             data_file: Optional[PathLike] = None) -> Optional[dict]:
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
    :param data_file: as for :func:`load_checkpoint`.
    :param missing_ok: return ``None`` instead of raising when the directory holds no
        checkpoint yet (damaged files and a directory that does not exist still
        raise). This makes the restart script and the first start one script::

            check = load_checkpoint_from_cwd(missing_ok=True) or start_fresh()
            train_model(**check, callbacks=None, batch_callbacks=None)

    :return: as :func:`load_checkpoint`.
    """
    if which not in ("last", "best"):
        raise SetupError(f"which={which!r}; choose 'last' or 'best'")
    check_location_args(map_location, model_device)
    roles = [LAST_NAME, BEST_NAME] if which == "last" else [BEST_NAME]

    def load():
        # verified whole while the structure loads: a resume copies the tensors out of the map (or reads them), so
        # verifying them in the map would only come after, instead of beside the memory made ready
        verifier = run_verifier(directory)
        # memory for the checkpoint's tensors is made ready while the file is verified
        # (see experiment_io.platform.residence)
        destination = (Destination.for_file(*map(verifier.path, roles))
                       if _on_cpu(map_location) and switch.enabled() else None)
        structure_path, structure_record, structure, state_path, state_record = pick_structure_and_state(
            verifier, roles, strict, True,
            lambda path, record: load_structure_file(path, allow, trusted, record, verifier),
            meanwhile=destination and destination.fill)
        state, header = load_state_file(state_path, ("checkpoint",), _location(map_location), state_record, verifier,
                                        mmap=False, destination=destination)
        state["metric_tracker"] = _tracker(state, verifier.storage, state_path)
        return structure, structure_path, state, header, state_path

    return _load_and_assemble(load, directory, missing_ok, roles, map_location=map_location, model_device=model_device,
                              database=database, restart_db=restart_db, allow=allow, restore_rng=restore_rng,
                              data_file=data_file)


def _load_and_assemble(load, directory, missing_ok, roles, **assemble):
    try:
        structure, structure_path, state, header, state_path = until_stable(load, as_storage(directory))
    except CorruptCheckpointError as e:
        raise with_remedy(e, directory, roles) from None
    except CheckpointNotFoundError as e:
        if not missing_ok:
            raise _not_yet(e, directory) from None
        if not _exists(directory):  # a mistyped path must not start a new run somewhere else
            raise CheckpointNotFoundError(
                f"run directory {_directory(directory)} does not exist. missing_ok=True returns None for a directory "
                "that holds no checkpoint yet, not for a missing one (a mistyped path?). If this is the first start, "
                f"create it first: os.makedirs({str(directory or os.getcwd())!r}, exist_ok=True).") from e
        log.info("no checkpoint in %s: starting fresh", _directory(directory))
        return None
    return _assemble(structure, structure_path, state, header, state_path, **assemble)


def load_model_from_cwd(map_location: Any = None, model_device: Any = None, *, directory: Optional[PathLike] = None,
                        strict: bool = False, allow: Sequence = (), trusted: bool = False, mmap: bool = False,
                        which: str = "best", epoch: Optional[int] = None) -> torch.nn.Module:
    """Load a model of the run in the current directory (by default its best), ready for prediction.

    The model comes from the structure file with the weights of ``best_model.pt``; if
    that does not verify (or the run did not store it), the best model state carried
    by ``last_checkpoint.pt``, then by ``best_checkpoint.pt``, is used. It is returned
    in evaluation mode.

    Only what the model needs must be importable: classes and functions of the rest of
    the training set-up (a custom optimizer, function metrics) are not loaded, and the
    trust gate refuses only what the model itself refers to.

    :param map_location: as for :func:`torch.load`.
    :param model_device: ``'cpu'``, ``'cuda:N'`` or ``'auto'``; not with ``map_location``.
    :param strict: raise at the first file that does not verify instead of falling back.
    :param allow: classes, functions or module names the model may use beyond the
        default families (see :mod:`experiment_io.run.trust`); a class defined in the
        training script (stored as ``__main__.Name``) can be handed over itself.
    :param trusted: load the structure file with full pickle (only for files you wrote).
    :param mmap: ``False`` (default): the weights get memory of their own, and the
        model does not depend on the file after the load. ``True``: on the CPU, the
        weights stay in the verified file's memory map (private, copy-on-write:
        changing them never changes the file, and processes that load the same
        model share its pages), which saves a copy; but the file then stays mapped
        while the model lives, and the model sees whatever later changes the file in
        place (``cp other.pt best_model.pt``, ``rsync --inplace``, a ``torch.save`` to
        that path), and a file truncated meanwhile kills the process with SIGBUS.
        experiment_io itself never changes a file in place. Weights moved to a GPU
        never refer to the file.
    :param which: ``"best"`` (default): the model of the best epoch; ``"last"``: the
        model as of the newest checkpoint (``last_checkpoint.pt``).
    :param epoch: the model kept for this 0-based epoch (``model_epoch_N.pt``, else
        ``checkpoint_epoch_N.pt``: written with ``store_every`` or ``store_all_better``);
        overrides ``which``.
    :return: the :class:`torch.nn.Module`.
    """
    check_location_args(map_location, model_device)
    if which not in ("best", "last"):
        raise SetupError(f"which={which!r}; choose 'best' or 'last' (or epoch=N for a kept epoch)")
    if epoch is not None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, not {epoch!r}")
        roles = [Role(epoch_model_name(epoch)), Role(epoch_checkpoint_name(epoch))]
        wanted = f"the model of epoch {epoch}"
    elif which == "last":
        roles = [Role(LAST_NAME)]
        wanted = "the last model"
    else:
        roles = [Role(BEST_MODEL_NAME, Generation.CURRENT), Role(LAST_NAME), Role(BEST_NAME),
                 Role(BEST_MODEL_NAME, Generation.PREVIOUS)]
        wanted = "the best model"

    best = which == "best" and epoch is None

    def load():
        verifier = run_verifier(directory, defer=True)
        structure_path, structure_record, structure, model_path, record = pick_structure_and_state(
            verifier, roles, strict, False,
            lambda path, record: load_structure_file(path, allow, trusted, record, verifier, model_only=True))
        payload, header = load_state_file(model_path, ("model", "checkpoint"), _location(map_location), record,
                                          verifier, wanted=lambda payload: _model_of(payload, best))
        return verifier.directory, structure, structure_path, structure_record, payload, header, model_path

    try:
        loaded = until_stable(load, as_storage(directory))
    except CheckpointNotFoundError as e:
        if epoch is None:
            raise _not_yet(e, directory) from None
        kept = _kept_epochs(_directory(directory))
        raise CheckpointNotFoundError(
            f"{_directory(directory)} holds no model of epoch {epoch}: "
            + (f"models are kept for epochs {kept}. " if kept else "no epoch's model was kept. ")
            + "Keep them with train_model(..., store_every=N) or store_all_better=True; "
              "which='best' and which='last' are always there.") from e
    directory, structure, structure_path, structure_record, payload, header, model_path = loaded
    check_pairing(model_path, header, structure_path, structure_record)
    if header["kind"] == "model":
        model_state = payload["model"]
    elif which == "last" or epoch is not None:
        model_state = payload["model"]
    else:
        model_state = (payload["metric_tracker"].get("best_model_state")
                       if isinstance(payload["metric_tracker"], dict) else None)
        if model_state is None:
            raise CheckpointNotFoundError(f"{directory} holds no best model yet: no epoch has finished. "
                                          "Load which='last' for the model as of the last checkpoint.")
        log.info("using the best model state carried by %s", model_path)
    device = target_device(map_location, model_device, header.get("model_device"), model_path)
    model = structure["training_modules"].model
    # the weights stay where torch.load put them (the file's memory map, on the CPU)
    model_state = materialize(model, model_state, model_path, device=device, own_memory=not mmap)
    if device is not None:
        model.to(device)
    _load_model_state(model, model_state, model_path)
    model.eval()
    log.info("%s (after %s epochs) loaded from %s", wanted, header.get("epochs_done"), model_path)
    return model


def _model_of(payload, best):
    """What of a loaded state file :func:`load_model_from_cwd` uses (``None``: all of it, a model file)."""
    header = payload.get(HEADER_KEY) if isinstance(payload, dict) else None
    if not isinstance(header, dict) or header.get("kind") != "checkpoint":
        return None
    if not best:
        return payload.get("model")
    tracker = payload.get("metric_tracker")
    return tracker.get("best_model_state") if isinstance(tracker, dict) else None


def _kept_epochs(directory):
    """The 0-based epochs whose model a run directory keeps (from its manifest)."""
    manifest = read_manifest(directory)
    names = manifest[1] if manifest else {}
    return sorted({int(m.group(1)) for n in names for m in [_KEPT.fullmatch(base_name(n))] if m})
