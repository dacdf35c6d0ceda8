"""Payloads: how the experiment objects map to the files of a run directory.

================================  =================================================
file                              content
================================  =================================================
``experiment_structure.pt``       pickled objects: training modules, controller,
                                  database descriptor (loaded through the trust gate);
                                  the tensors the state files restore are left out
``last_checkpoint.pt``            every ``state_dict`` (model, loss, evaluator,
                                  controller, metric tracker, RNG, data position)
``best_checkpoint.pt``            the same, at the best epoch
``best_model.pt``                 the model's plain ``state_dict`` at the best epoch
``checkpoint_epoch_N.pt``         as ``last_checkpoint.pt``, kept for epoch N
``model_epoch_N.pt``              as ``best_model.pt``, kept for epoch N
``best_evaluation.json``          the best model's metrics on every split (JSON)
``metrics.csv``                   the metric history, one row per epoch, appended to
``experiment_manifest.json``      digest, size and provenance of every file above
================================  =================================================

State files hold plain data and tensors only: each loads with
``torch.load(path, weights_only=True)``.

Payloads are written by :func:`save_payload` and committed through a
:class:`~experiment_io.storage.writer.RunWriter` by :func:`save_payloads`.
"""
import io
import logging
import os
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch

from experiment_io.platform import archive
from experiment_io.format import codec as fmt
from experiment_io.run import skeleton
from experiment_io.experiment.devices import module_device
from experiment_io.experiment.rng import get_rng_state

if TYPE_CHECKING:
    from experiment_io.experiment.controllers import Controller
    from experiment_io.experiment.metric_tracker import MetricTracker
    from experiment_io.experiment.training_modules import TrainingModules
    from experiment_io.storage.writer import RunWriter
    from experiment_io.storage.verification import FileRecord

__all__ = [
    "STRUCTURE_NAME",
    "LAST_NAME",
    "BEST_NAME",
    "BEST_MODEL_NAME",
    "BEST_EVALUATION_NAME",
    "METRICS_CSV_NAME",
    "epoch_checkpoint_name",
    "epoch_model_name",
    "structure_payload",
    "checkpoint_payload",
    "model_payload",
    "save_payload",
    "save_payloads",
    "RunStatus",
    "run_status",
    "unpicklable_part",
    "main_module_names",
]

log = logging.getLogger(__name__)

#: The pickled objects of a run, written once at its start.
STRUCTURE_NAME = "experiment_structure.pt"
#: Every state of the run after its newest save.
LAST_NAME = "last_checkpoint.pt"
#: Every state of the run at its best epoch.
BEST_NAME = "best_checkpoint.pt"
#: The model's ``state_dict`` at the best epoch.
BEST_MODEL_NAME = "best_model.pt"
#: The best model's metrics on every split, written when training ends (JSON).
BEST_EVALUATION_NAME = "best_evaluation.json"
#: The metric history, one row per epoch (CSV), rewritten with every epoch's checkpoint.
METRICS_CSV_NAME = "metrics.csv"


def save_payload(payload: dict[str, Any], f: Any) -> None:
    """Write ``payload`` to the binary file object ``f`` with :func:`torch.save`.

    A structure payload is written without the data of the tensors that the state
    files restore (see :mod:`experiment_io.run.skeleton`). The file is a standard
    ``torch.save`` archive (CRC-32 included), which ``torch.load`` and zip tools read;
    :mod:`experiment_io.platform.archive` writes its zip container.
    """
    options: dict[str, Any] = {}
    kind = payload.get(fmt.HEADER_KEY, {}).get("kind")
    if kind == "model":  # the plain state_dict (format 3): its header goes into the manifest record only
        archive.save(payload["model"], f)
        return
    if kind == "structure":
        model, loss, _evaluator = payload["training_modules"]
        left_out = skeleton.without_aliases(payload, skeleton.restored_tensors(model, loss))
        options["pickle_module"] = skeleton.pickle_module_without(left_out)
    archive.save(payload, f, **options)


def epoch_checkpoint_name(epoch: int) -> str:
    """The name of the checkpoint kept for the 0-based ``epoch``."""
    return f"checkpoint_epoch_{epoch}.pt"


def epoch_model_name(epoch: int) -> str:
    """The name of the model state kept for the 0-based ``epoch``."""
    return f"model_epoch_{epoch}.pt"


def structure_payload(training_modules: "TrainingModules", controller: "Optional[Controller]",
                      database_descriptor: Optional[dict]) -> dict[str, Any]:
    """The pickled part of a run: whole objects, loaded back through the trust gate.

    :func:`save_payload` writes the model's and the loss's parameters and persistent
    buffers without their data: the state files hold it.
    """
    return {
        fmt.HEADER_KEY: fmt.make_header("structure"),
        "training_modules": training_modules,
        "controller": controller,
        "database": database_descriptor,
    }


