"""The trust gate: what a structure file may construct when it is loaded.

A structure file is a pickle of whole objects, and unpickling can run code. The
gate reads the file's globals without running anything
(:func:`torch.serialization.get_unsafe_globals_in_checkpoint`) and admits a global
only when it is

* a class (never a function),
* of a known family: :class:`torch.nn.Module`, :class:`torch.optim.Optimizer`, LR
  schedulers, experiment_io's own structure classes, plain containers, or a class
  registered with :func:`register_safe_classes`,
* from a module that is torch, experiment_io, already imported, or named by the
  user in ``allow``.

Globals named exactly in ``allow`` (by object or by ``"module.Name"``) are admitted
whatever they are. Everything else is refused with an
:class:`~experiment_io.errors.UnsafeCheckpointError` that lists each offending
global. The file is then loaded with ``torch.load(weights_only=True)`` and the
admitted classes; ``trusted=True`` skips the gate for one call and loads with
full pickle. Refusing never imports a module the user did not allow.
"""
import collections
import logging

import torch

from .controllers import Controller
from .errors import NotACheckpointError, StructureClassError, UnsafeCheckpointError
from .names import qualified_name, resolve
from .verification import check_archive
from .training_modules import Evaluator, TrainingModules

__all__ = ["register_safe_classes", "admitted_globals", "load_structure"]

log = logging.getLogger(__name__)

_FAMILIES = (
    torch.nn.Module,
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LRScheduler,
    torch.optim.lr_scheduler.ReduceLROnPlateau,
    Controller,
    Evaluator,
    TrainingModules,
)
_CONTAINERS = frozenset({dict, list, tuple, set, frozenset, collections.OrderedDict, collections.defaultdict,
                         collections.Counter, collections.deque})
_IMPORTABLE_ROOTS = ()  # nothing is imported for a file but what the user allows
_registered = set()


def register_safe_classes(*classes: type) -> None:
    """Admit further classes in every structure file (for library authors).

    Use it for classes that are neither modules, optimizers nor schedulers but that
    your library puts into the objects it trains, e.g. a custom controller.

    :param classes: classes (functions are refused).
    :raises TypeError: for anything that is not a class.
    """
    for cls in classes:
        if not isinstance(cls, type):
            raise TypeError(f"register_safe_classes takes classes only, not {cls!r}; pass a function through allow=[...] per load")
        _registered.add(cls)


def admitted_globals(global_names, *, allow=(), source="the structure file"):
    """Decide which globals of a structure file to admit.

    :param global_names: globals the file refers to (as ``"module.Name"``).
    :param allow: objects or names the user trusts: a class or function object, an
        exact ``"module.Name"``, or a module name whose family classes are admitted
        (and which may then be imported).
    :param source: the file, for error messages.
    :return: ``[(object, name)]`` to hand to :func:`torch.serialization.safe_globals`.
    :raises UnsafeCheckpointError: naming every refused global.
    :raises StructureClassError: when an admissible module lacks the named class.
    """
    allowed_objects = {qualified_name(a): a for a in allow if not isinstance(a, str)}
    allowed_names = {a for a in allow if isinstance(a, str)}
    importable = _IMPORTABLE_ROOTS + tuple(allowed_names)
    admitted, refused, missing = [], [], []
    for name in sorted(global_names):
        if name in allowed_objects:
            admitted.append((allowed_objects[name], name))
            continue
        obj, why = resolve(name, importable)
        if obj is None:
            (missing if why.startswith("module ") else refused).append((name, why))
            continue
        if name in allowed_names:
            admitted.append((obj, name))
        elif not isinstance(obj, type):
            refused.append((name, f"it is a {type(obj).__name__}, not a class"))
        elif obj in _CONTAINERS or obj in _registered or issubclass(obj, _FAMILIES):
            admitted.append((obj, name))
        else:
            refused.append((name, "it is a class outside the admitted families (modules, optimizers, schedulers, experiment_io classes, containers)"))
    if refused:
        lines = "\n".join(f"  - {n}: {why}" for n, why in refused)
        raise UnsafeCheckpointError(
            f"{source} refers to {len(refused)} global(s) that the trust gate does not admit:\n{lines}\n"
            f"If you trust them, pass allow=[{', '.join(repr(n) for n, _ in refused)}] to the load function; "
            "if you wrote this file yourself, pass trusted=True to load it with full pickle."
        )
    if missing:
        lines = "\n".join(f"  - {n}: {why}" for n, why in missing)
        raise StructureClassError(
            f"{source} names classes that cannot be found:\n{lines}\n"
            "Install or restore the code that defines them (or import it under its old name) before loading."
        )
    return admitted


def load_structure(path, *, allow=(), trusted=False, digest=None, read_from=None):
    """Load a structure file through the trust gate, with every tensor on the CPU.

    :param path: the structure file (already verified against its digest).
    :param allow: see :func:`admitted_globals`.
    :param trusted: load with full pickle, skipping the gate (logged).
    :param digest: the file's digest, for the log.
    :param read_from: where to read the file's bytes (a verified descriptor's path; default: ``path``).
    :return: the unpickled payload.
    """
    source = read_from or path
    check_archive(source)
    if trusted:
        log.warning("loading %s (digest %s) with full pickle because trusted=True was given", path, digest)
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception as e:  # a damaged archive or pickle raises many types here
        raise NotACheckpointError(f"{path} is not a structure file of experiment_io (unreadable torch.save archive: {e!r})") from e
    entries = admitted_globals(names, allow=allow, source=str(path))
    with torch.serialization.safe_globals(entries):
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler raises many types for malformed input
            raise NotACheckpointError(f"{path} could not be unpickled as a structure file: {e}") from e
