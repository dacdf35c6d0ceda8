"""Structure files without weights: the objects of a run with their state tensors left out.

The structure file pickles whole objects (the model, the loss, the optimizer...)
once, at the start of a run. Every tensor that a state file restores anyway (the
parameters and persistent buffers of the model and of the training loss, which
``load_state_dict`` fills) is written to it as a *meta* tensor: its dtype, shape,
strides and ``requires_grad``, no data. A structure file is then a few kilobytes
whatever the size of the model, and nothing is read twice when a run is loaded.

A tensor is left out only when the module that holds it restores it the standard
way: it sits in a module's ``_parameters`` or persistent ``_buffers``, is the very
object that ``state_dict(keep_vars=True)`` returns, and the module's
``state_dict``, ``_save_to_state_dict``, ``load_state_dict`` and
``_load_from_state_dict`` are those of torch, and no module of the tree has
``state_dict`` hooks or ``load_state_dict`` pre-hooks (which may rename or
replace entries), and no other tensor of the structure shares its memory (a
view kept in an attribute). Everything else (non-persistent buffers, tensors
kept in plain attributes, optimizer state, evaluation losses) keeps its data in
the structure file.

When a run is loaded, :func:`materialize` gives each meta tensor the data of the
state file's entry, in place (:func:`torch.utils.swap_tensors`): the objects keep
their identity, so the optimizer's references to the parameters and parameters
tied between modules stay as they were.
"""
import logging
import os
import pickle
import types
from typing import Any, Mapping, Optional, Union

import torch

from experiment_io.errors import IncompatibleCheckpointError

__all__ = ["restored_tensors", "without_aliases", "pickle_module_without", "materialize"]

log = logging.getLogger(__name__)

_STATE_METHODS = ("state_dict", "_save_to_state_dict", "load_state_dict", "_load_from_state_dict")


def _standard_state(module):
    """Whether ``module`` saves and loads its state with torch's own methods."""
    for name in _STATE_METHODS:
        owner = next((cls for cls in type(module).__mro__ if name in vars(cls)), None)
        if owner is None or not owner.__module__.startswith("torch."):
            return False
    return True


def _has_state_hooks(module):
    """Whether hooks of ``module`` may change which entry of a ``state_dict`` fills which tensor."""
    return bool(getattr(module, "_state_dict_hooks", None) or getattr(module, "_state_dict_pre_hooks", None)
                or getattr(module, "_load_state_dict_pre_hooks", None))


def _slots(module):
    """``(owner, key, tensor)`` of every parameter and persistent buffer below ``module``, in ``state_dict`` order."""
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, tensor in sub._parameters.items():
            if tensor is not None:
                yield sub, dot + name, tensor
        for name, tensor in sub._buffers.items():
            if tensor is not None and name not in sub._non_persistent_buffers_set:
                yield sub, dot + name, tensor


def restored_tensors(*modules: Any) -> dict[int, torch.Tensor]:
    """The tensors that loading a ``state_dict`` of ``modules`` restores, by ``id``.

    :param modules: modules (other objects are ignored).
    :return: ``{id(tensor): tensor}``.
    """
    result: dict[int, torch.Tensor] = {}
    for module in modules:
        if not isinstance(module, torch.nn.Module) or any(map(_has_state_hooks, module.modules())):
            continue
        state: Any = module.state_dict(keep_vars=True)
        for owner, key, tensor in _slots(module):
            if (state.get(key) is tensor and _standard_state(owner)
                    and type(tensor) in (torch.Tensor, torch.nn.Parameter)
                    and tensor.layout == torch.strided and not tensor.is_quantized and tensor.device.type != "meta"):
                result[id(tensor)] = tensor
    return result


class _NullSink:
    def write(self, data):
        return len(data)


def _storage_key(tensor):
    """What identifies the memory of ``tensor`` (``None`` for a tensor without any)."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...: no single storage
        return None
    if storage.nbytes() == 0 or tensor.device.type == "meta":
        return None
    return tensor.device, storage.data_ptr()


def without_aliases(obj: Any, tensors: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Those of ``tensors`` whose memory no other tensor reachable from ``obj`` shares.

    A tensor that shares its storage with another object (a view kept in an
    attribute, a buffer that views a parameter) keeps its data in the structure
    file, so that the sharing survives a load as it did before format 2.

    :param tensors: ``{id(tensor): tensor}``.
    :return: the same kind of dict, without the aliased tensors.
    """
    seen: dict[Any, set[int]] = {}  # storage key -> ids of the tensor objects on it

    class Census(pickle.Pickler):
        def reducer_override(self, reached):
            if isinstance(reached, torch.Tensor):
                key = _storage_key(reached)
                if key is not None:
                    seen.setdefault(key, set()).add(id(reached))
                return tuple, ()  # nothing of the tensor is pickled: only its storage counts
            return NotImplemented

    try:
        Census(_NullSink(), protocol=2).dump(obj)
    except Exception as e:  # the real save will raise it, with torch's own message
        log.debug("could not look for aliased tensors (%r); every tensor keeps its data", e)
        return {}
    for key in (_storage_key(t) for t in tensors.values()):
        if key is not None:
            seen.setdefault(key, set())
    aliased = {i for ids in seen.values() if len(ids) > 1 for i in ids}
    return {i: t for i, t in tensors.items() if i not in aliased}