def _last_stopping_value(metric_tracker):
    """The stopping metric of the newest recorded epoch (``None`` before the first ends)."""
    history = getattr(metric_tracker, "history", {})
    series = history.get(getattr(metric_tracker, "stopping_split", None), {}).get(
        getattr(metric_tracker, "stopping_key", None), []) if isinstance(history, dict) else []
    return series[-1] if series and len(series) == len(metric_tracker.epochs) else None


def checkpoint_payload(training_modules: "TrainingModules", controller: "Controller", metric_tracker: "MetricTracker",
                       database: Any, structure_digest: Optional[str],
                       rng_states: Optional[Sequence[dict[str, Any]]] = None,
                       history: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Every state of a run, at the controller's position, as plain data and tensors.

    :param rng_states: the random streams of every rank, in rank order, in a
        data-parallel run (default: this process's alone). The first is stored
        under ``"rng"``; all of them, when there are several, under ``"rng_ranks"``.
    :param history: where the metric history is kept (see
        :meth:`~experiment_io.MetricTracker.state_dict`); ``None``: in the payload.
    """
    model, loss, evaluator = training_modules
    position = controller.position
    rng_states = rng_states or [get_rng_state()]
    return {
        fmt.HEADER_KEY: fmt.make_header(
            "checkpoint", epochs_done=position.epoch, step=position.step, structure_digest=structure_digest,
            model_device=str(module_device(model)), samples_done=position.samples_done,
            interrupted=position.interrupted,
            world_size=len(rng_states), max_epochs=controller.max_epochs, best_epoch=metric_tracker.best_epoch,
            finished=position.samples_done == 0 and controller.finished, stop_reason=controller.stop_reason,
            stopping_value=_last_stopping_value(metric_tracker),
        ),
        "model": model.state_dict(),
        "loss": loss.state_dict() if isinstance(loss, torch.nn.Module) else {},
        "evaluator": evaluator.state_dict(),
        "controller": controller.state_dict(),
        "metric_tracker": metric_tracker.state_dict(history) if history is not None else metric_tracker.state_dict(),
        "rng": rng_states[0],
        "position": position.state_dict(),
        "database": database.fingerprint() if hasattr(database, "fingerprint") else None,
        **({"rng_ranks": list(rng_states)} if len(rng_states) > 1 else {}),
    }


def model_payload(model_state: dict[str, torch.Tensor], epochs_done: int, step: int, structure_digest: Optional[str],
                  model_device: Union[str, torch.device], world_size: int = 1) -> dict[str, Any]:
    """A model's ``state_dict`` with a header (the file holds the ``state_dict`` alone; the header goes into its
    manifest record)."""
    return {
        fmt.HEADER_KEY: fmt.make_header(
            "model", epochs_done=epochs_done, step=step, structure_digest=structure_digest,
            model_device=str(model_device), world_size=world_size,
        ),
        "model": model_state,
    }


#: A payload written under several names (``last_checkpoint.pt`` and ``best_checkpoint.pt``) whose tensors
#: hold at most this many bytes is serialized once, in memory, and its bytes written to each file.
SERIALIZE_ONCE_BYTES = 64 * 1024 * 1024


def _tensor_bytes(obj):
    """The bytes of the tensors in a payload (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_payloads(writer: "RunWriter", payloads: Mapping[str, dict[str, Any]], retire: Sequence[str] = (),
                  kept: Optional[Mapping[str, str]] = None,
                  appended: Optional[Mapping[str, tuple[Any, dict[str, Any]]]] = None, *,
                  durable: bool = True) -> "dict[str, FileRecord]":
    """Write payloads through ``writer`` (a :class:`~experiment_io.storage.writer.RunWriter`) and commit them.

    A small payload given under several names is serialized once (see
    ``SERIALIZE_ONCE_BYTES``): the files get the same bytes.

    :param payloads: ``{file name: payload dict}``; the plain fields of each
        payload's header (kind, step, epochs done...) go into the file's record.
    :param retire: files removed once the save has committed, and
    :param kept: why files are kept (see :meth:`~experiment_io.storage.writer.RunWriter.save_files`).
    :param appended: files that only grow, committed as far as they go, and
    :param durable: ``False`` to make the save durable behind the caller (see
        :meth:`~experiment_io.storage.writer.RunWriter.save_files`).
    :return: ``{file name: FileRecord}``.
    """
    shared_ids = [id(p) for p in payloads.values()]
    serialized: dict[int, memoryview] = {}
    writes: dict[str, tuple] = {}
    for name, payload in payloads.items():
        fields = fmt.record_fields(payload[fmt.HEADER_KEY])
        if shared_ids.count(id(payload)) > 1 and (id(payload) in serialized
                                                  or _tensor_bytes(payload) <= SERIALIZE_ONCE_BYTES):
            if id(payload) not in serialized:
                buffer = io.BytesIO()
                save_payload(payload, buffer)
                serialized[id(payload)] = buffer.getbuffer()
            writes[name] = (lambda f, data=serialized[id(payload)]: f.write(data), fields)
        else:
            writes[name] = (lambda f, p=payload: save_payload(p, f), fields)
    return writer.save_files(writes, retire, kept, appended, durable=durable)


@dataclass
class RunStatus:
    """Where a run stands, as its manifest records it (nothing is unpickled).

    :ivar epochs_done: epochs finished.
    :ivar max_epochs: epochs the run trains for (``None`` for a run written by an older version).
    :ivar best_epoch: the 0-based epoch of the best model (``None`` before the first epoch ends).
    :ivar finished: whether training ended (``max_epochs`` reached or the controller stopped it).
    :ivar stop_reason: why the controller stopped it early, if it did.
    :ivar interrupted: the signal that stopped it mid-epoch, if one did.
    :ivar step: optimizer steps taken.
    """

    epochs_done: int
    max_epochs: Optional[int]
    best_epoch: Optional[int]
    finished: bool
    stop_reason: Optional[str]
    interrupted: Optional[str]
    step: int

    def describe(self) -> str:
        """One line: ``"3 of 10 epochs done, best epoch 2, not finished"``."""
        of = f" of {self.max_epochs}" if self.max_epochs is not None else ""
        best = f"best epoch {self.best_epoch}" if self.best_epoch is not None else "no best model yet"
        if self.finished:
            state = f"finished ({self.stop_reason or 'max_epochs reached'})"
        elif self.interrupted:
            state = f"not finished: stopped by {self.interrupted} in epoch {self.epochs_done}"
        else:
            state = "not finished"
        return f"{self.epochs_done}{of} epochs done, {best}, {state}"


def run_status(files: dict) -> Optional[RunStatus]:
    """The status of a run from its manifest's records (``None`` when it holds no committed checkpoint)."""
    records = [files[name] for name in (LAST_NAME, BEST_NAME) if name in files]
    if not records:
        return None
    newest = max(records, key=lambda r: r.get("step", 0))
    return RunStatus(epochs_done=newest.get("epochs_done", 0), max_epochs=newest.get("max_epochs"),
                     best_epoch=newest.get("best_epoch"), finished=bool(newest.get("finished", False)),
                     stop_reason=newest.get("stop_reason"), interrupted=newest.get("interrupted"),
                     step=newest.get("step", 0))


def _children(obj):
    """``(label, child)`` of an object, for finding the part that cannot be pickled."""
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, torch.nn.Module):
        named = [(f".{k}", v) for k, v in vars(obj).items() if not k.startswith("_")]
        named += [(f".{k}", v) for k, v in obj._modules.items()]
        return named + [(f".{k}", v) for k, v in vars(obj).items() if k.startswith("_") and k != "_modules"]
    state = obj.__getstate__() if hasattr(obj, "__getstate__") else getattr(obj, "__dict__", None)
    return [(f".{k}", v) for k, v in state.items()] if isinstance(state, dict) else []


def _pickle_error(obj):
    try:
        pickle.dump(obj, io.BytesIO(), protocol=2)
    except Exception as e:  # pickling raises PicklingError, AttributeError, TypeError...
        return e
    return None


def unpicklable_part(name: str, obj: Any,
                     error: Optional[BaseException] = None) -> Optional[tuple[str, Any, BaseException]]:
    """The innermost part of ``obj`` that cannot be pickled: ``(path, part, error)``, or ``None``.

    :param name: what ``obj`` is called in the path (e.g. ``"model"``).
    """
    error = error or _pickle_error(obj)
    if error is None:
        return None
    path, seen = name, {id(obj)}
    while True:
        for label, child in _children(obj):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_error = _pickle_error(child)
            if child_error is not None:
                path, obj, error = path + label, child, child_error
                break
        else:
            return path, obj, error


def main_module_names(path: Union[str, os.PathLike]) -> list[str]:
    """The globals of a written structure file that live in ``__main__`` (the training script or notebook)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # only a hint: never fail a save for it
        return []
    return sorted(n for n in names if n.startswith("__main__."))
