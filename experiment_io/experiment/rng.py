"""Random number generator states: capture every stream, restore every stream.

The streams are torch's CPU generator, the generator of every CUDA device, numpy's
global generator and Python's :mod:`random`. The captured state is plain data and
tensors, so it loads with ``torch.load(weights_only=True)``; every tensor in it is a
CPU ``uint8`` or ``int64`` tensor, whatever device a load maps tensors to.
"""
import logging
import random
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state", "placed_on_cpu"]

log = logging.getLogger(__name__)


def get_rng_state() -> dict[str, Any]:
    """Capture the state of every random stream.

    :return: a dict of plain data and CPU tensors.
    """
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    return state


def _cpu_bytes(tensor):
    return tensor.detach().to(device="cpu", dtype=torch.uint8).contiguous()


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore every random stream from :func:`get_rng_state`'s output.

    CUDA states are restored when this machine has at least as many CUDA devices as
    were saved; otherwise what fits is restored and the rest logged.
    """
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    cuda_states = state.get("cuda") or []
    if cuda_states:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for index, cuda_state in enumerate(cuda_states[:available]):
            torch.cuda.set_rng_state(_cpu_bytes(cuda_state), index)
        if available < len(cuda_states):
            log.warning(
                "the checkpoint holds RNG states of %d CUDA device(s), this machine has %d; "
                "the states of the missing devices were not restored",
                len(cuda_states), available,
            )
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].cpu().numpy().astype(np.uint32), "pos": int(np_state["pos"])},
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    })
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss"]))


def placed_on_cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``state`` with its torch and CUDA generator states as CPU ``uint8`` tensors."""
    placed = dict(state)
    placed["torch"] = _cpu_bytes(state["torch"])
    placed["cuda"] = [_cpu_bytes(s) for s in state.get("cuda") or []]
    numpy_state = dict(state["numpy"])
    numpy_state["key"] = numpy_state["key"].cpu()
    placed["numpy"] = numpy_state
    return placed
