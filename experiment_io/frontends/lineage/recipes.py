"""Recipes: the components of a model (loss, optimizer, schedulers) as class names and plain arguments.

A checkpoint stores how its components are built, never the objects: a
:class:`Recipe` names each component's class (``module.QualName``) and its
arguments (plain data), so that a re-run compares them and a rollback builds the
components anew. A class is found among those given to ``setup()`` in this
session, else by its name among torch's and the modules already imported; a name
never imports a module.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import types
import warnings
from typing import Any, Iterator, Mapping, Optional

import torch

from experiment_io.errors import SetupError, StructureClassError
from experiment_io.format.names import qualified_name, resolve

__all__ = ["COMPONENTS", "FAMILY", "Recipe", "Classes", "plain", "check_class", "build_components", "carry_count",
           "quiet_scheduler"]

#: The components of a model besides its module, in the order they are built.
COMPONENTS = ("loss", "optimizer", "epoch_scheduler", "step_scheduler")

_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
#: The classes each component's class must derive from.
FAMILY: Mapping[str, tuple[type, ...]] = types.MappingProxyType({
    "loss": (torch.nn.Module,),
    "optimizer": (torch.optim.Optimizer,),
    "epoch_scheduler": _SCHEDULERS,
    "step_scheduler": _SCHEDULERS,
})


def _family(component):
    return " or ".join(f.__name__ for f in FAMILY[component])


class Recipe(dict):
    """``{component: {"cls": "module.QualName", "args": {...}} or None}`` for each of :data:`COMPONENTS`."""

    @classmethod
    def of(cls, entries: Mapping[str, Any]) -> "Recipe":
        """A recipe with a copy of ``entries``' component entries (a missing one is ``None``)."""
        return cls({c: copy.deepcopy(entries.get(c)) for c in COMPONENTS})

    def describe(self, component: str) -> str:
        """The component as it is built, in words: ``Adam(lr=0.01)`` or ``none``."""
        entry = self.get(component)
        if entry is None:
            return "none"
        args = ", ".join(f"{k}={v!r}" for k, v in entry["args"].items())
        return f"{entry['cls'].rsplit('.', 1)[-1]}({args})"


def plain(value: Any, where: str) -> Any:
    """``value`` as plain data (tuples become lists), or a SetupError naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain(v, where) for k, v in value.items()}
    raise SetupError(f"{where} must be plain data (numbers, strings, lists, dicts), not {value!r}: the recipe "
                     "of a checkpoint is stored and compared when the notebook is re-run")


def _needs_closure(cls):
    try:
        parameter = inspect.signature(cls.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def check_class(component: str, cls: Any) -> None:
    """Check that ``cls``, given to ``setup()`` for ``component``, is one a block can train with.

    :raises SetupError: for a class of another family, a ``ReduceLROnPlateau`` as the step scheduler, or an
        optimizer that needs a closure.
    """
    if not isinstance(cls, type) or not issubclass(cls, FAMILY[component]):
        raise SetupError(f"{component}_cls must be a class of {_family(component)}, not {cls!r}")
    if component == "step_scheduler" and issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise SetupError("ReduceLROnPlateau steps on a metric once per epoch: give it as epoch_scheduler_cls")
    if component == "optimizer" and _needs_closure(cls):
        raise SetupError(f"{cls.__name__} needs a closure at each step (as LBFGS does), which train() does not "
                         "give; choose an optimizer whose step() takes no argument")


class Classes:
    """The classes a model's recipes name: those given to ``setup()`` in this session, else found by name."""

    def __init__(self) -> None:
        self._given: dict[str, type] = {}

    def remember(self, cls: type) -> str:
        """Keep ``cls`` (given to ``setup()``) for the recipes that name it; return its name."""
        name = qualified_name(cls)
        self._given[name] = cls
        return name

    def find(self, component: str, name: str, where: str) -> type:
        """The class ``name`` of ``component``.

        :raises StructureClassError: when it cannot be found, or is not of the component's family.
        """
        cls = self._given.get(name)
        if cls is None:
            cls, why = resolve(name, importable=("torch",))
            if cls is None:
                raise StructureClassError(
                    f"{where} was set up with {name}, which cannot be found ({why}). Import the module that defines "
                    "it, or run the block's setup() with the class, before loading the checkpoint.")
        if not isinstance(cls, type) or not issubclass(cls, FAMILY[component]):
            raise StructureClassError(f"{where}: {name} is not a {_family(component)}")
        return cls


def build_components(recipe: Recipe, classes: Classes, module: torch.nn.Module,
                     optimizer: Optional[torch.optim.Optimizer], where: str, keep: frozenset = frozenset()
                     ) -> dict[str, Any]:
    """The components of ``recipe`` built anew, but those in ``keep``.

    :param module: the model whose parameters an optimizer gets.
    :param optimizer: the optimizer a scheduler gets when the optimizer is kept.
    :return: ``{component: the object or None}`` for each component built.
    :raises SetupError: when a component cannot be built from its arguments, or a scheduler has no optimizer.
    """
    built: dict[str, Any] = {}
    for component in COMPONENTS:
        if component in keep:
            continue
        entry = recipe.get(component)
        if entry is None:
            built[component] = None
            continue
        cls = classes.find(component, entry["cls"], where)
        args = entry["args"]
        try:
            if component == "loss":
                built[component] = cls(**args)
            elif component == "optimizer":
                built[component] = cls(module.parameters(), **args)
            else:
                scheduled = built.get("optimizer", optimizer)
                if scheduled is None:
                    raise SetupError(f"{where}: a {component.replace('_', ' ')} needs an optimizer; set one up too")
                built[component] = cls(scheduled, **args)
        except (TypeError, ValueError) as e:
            raise SetupError(f"{where}: {recipe.describe(component)} could not be built: {e}") from e
    return built


def carry_count(old: Any, new: Any) -> None:
    """A scheduler rebuilt on a new optimizer continues the count of steps of the one it replaces: it is stepped
    as many times, so that the learning rate is the schedule's at that count, from the new optimizer's rate."""
    if isinstance(new, torch.optim.lr_scheduler.ReduceLROnPlateau):
        for field in ("num_bad_epochs", "best", "cooldown_counter", "last_epoch"):
            if hasattr(old, field):
                setattr(new, field, getattr(old, field))
        return
    with quiet_scheduler():
        for _ in range(max(getattr(old, "last_epoch", 0) - getattr(new, "last_epoch", 0), 0)):
            new.step()


@contextlib.contextmanager
def quiet_scheduler() -> Iterator[None]:
    """Without torch's warning about a scheduler stepped before its optimizer (a resume or a carried count
    steps a scheduler first, on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        yield
