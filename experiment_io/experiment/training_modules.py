"""The model side of an experiment: the model, its training loss and its evaluator."""
import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, NamedTuple, Optional, Union

import torch

from experiment_io.errors import SetupError

if TYPE_CHECKING:
    from experiment_io.experiment.databases import Database

__all__ = ["TrainingModules", "Evaluator", "as_tuple", "loss_value", "adopt_evaluator"]

log = logging.getLogger(__name__)

_JOINT = "(one pass)"  # the state key of a one-pass evaluation callable that is a module


def as_tuple(output: Any) -> tuple:
    """A model's output as a tuple of tensors (a single tensor becomes a 1-tuple)."""
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def loss_value(value: Any) -> torch.Tensor:
    """The loss to minimize in what a training loss returned.

    A tensor is the loss. Of a tuple or list (hippynn's training-loss graph returns
    a 1-tuple), the first element is; of a dict, the ``"loss"`` entry is.

    :raises SetupError: for anything else.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, dict) and isinstance(value.get("loss"), torch.Tensor):
        return value["loss"]
    raise SetupError(f"the training loss returned {type(value).__name__}: return a scalar tensor, a tuple or list "
                     "whose first element is the loss, or a dict with a 'loss' entry")


class TrainingModules(NamedTuple):
    """The three objects that are trained and judged.

    :ivar model: any :class:`torch.nn.Module`; ``model(*inputs)`` returns a tensor or a
        tuple of tensors.
    :ivar loss: the training loss, called as ``loss(*predictions, *targets)``; it
        returns the loss, or a tuple, list or dict that holds it: of a tuple or list the
        first element is the loss, of a dict the ``"loss"`` entry.
    :ivar evaluator: an :class:`Evaluator` over the same model.
    """

    model: torch.nn.Module
    loss: Any
    evaluator: "Evaluator"


class Evaluator:
    """Computes named evaluation losses of a model on a split of a database.

    The model runs on its own device, in evaluation mode and without gradients; its
    predictions are gathered on the CPU, where every evaluation loss is computed over
    the whole split at once (so that metrics such as a maximum error are exact, not
    averages of batch values).

    The losses come either one per name, ``{name: loss}``, or from one callable that
    computes several in one pass (as hippynn's validation graph does): it returns a
    tuple or list of scalars in the order of ``names``, or a dict ``{name: scalar}``.

    :param model: the model to evaluate.
    :param evaluation_losses: ``{name: loss}``, each loss called as
        ``loss(*predictions, *targets)`` and returning a scalar; or one callable
        called so and returning several.
    :param batch_size: batch size of evaluation when none is given to :meth:`evaluate`.
    :param names: the names of what one callable returns, in order (needed when it
        returns a tuple or list).
    """

    def __init__(self, model: torch.nn.Module, evaluation_losses: Union[Dict[str, Callable], Callable], *,
                 batch_size: int = 256, names: Optional[Iterable[str]] = None):
        self.joint: Optional[Callable] = None
        self.joint_names: tuple[str, ...] = ()
        if callable(evaluation_losses) and not isinstance(evaluation_losses, dict):
            if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
                raise SetupError(f"names must be a list of strings, not {names!r}")
            self.joint, self.joint_names = evaluation_losses, tuple(names or ())
            evaluation_losses = {}
        else:
            if names is not None:
                raise SetupError("names= goes with one callable that returns several metrics, not with a dict of "
                                 "losses")
            if not isinstance(evaluation_losses, dict) or not evaluation_losses:
                raise SetupError("evaluation_losses must be a non-empty dict {name: loss}, or one callable that "
                                 "returns several metrics (with names=[...])")
        for name, fn in evaluation_losses.items():
            if not isinstance(name, str) or not callable(fn):
                raise SetupError(f"evaluation loss {name!r} must be a callable under a string name")
        self.model = model
        self.evaluation_losses = dict(evaluation_losses)
        self.batch_size = batch_size
        self.database = None

    @property
    def metric_names(self) -> list:
        """The names of every metric :meth:`evaluate` returns (those of a one-pass callable returning a dict are
        known after the first evaluation)."""
        return list(self.evaluation_losses) + list(self.joint_names)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["database"] = None  # databases are stored by descriptor, never pickled
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.database = None
        self.__dict__.setdefault("joint", None)  # written before one-pass metrics existed
        self.__dict__.setdefault("joint_names", ())

    def modules(self) -> dict:
        """``{name: module}`` of the evaluation losses that are modules (the one-pass callable under ``""``)."""
        found = {name: fn for name, fn in self.evaluation_losses.items() if isinstance(fn, torch.nn.Module)}
        if isinstance(self.joint, torch.nn.Module):
            found[_JOINT] = self.joint
        return found

    def state_dict(self) -> dict:
        """The state of every evaluation loss that is a module (most have none)."""
        return {name: fn.state_dict() for name, fn in self.modules().items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of the evaluation losses from :meth:`state_dict`'s output."""
        modules = self.modules()
        for name, fn_state in state.items():
            if name not in modules:
                raise KeyError(f"evaluation loss {name!r} is in the state but not in this evaluator")
            modules[name].load_state_dict(fn_state)

    def predict(self, split: str, *, database: Optional["Database"] = None, batch_size: Optional[int] = None) -> tuple:
        """Run the model over a split.

        :return: ``(predictions, targets)``, tuples of CPU tensors over the whole split.
        """
        database = database if database is not None else self.database
        if database is None:
            raise ValueError("Evaluator has no database: pass database= or let train_model/test_model attach one")
        batch_size = batch_size or self.batch_size
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        was_training = self.model.training
        self.model.eval()
        outputs, targets = [], []
        try:
            with torch.no_grad():
                for batch_inputs, batch_targets in database.batches(split, batch_size):
                    prediction = as_tuple(self.model(*(t.to(device) for t in batch_inputs)))
                    outputs.append(tuple(p.detach().cpu() for p in prediction))
                    targets.append(batch_targets)
        finally:
            self.model.train(was_training)
        if not outputs:
            raise ValueError(f"split {split!r} of the database is empty; nothing to evaluate")
        return tuple(torch.cat(parts) for parts in zip(*outputs)), tuple(torch.cat(parts) for parts in zip(*targets))

    def evaluate(self, split: str, *, database: Optional["Database"] = None,
                 batch_size: Optional[int] = None) -> Dict[str, float]:
        """Evaluate every loss on ``split``.

        :return: ``{name: float}``.
        """
        predictions, targets = self.predict(split, database=database, batch_size=batch_size)
        with torch.no_grad():
            results = {name: float(fn(*predictions, *targets)) for name, fn in self.evaluation_losses.items()}
            if self.joint is not None:
                results.update(self._joint_results(self.joint(*predictions, *targets)))
        return results

    def _joint_results(self, values):
        if isinstance(values, dict):
            missing = [n for n in self.joint_names if n not in values]
            if missing:
                raise SetupError(f"the one-pass evaluation returned {sorted(values)}, without {missing}")
            return {str(name): float(value) for name, value in values.items()}
        if isinstance(values, torch.Tensor) and values.dim() == 0:
            values = (values,)
        values = list(values)
        if len(values) != len(self.joint_names):
            raise SetupError(f"the one-pass evaluation returned {len(values)} values for the {len(self.joint_names)} "
                             f"names {list(self.joint_names)}; give one name per value (names=[...])")
        return {name: float(value) for name, value in zip(self.joint_names, values)}


def adopt_evaluator(evaluator: Any) -> Evaluator:
    """An experiment_io :class:`Evaluator` for ``evaluator``.

    An experiment_io evaluator is returned as is. hippynn's evaluator (what
    ``hippynn.experiment.assemble_for_training`` returns: a ``model``, a ``loss``
    graph that computes every validation metric in one pass, and their
    ``loss_names``) becomes ``Evaluator(model, loss, names=loss_names)``.

    :raises SetupError: for anything else.
    """
    if isinstance(evaluator, Evaluator):
        return evaluator
    model, joint, names = (getattr(evaluator, a, None) for a in ("model", "loss", "loss_names"))
    if isinstance(model, torch.nn.Module) and callable(joint) and names is not None:
        return Evaluator(model, joint, names=list(names))
    raise SetupError(f"the evaluator must be an experiment_io Evaluator (or hippynn's), not {type(evaluator).__name__}")
