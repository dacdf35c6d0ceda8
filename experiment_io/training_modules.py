"""The model side of an experiment: the model, its training loss and its evaluator."""
import logging
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch

__all__ = ["TrainingModules", "Evaluator", "as_tuple"]

log = logging.getLogger(__name__)


def as_tuple(output):
    """A model's output as a tuple of tensors (a single tensor becomes a 1-tuple)."""
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


class TrainingModules(NamedTuple):
    """The three objects that are trained and judged.

    :ivar model: any :class:`torch.nn.Module`; ``model(*inputs)`` returns a tensor or a
        tuple of tensors.
    :ivar loss: the training loss, called as ``loss(*predictions, *targets)``.
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

    :param model: the model to evaluate.
    :param evaluation_losses: ``{name: loss}``; each loss is called as
        ``loss(*predictions, *targets)`` and returns a scalar.
    :param batch_size: batch size of evaluation when none is given to :meth:`evaluate`.
    """

    def __init__(self, model: torch.nn.Module, evaluation_losses: Dict[str, Callable], *, batch_size: int = 256):
        if not isinstance(evaluation_losses, dict) or not evaluation_losses:
            raise ValueError("evaluation_losses must be a non-empty dict {name: loss}")
        for name, fn in evaluation_losses.items():
            if not isinstance(name, str) or not callable(fn):
                raise TypeError(f"evaluation loss {name!r} must be a callable under a string name")
        self.model = model
        self.evaluation_losses = dict(evaluation_losses)
        self.batch_size = batch_size
        self.database = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["database"] = None  # databases are stored by descriptor, never pickled
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.database = None

    def state_dict(self) -> dict:
        """The state of every evaluation loss that is a module (most have none)."""
        return {name: fn.state_dict() for name, fn in self.evaluation_losses.items() if isinstance(fn, torch.nn.Module)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of the evaluation losses from :meth:`state_dict`'s output."""
        for name, fn_state in state.items():
            if name not in self.evaluation_losses:
                raise KeyError(f"evaluation loss {name!r} is in the state but not in this evaluator")
            self.evaluation_losses[name].load_state_dict(fn_state)

    def predict(self, split: str, *, database=None, batch_size: Optional[int] = None) -> tuple:
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

    def evaluate(self, split: str, *, database=None, batch_size: Optional[int] = None) -> Dict[str, float]:
        """Evaluate every loss on ``split``.

        :return: ``{name: float}``.
        """
        predictions, targets = self.predict(split, database=database, batch_size=batch_size)
        with torch.no_grad():
            return {name: float(fn(*predictions, *targets)) for name, fn in self.evaluation_losses.items()}