def _dressed_as(tensor, data):
    """``data`` as a tensor of ``tensor``'s type (plain or parameter), ``requires_grad`` and attributes."""
    if isinstance(tensor, torch.nn.Parameter):
        data = torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
    else:
        data.requires_grad_(tensor.requires_grad)
    data.__dict__.update(tensor.__dict__)
    return data


def _meta_stand_in(tensor):
    """A meta tensor of the same type, dtype, shape, strides, ``requires_grad`` and attributes."""
    return _dressed_as(tensor, torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="meta"))


def torch_function_name(obj: Any) -> Optional[str]:
    """The name under ``torch`` of a builtin torch function (``torch.tanh``), else ``None``.

    Pickle stores such a function as a call of ``getattr`` on a class of torch's C
    extension, which no safe unpickler admits; stored by its name, ``torch.tanh``, it
    is one global that the trust gate can judge.
    """
    if type(obj) is not types.BuiltinFunctionType:
        return None
    name = getattr(obj, "__name__", None)
    if name and "." in getattr(obj, "__qualname__", "") and getattr(torch, name, None) is obj:
        return name
    return None


def pickle_module_without(tensors: Mapping[int, torch.Tensor]) -> types.SimpleNamespace:
    """A pickle module for ``torch.save`` that writes each of ``tensors`` as a meta tensor.

    :param tensors: ``{id(tensor): tensor}`` as :func:`restored_tensors` returns.
    :return: an object with the ``Pickler`` and ``Unpickler`` that ``torch.save`` uses.
    """

    class Pickler(pickle.Pickler):
        def __init__(self, file, protocol=2, **kwargs):
            super().__init__(file, protocol, **kwargs)
            self._protocol = protocol
            self._stand_ins = []  # alive until the dump ends: pickle's memo is keyed by id

        def reducer_override(self, obj):
            if isinstance(obj, torch.Tensor) and tensors.get(id(obj)) is obj:
                stand_in = _meta_stand_in(obj)
                self._stand_ins.append(stand_in)
                return stand_in.__reduce_ex__(self._protocol)
            name = torch_function_name(obj)
            if name is not None:  # torch.tanh by its name, not as getattr(torch._C._VariableFunctionsClass, "tanh")
                return name
            return NotImplemented

    return types.SimpleNamespace(Pickler=Pickler, Unpickler=pickle.Unpickler, __name__="pickle")


def materialize(module: Any, state: Mapping[str, Any], path: Union[str, os.PathLike], *,
                device: Union[str, torch.device, None] = None, own_memory: bool = True) -> Mapping[str, Any]:
    """Give every meta parameter and buffer of ``module`` its data from ``state``, in place.

    Each meta tensor is swapped (:func:`torch.utils.swap_tensors`) with a tensor of
    the same type holding the entry of ``state``: every reference to it (the
    optimizer's, a tied module's) sees the data. Other tensors are left alone.

    :param module: a module from a structure file (anything else is returned as is).
    :param state: its ``state_dict``.
    :param path: the file ``state`` comes from, for errors.
    :param device: where the tensors go (default: where the state's tensors are).
    :param own_memory: copy the data into new memory (with the strides the tensor
        was saved with) instead of using the state's tensors themselves, which may
        be a file's memory map.
    :return: ``state`` with the materialized tensors in place of their entries, to
        hand to ``load_state_dict`` (which then copies nothing for them).
    :raises IncompatibleCheckpointError: when ``state`` lacks an entry or its
        shape or dtype differs (and then ``module`` is left as it was).
    """
    if not isinstance(module, torch.nn.Module):
        return state
    state = dict(state)
    # id -> (meta tensor, its state entry, its keys); checked whole before anything changes
    pending: dict[int, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
    for _owner, key, tensor in _slots(module):
        if tensor.device.type != "meta":
            continue
        if id(tensor) in pending:
            pending[id(tensor)][2].append(key)
            continue
        source = state.get(key)
        if not isinstance(source, torch.Tensor):
            raise IncompatibleCheckpointError(f"{path} has no tensor for {key!r}, which the model of the structure "
                                              "file needs.")
        if source.shape != tensor.shape or source.dtype != tensor.dtype:
            raise IncompatibleCheckpointError(
                f"{key!r} in {path} is {source.dtype} of shape {tuple(source.shape)}; the model of the structure "
                f"file has {tensor.dtype} of shape {tuple(tensor.shape)}. Load files of one run together.")
        pending[id(tensor)] = (tensor, source, [key])
    for tensor, source, keys in pending.values():
        target = torch.device(device) if device is not None else source.device
        if own_memory:
            data = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=target)
            data.copy_(source.detach())
        else:
            data = source.detach().to(target)
        torch.utils.swap_tensors(tensor, _dressed_as(tensor, data))
        state.update(dict.fromkeys(keys, tensor))
    if pending:
        log.debug("materialized %d tensors from %s", len(pending), path)
    return state
