"""PyTorch Lightning: experiment_io's storage for Lightning's checkpoints, and exact resume.

Needs Lightning (``pip install 'experiment_io[lightning]'``); importing this module
imports ``lightning.pytorch``.

- :class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin: every
  checkpoint Lightning writes (``ModelCheckpoint``, ``trainer.save_checkpoint``)
  goes through :func:`~experiment_io.atomic_save` (a temporary file, fsync, the
  previous file kept as ``<name>.prev.ckpt``, digest and size in the directory's
  manifest), and every load through :func:`~experiment_io.verified_load` (proven
  intact first, the previous generation if the newest is damaged, then
  ``torch.load(weights_only=True)``). A removal (``save_top_k``) is committed in the
  manifest like a save.
- :class:`ExactResume` is a callback that makes a fit resume *exactly*: at the next
  sample of the interrupted epoch, with every random stream where it was. On
  SIGTERM, SIGUSR1 or Ctrl-C it writes a checkpoint at the end of the current batch
  and stops (exit status :data:`~experiment_io.PREEMPTED_EXIT_CODE`, 75, for a
  scheduler's signal, as ``train_model``); it also writes one every
  ``every_n_steps`` steps. The training data must be drawn through a
  :class:`~experiment_io.ResumableSampler` (``use_distributed_sampler=False``: the
  sampler shards the data over the ranks itself).

::

    from experiment_io import ResumableSampler
    from experiment_io.frontends.lightning import AtomicCheckpointIO, ExactResume

    sampler = ResumableSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler)
    resume = ExactResume("checkpoints/last.ckpt", sampler=sampler, every_n_steps=500)
    trainer = Trainer(plugins=[AtomicCheckpointIO()], callbacks=[resume], use_distributed_sampler=False)
    trainer.fit(model, loader, ckpt_path=resume.ckpt_path())   # None the first time: a fresh fit
"""
import logging
import os
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union, cast

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import CheckpointIO

from experiment_io.errors import SetupError
from experiment_io.storage.generations import previous_name
from experiment_io.frontends.own_loop import AtomicSaver
from experiment_io.frontends.verified_loading import verified_load
from experiment_io.training.preemption import DEFAULT_SIGNALS, PREEMPTED_EXIT_CODE, Preemption, Stop
from experiment_io.storage.manifest import read_manifest
from experiment_io.storage.verification import is_retired
from experiment_io.experiment.rng import get_rng_state, set_rng_state
from experiment_io.experiment.sampler import ResumableSampler

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

__all__ = ["AtomicCheckpointIO", "ExactResume"]

log = logging.getLogger(__name__)


