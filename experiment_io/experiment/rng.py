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

from experiment_io.experiment.launch import launched_world

__all__ = ["get_rng_state", "set_rng_state", "placed_on_cpu", "rank_rng_state", "set_rank_rng_state"]

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
        # one tensor, not 625 ints: a checkpoint written at every epoch pickles a few hundred objects, not a thousand
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
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
    internal = py_state["internal"]  # a list in checkpoints written before 0.2.1
    internal = internal.tolist() if isinstance(internal, torch.Tensor) else internal
    random.setstate((py_state["version"], tuple(int(v) for v in internal), py_state["gauss"]))


def placed_on_cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``state`` with its torch and CUDA generator states as CPU ``uint8`` tensors."""
    placed = dict(state)
    placed["torch"] = _cpu_bytes(state["torch"])
    placed["cuda"] = [_cpu_bytes(s) for s in state.get("cuda") or []]
    numpy_state = dict(state["numpy"])
    numpy_state["key"] = numpy_state["key"].cpu()
    placed["numpy"] = numpy_state
    python_state = dict(state["python"])
    if isinstance(python_state["internal"], torch.Tensor):
        python_state["internal"] = python_state["internal"].cpu()
    placed["python"] = python_state
    return placed


def rank_rng_state(state: dict, path: str) -> tuple[dict, bool]:
    """The random streams this rank saved (in a data-parallel run, each rank's own), and whether they are its own."""
    rank, _, world_size = launched_world()
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) != world_size:
        log.warning("%s was written by %d rank(s) and is loaded by %d: the data order is continued exactly, the "
                    "random draws are not (rank %d starts from the streams of rank %d%s)", path, len(ranks),
                    world_size, rank, rank % len(ranks),
                    ", drawn anew from them and its rank" if rank >= len(ranks) else "")
    return ranks[rank % len(ranks)], rank < len(ranks)


def set_rank_rng_state(rng_state: dict, own: bool) -> None:
    """Restore the streams; a rank without streams of its own gets streams derived from these and its rank."""
    set_rng_state(rng_state)
    if not own:  # distinct from the rank whose streams it got, and reproducible
        seed = int.from_bytes(torch.randint(0, 2**31, (2,)).numpy().tobytes()[:8], "little") + launched_world()[0]
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
