"""Devices: which device each kind of object lands on after a load.

The placement rules, per object type, for a load with ``model_device``:

=====================  =============================================
object                 device
=====================  =============================================
model, training loss   ``model_device``
evaluation losses      CPU
optimizer state        the device of the parameter it belongs to
RNG states             CPU (``uint8`` tensors), always
database               CPU
=====================  =============================================
"""
import logging
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from experiment_io.errors import DeviceError
from experiment_io.experiment.launch import launched_world

if TYPE_CHECKING:
    from experiment_io.experiment.training_modules import TrainingModules

__all__ = ["resolve_device", "check_location_args", "module_device", "place_training_modules", "target_device"]

log = logging.getLogger(__name__)


def _accelerator_count(device_type):
    if device_type == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_type == "mps":
        return 1 if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else 0
    return None


def resolve_device(spec: Union[str, torch.device, None], argument: str = "model_device") -> Optional[torch.device]:
    """Turn a device request into a :class:`torch.device` that exists on this machine.

    :param spec: ``None``, ``"auto"`` (CUDA when present, else CPU), a string such
        as ``"cpu"`` or ``"cuda:1"``, or a :class:`torch.device`. ``"auto"`` and
        ``"cuda"`` without an index mean this rank's GPU (``LOCAL_RANK``) in a
        data-parallel run, the current GPU otherwise.
    :param argument: the name of the argument that asked for it, for the message.
    :return: a :class:`torch.device`, or ``None`` for ``None``.
    :raises DeviceError: for a malformed or unavailable device.
    """
    if spec is None:
        return None
    if isinstance(spec, str) and spec == "auto":
        device = _rank_device(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
        log.info("%s='auto' resolved to %s", argument, device)
        return device
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"{argument}={spec!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from e
    _check_available(device, spec, argument)
    return _rank_device(device) if device.type == "cuda" and device.index is None else device


def _check_available(device, spec, argument):
    count = _accelerator_count(device.type)
    if count is None:
        return
    if count == 0:
        auto = "model_device='auto'" if argument == "map_location" else f"{argument}='auto'"
        raise DeviceError(
            f"{argument}={spec!r} was asked for, but this machine has no {device.type} device. "
            f"Pass {argument}='cpu', or {auto} to use the best device available."
        )
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"{argument}={spec!r} was asked for, but this machine has only {count} {device.type} device(s) "
            f"(indices 0..{count - 1}). Pick one of those, or 'auto'."
        )


def _rank_device(device):
    """A CUDA device without an index, made concrete: this rank's GPU under a launcher, else the current one."""
    _, local_rank, world_size = launched_world()
    if world_size > 1:
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cuda", torch.cuda.current_device())


def check_location_args(map_location: Any, model_device: Union[str, torch.device, None]) -> None:
    """Refuse ``map_location`` and ``model_device`` given together, and a plain ``map_location`` this machine lacks.

    :raises DeviceError: naming which argument to drop, or the device that is missing.
    """
    if isinstance(map_location, (str, torch.device)) and model_device is None:
        try:
            device = torch.device(map_location)
        except (RuntimeError, TypeError) as e:
            raise DeviceError(f"map_location={map_location!r} is not a device; use 'cpu', 'cuda', 'cuda:N', "
                              "or model_device='auto'.") from e
        _check_available(device, map_location, "map_location")
    if map_location is not None and model_device is not None:
        raise DeviceError(
            "map_location and model_device were both given; pass only one. Drop map_location to "
            "place each object on its proper device (model and training loss on model_device, the rest "
            "on the CPU), or drop model_device to send every tensor where map_location says."
        )


def module_device(module: Any, default: Union[str, torch.device] = "cpu") -> torch.device:
    """The device of a module's first parameter or buffer (``default`` when it has none)."""
    if isinstance(module, torch.nn.Module):
        tensor: torch.Tensor
        for tensor in module.parameters():
            return tensor.device
        for tensor in module.buffers():
            return tensor.device
    return torch.device(default)


def place_training_modules(training_modules: "TrainingModules", device: Optional[torch.device]) -> None:
    """Put the model and the training loss on ``device`` and every evaluation loss on the CPU.

    Used by :func:`~experiment_io.setup_training` and by every loader.

    :param training_modules: ``(model, loss, evaluator)``.
    :param device: a :class:`torch.device`, or ``None`` to leave the model and the
        training loss where they are.
    """
    model, loss, evaluator = training_modules
    if device is not None:
        model.to(device)
        if isinstance(loss, torch.nn.Module):
            loss.to(device)
    for fn in evaluator.modules().values():
        fn.to("cpu")


def _plain_device(map_location):
    """The device a plain ``map_location`` (string or device) names, else ``None``."""
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return None


def target_device(map_location: Any, model_device: Union[str, torch.device, None], saved_device: Optional[str],
                  path: str) -> Optional[torch.device]:
    """The device a load puts the model and the training loss on.

    :param map_location: as for :func:`torch.load`; a plain device decides.
    :param model_device: a device request (:func:`resolve_device`); decides otherwise.
    :param saved_device: the device the model was saved from, used when neither is given.
    :param path: the file loaded, for the error message.
    :return: a :class:`torch.device`, or ``None`` to leave the model where a
        ``map_location`` function or dict put it.
    :raises DeviceError: for both arguments at once, or a device this machine lacks.
    """
    check_location_args(map_location, model_device)
    if map_location is not None:
        device = _plain_device(map_location)
        return _rank_device(device) if device is not None and device.type == "cuda" and device.index is None else device
    if model_device is not None:
        return resolve_device(model_device)
    saved = saved_device or "cpu"
    if launched_world()[2] > 1 and torch.device(saved).type == "cuda":
        saved = "cuda"  # saved by rank 0: each rank takes its own GPU
    try:
        return resolve_device(saved)
    except DeviceError as e:
        raise DeviceError(
            f"{path} holds a model saved on {saved}, which this machine does not have. "
            "Pass model_device='cpu' (or 'auto' for the best device here) to the load function."
        ) from e