class AtomicCheckpointIO(CheckpointIO):
    """Lightning's checkpoint files written atomically and durably, loaded verified.

    Pass it to the trainer: ``Trainer(plugins=[AtomicCheckpointIO()])``. In a
    data-parallel fit Lightning calls it on global rank 0 only.

    A checkpoint must hold what ``torch.load(weights_only=True)`` loads: tensors,
    ``state_dict``\\ s, plain containers, numbers, strings (Lightning's own entries
    do). Hyperparameters of your own classes are refused when saving, with the fix:
    register them with :func:`torch.serialization.add_safe_globals`.
    """

    def __init__(self):
        self._saver = AtomicSaver()

    def save_checkpoint(self, checkpoint: dict, path: Union[str, os.PathLike],
                        storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` with :func:`~experiment_io.atomic_save`."""
        if storage_options is not None:
            raise SetupError("AtomicCheckpointIO takes no storage_options; it writes local or shared file systems")
        self._saver.save(checkpoint, os.fspath(path))

    def load_checkpoint(self, path: Union[str, os.PathLike], map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict:
        """The checkpoint at ``path``, proven intact, through :func:`~experiment_io.verified_load` (always
        ``weights_only``)."""
        if weights_only is False:
            log.warning("AtomicCheckpointIO loads with weights_only=True whatever Lightning asks (%s)", path)
        return verified_load(os.fspath(path), map_location=map_location)

    def remove_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Remove a checkpoint (and its previous generation) with its manifest record."""
        self._saver.remove(os.fspath(path))

    def teardown(self) -> None:
        self._saver.wait()


def _batch_length(batch):
    """The number of samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_length(batch[0])
    raise SetupError(f"ExactResume cannot tell how many samples a batch of type {type(batch).__name__} holds; "
                     "pass batch_size= to ExactResume")


def _world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ExactResume(Callback):
    """Write a "last" checkpoint on a signal and every ``every_n_steps`` steps; resume from it exactly.

    The checkpoint holds, besides Lightning's own state, the sampler's position and
    the random streams of every rank (torch, CUDA, numpy, Python). A fit resumed from
    it (``trainer.fit(..., ckpt_path=...)``) draws the rest of the interrupted epoch
    in the same order and ends with the same weights as a fit that was never
    interrupted (on the CPU; on GPUs as far as their kernels are deterministic).

    :param path: the checkpoint file (its directory is created).
    :param sampler: the :class:`~experiment_io.ResumableSampler` of the training
        data; without it an interrupted epoch starts over.
    :param every_n_steps: also write the checkpoint every this many optimizer steps (0: only on signals).
    :param signals: the signals that write the checkpoint and stop the fit.
    :param exit_on_preemption: after a scheduler's signal (not Ctrl-C), exit with
        status 75 once the checkpoint is written; otherwise (and after Ctrl-C) the fit
        just stops (``trainer.should_stop``).
    :param batch_size: the samples per batch on each rank, when a batch's length cannot be read from it.
    """

    def __init__(self, path: Union[str, os.PathLike], *, sampler: Optional[ResumableSampler] = None,
                 every_n_steps: int = 0, signals: Iterable = DEFAULT_SIGNALS, exit_on_preemption: bool = True,
                 batch_size: Optional[int] = None):
        if sampler is not None and not isinstance(sampler, ResumableSampler):
            raise SetupError(f"ExactResume(sampler=...) takes an experiment_io.ResumableSampler, not "
                             f"{type(sampler).__name__}: only its position can be saved and continued")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise SetupError(f"every_n_steps must be a non-negative integer, not {every_n_steps!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.sampler = sampler
        if sampler is not None:  # Lightning counts the batches of an epoch, those before a resume included
            sampler.len_whole_epoch = True
        self.every_n_steps = every_n_steps
        self.exit_on_preemption = exit_on_preemption
        self.batch_size = batch_size
        self._signals = tuple(signals)
        self._preemption: Optional[Preemption] = None
        self._pending_rng = None
        self._warned_sampler = False
        # the global step after the previous batch: a batch that changed it stepped
        self._last_step: Optional[int] = None
        self._saved_step: Optional[int] = None

    @property
    def state_key(self) -> str:
        return "experiment_io.ExactResume"

    def ckpt_path(self) -> Optional[str]:
        """The checkpoint to resume from: ``path`` if a committed save of it is recorded in its directory's
        manifest (its previous generation counts), else ``None`` (a fresh fit). A file that a save killed before
        its commit left behind is not a checkpoint."""
        directory, name = os.path.split(self.path)
        try:
            manifest = read_manifest(directory)
        except Exception as e:  # noqa: BLE001 - a damaged manifest: the load says what is wrong
            log.warning("the manifest beside %s is unreadable (%s); trying to resume from it anyway", self.path, e)
            return self.path
        files = manifest[1] if manifest else {}
        recorded = any(n in files and not is_retired(files[n]) for n in (name, previous_name(name)))
        return self.path if recorded else None

    # --- signals -----------------------------------------------------------------------------

    def on_train_start(self, trainer: "Trainer", pl_module: "LightningModule") -> None:
        # installed after Lightning's own handlers (which would raise at the end of the batch, before a save)
        self._preemption = Preemption(self._signals, exit_on_preemption=self.exit_on_preemption).__enter__()

    def _release_signals(self):
        if self._preemption is not None:
            self._preemption.__exit__(None, None, None)
            self._preemption = None

    def on_train_end(self, trainer: "Trainer", pl_module: "LightningModule") -> None:
        self._release_signals()

    def on_exception(self, trainer: "Trainer", pl_module: "LightningModule", exception: BaseException) -> None:
        self._release_signals()

    # --- every batch -----------------------------------------------------------------------

    def on_train_batch_start(self, trainer: "Trainer", pl_module: "LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self._pending_rng is not None:  # the first batch after a resume starts from the saved streams
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(self, trainer: "Trainer", pl_module: "LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.sampler is not None:
            self.sampler.advance(self.batch_size or _batch_length(batch))
        elif not self._warned_sampler:
            log.warning("ExactResume has no sampler: a fit resumed mid-epoch starts that epoch over")
            self._warned_sampler = True
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        requested = self._preemption is not None and self._preemption.requested is not None
        # every rank takes part in this reduction after every batch: all stop at the same batch
        stop = bool(trainer.strategy.reduce_boolean_decision(requested, all=False))
        if not stepped:  # inside a gradient accumulation window: the accumulated gradients are in no checkpoint
            return
        due = (bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
               and trainer.global_step != self._saved_step)
        if not (stop or due):
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step
        if not stop:
            return
        name = self._agreed_signal()
        log.warning("%s: checkpoint written to %s at step %d (epoch %d, batch %d); resume with "
                    "trainer.fit(..., ckpt_path=%r)", name, self.path, trainer.global_step, trainer.current_epoch,
                    batch_idx, self.path)
        if self.exit_on_preemption and name != "SIGINT":
            world_size, _ = _world()
            cast(Preemption, self._preemption).exiting(Stop.by_signal(name), launched=world_size > 1)
            self._release_signals()
            raise SystemExit(PREEMPTED_EXIT_CODE)
        trainer.should_stop = True

    def _agreed_signal(self):
        """The signal every rank acts on: the first one received, in rank order (a collective)."""
        mine = self._preemption.requested if self._preemption is not None else None
        world_size, _ = _world()
        if world_size == 1:
            return mine
        names = [None] * world_size
        torch.distributed.all_gather_object(names, mine)
        return next(n for n in names if n is not None)

    def teardown(self, trainer: "Trainer", pl_module: "LightningModule", stage: str) -> None:
        self._pending_rng = None  # streams loaded for one fit are not applied to a later one
        self._release_signals()

    # --- what the checkpoint holds -------------------------------------------------------------

    def state_dict(self) -> dict:
        world_size, rank = _world()
        rng = [get_rng_state()]
        if world_size > 1:  # every rank's streams, in rank order (a collective: every rank saves)
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        return {"sampler": self.sampler.state_dict() if self.sampler is not None else None, "rng": rng}

    def load_state_dict(self, state_dict: dict) -> None:
        world_size, rank = _world()
        if self.sampler is not None and state_dict.get("sampler") is not None:
            self.sampler.load_state_dict(state_dict["sampler"])
        states = state_dict.get("rng") or []
        if len(states) == world_size:
            self._pending_rng = states[rank]
        elif states:
            log.warning("the checkpoint holds the random streams of %d rank(s), this fit has %d: they are not "
                        "restored, and the resumed fit is not bit-for-bit the interrupted one", len(states), world_size)
