"""Data-parallel runs: which rank does what, and how ranks agree, on PyTorch's own engine.

One script runs in one process or data-parallel under ``torchrun`` or ``srun``:
:func:`current` reads the launcher's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``; in an ``srun`` step ``SLURM_STEP_NUM_TASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``) or
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

import atexit
import datetime
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from experiment_io.errors import RankFailedError
from experiment_io.experiment.devices import module_device
from experiment_io.experiment.launch import launched_world

__all__ = ["current", "join", "Distribution", "SINGLE", "unwrap", "is_data_parallel", "ordered_mean_hook",
           "data_parallel"]

log = logging.getLogger(__name__)



def _signal_code(name):
    return 0 if name is None else int(signal.Signals[name])


def _signal_name(code):
    return None if code == 0 else signal.Signals(code).name


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

    def agree(self, signal: Optional[str], due: bool, loss_sum: float, failed: bool = False) -> tuple:
        """What every rank decides at a batch boundary, from what each rank saw.

        :param signal: the signal this rank received (``None``: none).
        :param due: whether this rank's clock says a timed save is due.
        :param loss_sum: this rank's sum of loss times samples since the last call.
        :param failed: whether this rank failed (rank 0: its background save).
        :return: ``(signal, due, loss_sum, failed)`` agreed by all: of the signals
            the ranks received, the one with the highest number (SIGTERM over SIGUSR1
            over SIGINT), whether any rank's clock was due, the sum over the ranks, and
            whether any rank failed.
        """
        if not self.active:
            return signal, due, loss_sum, failed
        flags = torch.tensor([_signal_code(signal), int(due), int(failed)], dtype=torch.int64, device=self.device)
        total = torch.tensor([float(loss_sum)], dtype=torch.float64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return _signal_name(int(flags[0].item())), bool(flags[1].item()), float(total[0].item()), bool(flags[2].item())

    def same_everywhere(self, value: Any) -> bool:
        """Whether ``value`` (plain data) is the same on every rank as on rank 0; the answer is the same on all."""
        if not self.active:
            return True
        same = torch.tensor([int(self.broadcast(value) == value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        return bool(same.item())

    def average_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Average the gradients of ``parameters`` over the ranks (those DDP does not reduce: a loss's)."""
        if not self.active:
            return
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

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


def current(device: Optional[torch.device] = None) -> Distribution:
    """The distribution of this process, from an initialized process group (or :data:`SINGLE`).

    :param device: for NCCL, the rank's GPU (default: ``cuda:LOCAL_RANK``).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    rank, local_rank, world_size = launched_world()
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    elif device is None or torch.device(device).type != "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return Distribution(rank, local_rank, world_size, torch.device(device))


def _leave():
    """At exit, destroy the process group that :func:`join` initialized, if it is still there: its threads (gloo's
    workers, the store's) are joined while the interpreter is whole, not torn down with the process, where a rank
    that had finished could abort ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # exiting anyway: say it, do not mask the exit status
            log.debug("could not destroy the process group at exit: %r", e)


def join(device: Optional[torch.device] = None, *, timeout: Optional[datetime.timedelta] = None) -> Distribution:
    """This process's :class:`Distribution`, initializing the process group when a launcher started several ranks.

    Nothing is done for one process, nor when the user initialized the group
    already. Otherwise the group is initialized from the launcher's variables
    (``MASTER_ADDR`` and ``MASTER_PORT`` are needed, as for ``env://``), with the
    NCCL backend when ``device`` is a CUDA device and gloo otherwise, and a store
    prefix of its own for each restart attempt of ``torchrun``. A group initialized
    here is destroyed when the process exits (a group the user initialized is the
    user's to destroy).

    :param device: the device the model trains on.
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    initialized = dist.is_available() and dist.is_initialized()
    rank, local_rank, world_size = launched_world()
    if world_size == 1:
        return SINGLE
    if cuda and device is not None:  # the collectives of NCCL run on the current GPU: make it the model's
        torch.cuda.set_device(torch.device(device))
    if initialized:
        return current(device)
    if not dist.is_available():  # pragma: no cover - torch built without distributed support
        raise RuntimeError("this torch has no torch.distributed; a data-parallel run needs it")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"{world_size} ranks were launched, but {' and '.join(missing)} is not set: under srun, export "
            "MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port) in the job script, "
            "or launch with torchrun, which sets them."
        )
    backend = "nccl" if cuda else "gloo"
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    timeout_kwargs: dict[str, Any] = {"timeout": timeout} if timeout else {}
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, **timeout_kwargs))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"experiment_io/attempt-{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **timeout_kwargs)
    atexit.register(_leave)
    log.info("joined the process group: rank %d of %d (local rank %d), backend %s", rank, world_size, local_rank,
             backend)
    return current(device)


# not annotated: DDP refuses a hook whose annotations are not its own classes, and this module's annotations are
# strings (``from __future__ import annotations``)
def ordered_mean_hook(state, bucket):
    """A DDP communication hook: the mean of the ranks' gradients, summed in rank order.

    DDP's own all-reduce adds the ranks' gradients in an order that depends on where
    each gradient lies in its bucket, and DDP lays its buckets out anew after the
    first step of every process; with three ranks or more, a resumed run would then
    add in another order than the run it continues, and differ in the last bits.
    Here every rank gathers the buckets of all ranks and adds them in rank order,
    so the result depends on nothing but the gradients. It moves ``world_size``
    times the bucket: meant for the CPU runs whose resume must be exact.
    """
    tensor = bucket.buffer()
    world_size = dist.get_world_size()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    future = dist.all_gather(gathered, tensor.div_(world_size), async_op=True).get_future()

    def add(_):
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        return total

    return future.then(add)


def is_data_parallel(model: Any) -> bool:
    """Whether ``model`` or a wrapper inside it is a :class:`~torch.nn.parallel.DistributedDataParallel`."""
    while model is not None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return True
        model = getattr(model, "_orig_mod", None)
    return False


def unwrap(model: Any) -> Any:
    """The plain module inside wrappers for training: :class:`~torch.nn.parallel.DistributedDataParallel`
    and the module that :func:`torch.compile` returns (or ``model`` itself)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def data_parallel(model: torch.nn.Module, distribution: Distribution) -> torch.nn.Module:
    """``model`` wrapped for data-parallel training (DDP) when there are several ranks, else itself."""
    if not distribution.active or is_data_parallel(model):
        return model
    device = module_device(model)
    ids = [device] if device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if device.type == "cpu":  # exact resume is promised on the CPU: a reduction whose order never changes
        wrapped.register_comm_hook(None, ordered_mean_hook)
    return wrapped
