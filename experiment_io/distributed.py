"""Data-parallel runs: which rank does what, and how ranks agree, on PyTorch's own engine.

One script runs in one process or data-parallel under ``torchrun`` or ``srun``:
:func:`current` reads the launcher's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``; SLURM's ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``) or
an already initialized process group, and :func:`join` initializes the process
group when the user has not (NCCL for CUDA models, gloo otherwise). Everything
that depends on the rank lives in :class:`Distribution`: only global rank 0
writes; ranks agree, at every batch boundary, on whether to stop and whether a
timed save is due (:meth:`Distribution.agree`); validation metrics computed on
rank 0 are broadcast; every rank's random streams are gathered for rank 0's save.

A restarted attempt of ``torchrun --max-restarts`` meets, in the launcher's store,
the keys of the attempt before it; the process group of each attempt therefore
uses a store prefix of its own (from ``TORCHELASTIC_RESTART_COUNT``), so that a
restarted rank never reads a peer's address left by a dead attempt.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .errors import RankFailedError
from .launch import launched_world

__all__ = ["current", "join", "Distribution", "SINGLE", "unwrap"]

log = logging.getLogger(__name__)

_SIGNALS = {0: None, 1: "SIGINT", 2: "SIGUSR1", 3: "SIGTERM"}
_SIGNAL_CODES = {name: code for code, name in _SIGNALS.items() if name}


@dataclass(frozen=True)
class Distribution:
    """The ranks of a run: this process's place among them and the collectives they share.

    :ivar rank: the global rank (0 writes the run's files).
    :ivar local_rank: the rank on this node (picks the GPU).
    :ivar world_size: the number of ranks.
    :ivar device: where the collectives' tensors live (CPU for gloo, the rank's GPU for NCCL).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: Any = "cpu"

    @property
    def active(self) -> bool:
        """Whether there is more than one rank."""
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes the run's files (global rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.active:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's ``obj``, in rank order, on rank 0 (``None`` on the others)."""
        if not self.active:
            return [obj]
        gathered = [None] * self.world_size if self.writer else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def agree(self, signal: Optional[str], due: bool, loss_sum: float) -> tuple:
        """What every rank decides at a batch boundary, from what each rank saw.

        :param signal: the signal this rank received (``None``: none).
        :param due: whether this rank's clock says a timed save is due.
        :param loss_sum: this rank's sum of loss times samples since the last call.
        :return: ``(signal, due, loss_sum)`` agreed by all: the strongest signal any
            rank received (SIGTERM over SIGUSR1 over SIGINT), whether any rank's clock
            was due, and the sum over the ranks.
        """
        if not self.active:
            return signal, due, loss_sum
        values = torch.tensor([float(_SIGNAL_CODES.get(signal, 0)), float(due), float(loss_sum)],
                              dtype=torch.float64, device=self.device)
        flags, total = values[:2].clone(), values[2:].clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return _SIGNALS[int(flags[0].item())], bool(flags[1].item()), float(total[0].item())

    def on_writer(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on rank 0 only; if it fails there, every rank raises.

        :return: what ``fn`` returned on rank 0, ``None`` on the others.
        :raises RankFailedError: on the other ranks when ``fn`` failed on rank 0
            (which raises the error itself).
        """
        result = error = None
        if self.writer:
            try:
                result = fn()
            except BaseException as e:  # told to the other ranks, then raised
                error = e
        if self.active:
            failed = self.broadcast(None if error is None else f"{type(error).__name__}: {error}")
            if failed is not None and not self.writer:
                raise RankFailedError(f"rank 0 failed, so rank {self.rank} stops too: {failed}")
        if error is not None:
            raise error
        return result

    def _object_device(self):
        return self.device if dist.get_backend() == "nccl" else None


#: The distribution of a run in one process.
SINGLE = Distribution()


def current() -> Distribution:
    """The distribution of this process, from an initialized process group (or :data:`SINGLE`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    rank, local_rank, world_size = launched_world()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Distribution(rank, local_rank, world_size, device)


def join(device: Optional[torch.device] = None, *, timeout: Optional[datetime.timedelta] = None) -> Distribution:
    """This process's :class:`Distribution`, initializing the process group when a launcher started several ranks.

    Nothing is done for one process, nor when the user initialized the group
    already. Otherwise the group is initialized from the launcher's variables
    (``MASTER_ADDR`` and ``MASTER_PORT`` are needed, as for ``env://``), with the
    NCCL backend when ``device`` is a CUDA device and gloo otherwise, and a store
    prefix of its own for each restart attempt of ``torchrun``.

    :param device: the device the model trains on.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    rank, local_rank, world_size = launched_world()
    if world_size == 1:
        return SINGLE
    if not dist.is_available():  # pragma: no cover - torch built without distributed support
        raise RuntimeError("this torch has no torch.distributed; a data-parallel run needs it")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"{world_size} ranks were launched, but {' and '.join(missing)} is not set: under srun, export "
            "MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port) in the job script, "
            "or launch with torchrun, which sets them."
        )
    cuda = device is not None and torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, **({"timeout": timeout} if timeout else {})))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"experiment_io/attempt-{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            **({"timeout": timeout} if timeout else {}))
    log.info("joined the process group: rank %d of %d (local rank %d), backend %s", rank, world_size, local_rank, backend)
    return current()


def unwrap(model):
    """The plain module inside wrappers for training: :class:`~torch.nn.parallel.DistributedDataParallel`
    and the module that :func:`torch.compile` returns (or ``model`` itself)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
