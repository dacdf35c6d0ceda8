"""Controllers: the optimizer, the learning-rate schedulers, when training stops, and where it stands."""
import functools
import logging
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

__all__ = ["TrainingPosition", "Controller", "PatienceController"]

log = logging.getLogger(__name__)

_PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau


@dataclass
class TrainingPosition:
    """Where training stands inside the current epoch.

    :ivar epoch: the epoch in progress (equal to the controller's ``current_epoch``).
    :ivar samples_done: training samples of this epoch already trained on.
    :ivar step: optimizer steps taken since the run began.
    :ivar loss_sum: sum of batch loss times batch size over this epoch so far.
    :ivar interrupted: why the checkpoint was written mid-epoch (``None`` at an epoch's end).
    """

    epoch: int = 0
    samples_done: int = 0
    step: int = 0
    loss_sum: float = 0.0
    interrupted: Optional[str] = None

    def state_dict(self) -> dict:
        """The position as a plain dict."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrainingPosition":
        """Build a position from :meth:`state_dict`'s output."""
        return cls(**{k: state[k] for k in ("epoch", "samples_done", "step", "loss_sum", "interrupted")})


def _track_optimizer_steps(optimizer):
    """Mark ``optimizer.step`` the way LR schedulers expect after an unpickle.

    Schedulers wrap their optimizer's ``step`` at construction to warn when they are
    stepped first; that instance attribute is not pickled, so restore it.
    """
    if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
        return
    step = type(optimizer).step
    owner = weakref.ref(optimizer)

    @functools.wraps(step)
    def marked_step(*args, **kwargs):
        opt = owner()
        opt._opt_called = True
        return step(opt, *args, **kwargs)

    marked_step._wrapped_by_lr_sched = True
    optimizer.step = marked_step


class Controller:
    """Owns the optimizer and schedulers and decides, epoch by epoch, whether to go on.

    :param optimizer: a :class:`torch.optim.Optimizer` over the model's parameters.
    :param scheduler: ``None``, one LR scheduler or a list of them; a
        :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` is stepped with the
        stopping metric, the others without argument, once per epoch.
    :param batch_size: training batch size (may be changed between epochs).
    :param max_epochs: the number of epochs after which training ends.
    :param stopping_key: name of the validation metric that decides the best model.
    :param eval_batch_size: evaluation batch size (default: ``batch_size``).
    :ivar position: the :class:`TrainingPosition` of the run: where
        ``train_model`` continues (a loader restores it from the checkpoint). It is
        saved in the state files, never in the structure file.
    :ivar loaded_from: the run directory a loader restored this controller from
        (``None`` for a new one): ``train_model`` continues there unless given another
        ``directory``. Never saved.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, batch_size: int, max_epochs: int,
                 stopping_key: str, *, eval_batch_size: Optional[int] = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
        if scheduler is None:
            schedulers = []
        elif isinstance(scheduler, (list, tuple)):
            schedulers = list(scheduler)
        else:
            schedulers = [scheduler]
        for s in schedulers:
            if getattr(s, "optimizer", optimizer) is not optimizer:
                raise ValueError(f"scheduler {type(s).__name__} steps another optimizer than the controller's")
        for name, value in (("batch_size", batch_size), ("max_epochs", max_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.optimizer = optimizer
        self.schedulers = schedulers
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_epochs = max_epochs
        self.stopping_key = stopping_key
        self.current_epoch = 0
        self.boredom = 0
        #: why training stopped early (``None`` while it may go on until ``max_epochs``)
        self.stop_reason: Optional[str] = None
        self.position = TrainingPosition()
        for s in schedulers:  # hippynn's RaiseBatchSizeOnPlateau changes the controller's batch size
            if callable(getattr(s, "set_controller", None)):
                s.set_controller(self)
        self.loaded_from = None
        self._loaded_structure = None  # the digest of the structure file a loader read this controller from

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("position", "loaded_from", "_loaded_structure"):  # state files hold the position
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.position = TrainingPosition(epoch=self.current_epoch)
        self.loaded_from = self._loaded_structure = None
        if self.schedulers and isinstance(self.optimizer, torch.optim.Optimizer):  # not a prediction's stand-in
            _track_optimizer_steps(self.optimizer)

    @property
    def finished(self) -> bool:
        """Whether training is over: ``max_epochs`` reached, or the controller stopped it."""
        return self.current_epoch >= self.max_epochs or self.stop_reason is not None

    @property
    def scheduler(self) -> Optional[object]:
        """The first scheduler, or ``None``."""
        return self.schedulers[0] if self.schedulers else None

    def push_epoch(self, epoch: int, better_model: bool, metric: float) -> bool:
        """Record the end of ``epoch``; step the schedulers.

        :param epoch: the epoch that just ended (0-based).
        :param better_model: whether the stopping metric improved.
        :param metric: the value of the stopping metric.
        :return: ``True`` to go on training, ``False`` to stop.
        """
        self.current_epoch = epoch + 1
        self.boredom = 0 if better_model else self.boredom + 1
        for s in self.schedulers:
            if isinstance(s, _PLATEAU):
                s.step(metric)
            else:
                s.step()
        return self.stop_reason is None and self.current_epoch < self.max_epochs

    def state_dict(self) -> dict:
        """Every field and the state of the optimizer and each scheduler, as plain data."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "max_epochs": self.max_epochs,
            "stopping_key": self.stopping_key,
            "current_epoch": self.current_epoch,
            "boredom": self.boredom,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned.

        :raises ValueError: when the number of schedulers differs.
        """
        if len(state["schedulers"]) != len(self.schedulers):
            raise ValueError(
                f"the state holds {len(state['schedulers'])} scheduler state(s) but this controller has "
                f"{len(self.schedulers)} scheduler(s)"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        for s, s_state in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(s_state)
        for key in ("batch_size", "eval_batch_size", "max_epochs", "stopping_key", "current_epoch", "boredom",
                    "stop_reason"):
            setattr(self, key, state[key])
        self.position = TrainingPosition(epoch=self.current_epoch)


class PatienceController(Controller):
    """A :class:`Controller` that also stops after ``termination_patience`` epochs without improvement.

    :param termination_patience: the number of epochs in a row without a better
        model after which training stops.
    """

    def __init__(self, *args: Any, termination_patience: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(termination_patience, int) or termination_patience < 1:
            raise ValueError(f"termination_patience must be a positive integer, not {termination_patience!r}")
        self.termination_patience = termination_patience

    def push_epoch(self, epoch: int, better_model: bool, metric: float) -> bool:
        go_on = super().push_epoch(epoch, better_model, metric)
        if go_on and self.boredom >= self.termination_patience:
            self.stop_reason = (f"no improvement for {self.boredom} epochs "
                                f"(termination_patience={self.termination_patience})")
            return False
        return go_on

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["termination_patience"] = self.termination_patience
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.termination_patience = state["termination_patience"]
