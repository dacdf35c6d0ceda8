r"""The trust gate: what a structure file may construct when it is loaded.

A structure file is a pickle of whole objects, and unpickling can run code. The
gate reads the file's globals without running anything
(:func:`torch.serialization.get_unsafe_globals_in_checkpoint`) and admits a global
only when it is the class or function defined at the name the file gives (never
an object reached through another module's imports, such as ``pkg.torch.os.system``)
and it is

* a class of a known family: :class:`torch.nn.Module`, :class:`torch.optim.Optimizer`,
  LR schedulers, experiment_io's own structure classes, plain containers, or a class
  registered with :func:`register_safe_classes`, from a module that is torch,
  experiment_io, already imported, or named by the user in ``allow``;
* or a tensor math function (``safe_functions()``: ``torch.nn.functional``,
  elementwise ``torch`` functions, float ``math``, arithmetic ``operator``\ s),
  never one that reads or writes files, imports, runs code or reaches attributes by
  name;
* or any class or function defined in a module or package named in ``allow``.

Globals named exactly in ``allow`` (by object or by ``"module.Name"``) are admitted
whatever they are. Admitting a name does not let the file call it: what the pickle
would call, make and restore is decided by :mod:`experiment_io.run.calls` before
anything runs. A package named in ``allow`` is imported, its submodules only where it
imports them itself. Everything else is refused with an
:class:`~experiment_io.errors.UnsafeCheckpointError` that lists each offending
global. The file is then loaded with ``torch.load(weights_only=True)`` and the
admitted classes; ``trusted=True`` skips the gate for one call and loads with
full pickle. Refusing never imports a module the user did not allow.
"""
import collections
import logging
import os
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from experiment_io.experiment.controllers import Controller
from experiment_io.errors import NotACheckpointError, StructureClassError, UnsafeCheckpointError
from experiment_io.format.names import module_of, qualified_name, resolve, under
from experiment_io.storage.verification import check_archive
from experiment_io.run.calls import CallRefused, check_calls
from experiment_io.run.pickles import pickle_of, torch_rebuilders
from experiment_io.experiment.training_modules import Evaluator, TrainingModules

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
_registered: set[type] = set()

#: Elementwise and reducing tensor math of ``torch`` that a model may keep as an attribute
#: (``self.act = torch.tanh``).
_TORCH_MATH = """abs absolute acos acosh add addcdiv addcmul amax amin angle asin asinh atan atan2 atanh bmm cat ceil
clamp clamp_max clamp_min clip cos cosh cross cummax cummin cumprod cumsum deg2rad diag diagonal diff div divide dot
einsum erf erfc erfinv exp exp2 expm1 flatten flip floor floor_divide fmax fmin fmod frac hypot i0 kron lerp lgamma log
log10 log1p log2 log_softmax logaddexp logaddexp2 logcumsumexp logit logsumexp matmul max maximum mean median min
minimum mm mul multiply mv nan_to_num nanmean nansum narrow neg negative norm outer permute polygamma pow prod rad2deg
reciprocal relu remainder reshape roll round rsqrt selu sigmoid sign sin sinc sinh softmax sqrt square squeeze stack std
sub subtract sum t tan tanh tensordot transpose tril triu true_divide trunc unsqueeze var where xlogy""".split()

#: Arithmetic and comparison of :mod:`operator` (never attrgetter, itemgetter, methodcaller, call or setters,
#: nor mul and lshift, which a file could call to build a huge object: ``mul(b"x", 10**12)``).
_OPERATORS = """abs add and_ eq floordiv ge gt inv invert le lt matmul ne neg not_ or_ pos pow rshift sub
truediv truth xor""".split()

#: The float functions of :mod:`math` (never factorial, comb, perm, prod or isqrt, which run for as long as a
#: file's integer asks).
_MATH = """acos acosh asin asinh atan atan2 atanh cbrt ceil copysign cos cosh degrees dist erf erfc exp exp2 expm1
fabs floor fmod frexp fsum gamma hypot isclose isfinite isinf isnan ldexp lgamma log log10 log1p log2 modf pow
radians remainder sin sinh sqrt tan tanh trunc""".split()

_safe_functions = None


def safe_functions() -> dict[int, Callable[..., Any]]:
    """The functions the gate admits by default, by identity: tensor math that cannot reach files, imports or code.

    Every public function of :mod:`torch.nn.functional` that computes on tensors, the
    elementwise and reducing math of ``torch`` listed in ``_TORCH_MATH``, the float
    functions of :mod:`math` and the arithmetic and comparisons of :mod:`operator`
    listed in ``_MATH`` and ``_OPERATORS``. ``operator.pow`` (hippynn's ``x ** y``) is
    among them: a file could make it compute a huge integer power (a load that hangs,
    never one that runs code).
    """
    global _safe_functions
    if _safe_functions is None:
        import math
        import operator

        functional = torch.nn.functional
        found = [v for n, v in vars(functional).items()
                 if not n.startswith("_") and callable(v) and not isinstance(v, type)
                 and getattr(v, "__module__", None) in ("torch.nn.functional", "torch", "torch._C._nn")]
        found += [getattr(torch, n) for n in _TORCH_MATH if hasattr(torch, n)]
        found += [getattr(math, n) for n in _MATH if hasattr(math, n)]
        found += [getattr(operator, n) for n in _OPERATORS]
        _safe_functions = {id(f): f for f in found}
    return _safe_functions


def register_safe_classes(*classes: type) -> None:
    """Admit further classes in every structure file (for library authors).

    Use it for classes that are neither modules, optimizers nor schedulers but that
    your library puts into the objects it trains, e.g. a custom controller.

    :param classes: classes (functions are refused).
    :raises TypeError: for anything that is not a class.
    """
    for cls in classes:
        if not isinstance(cls, type):
            raise TypeError(f"register_safe_classes takes classes only, not {cls!r}; pass a function through "
                            "allow=[...] per load")
        _registered.add(cls)


def _main_stand_ins(allow):
    """Classes and functions passed in ``allow``, by the name they would have had in the training script.

    A class defined in the script that trained (a notebook, a one-file script) is stored
    as ``__main__.Name``; the class itself, handed to a loader, stands for that name."""
    return {f"__main__.{a.__qualname__}": a for a in allow if not isinstance(a, str) and hasattr(a, "__qualname__")}


class _Refusal:
    """What the gate refused: the names, why, and the message that says how to load anyway."""

    def __init__(self, refused, missing, source, packages=()):
        self.refused, self.missing, self.source, self.packages = refused, missing, source, packages

    def __bool__(self):
        return bool(self.refused or self.missing)

    def error(self, only=None):
        """The error to raise (for ``only`` these names, when given)."""
        refused = [(n, why) for n, why in self.refused if only is None or n in only]
        missing = [(n, why) for n, why in self.missing if only is None or n in only]
        if refused:
            return UnsafeCheckpointError(_refused_message(refused, self.source, self.packages))
        lines = "\n".join(f"  - {n}: {why}" for n, why in missing)
        fixes = []
        if any(n.startswith("__main__.") for n, _ in missing):
            local = [n.split(".", 1)[1] for n, _ in missing if n.startswith("__main__.")]
            fixes.append(f"{', '.join(local)} was defined in the script that trained (its __main__ module), which "
                         "no other script can import. Move the definition into a module that both scripts import, or "
                         f"hand the class itself to the load function: allow=[{', '.join(local)}]")
        if any(not n.startswith("__main__.") for n, _ in missing):
            fixes.append("Install or restore the code that defines them (or import it under its old name) before "
                         "loading, or hand the class itself to the load function: allow=[TheClass]")
        return StructureClassError(f"{self.source} names classes that cannot be found:\n{lines}\n"
                                   + "\n".join(fixes) + ".")


def _refused_message(refused, source, packages=()):
    lines = "\n".join(f"  - {n}: {why}" for n, why in refused)
    modules = sorted({module_of(n) for n, why in refused if "is not imported" in why})
    fixes = []
    submodules = [m for m in modules if under(m, packages) and m not in packages]
    if submodules:
        fixes.append(f"name the module{'s' if len(submodules) > 1 else ''} in allow: "
                     f"allow=[{', '.join(repr(m) for m in submodules)}] (a package named in allow is imported, and "
                     "its submodules only where it imports them itself: a file never makes a load import a module "
                     "you did not name)")
    if modules:
        fixes.append(f"import {', '.join(modules)} (the module{'s' if len(modules) > 1 else ''} that define"
                     f"{'' if len(modules) > 1 else 's'} them) in your script before loading: a module, optimizer or "
                     "scheduler class of an imported module is admitted (a function, or a class of another kind, "
                     "must still be named in allow=[...])")
    fixes.append(f"if you trust them, pass allow=[{', '.join(repr(n) for n, _ in refused)}] to the load function "
                 "(their modules are then imported)")
    fixes.append("if you wrote this file yourself, pass trusted=True to load it with full pickle")
    ways = "\n".join(f"  - {fix}" for fix in fixes)
    return (f"{source} refers to {len(refused)} global(s) that the trust gate does not admit:\n{lines}\n"
            f"To load it, either:\n{ways}")


def _defined_at(obj, name):
    """Whether ``obj`` is the class or function defined at ``name`` (what pickle writes for it), not an object
    reached through another module's imports or attributes."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return isinstance(module, str) and isinstance(qualname, str) and f"{module}.{qualname}" == name


def _where(obj):
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else f"a {type(obj).__name__}"


def _judge(global_names, allow, source):
    """``(admitted, refusal)``: see :func:`admitted_globals`."""
    allowed_objects = {qualified_name(a): a for a in allow if not isinstance(a, str)}
    allowed_objects = {**_main_stand_ins(allow), **allowed_objects}
    allowed_names = {a for a in allow if isinstance(a, str)}
    # a module is imported for a file only when the user named it: a package named in allow ("mynets") is
    # imported, and its submodules only if it imports them itself; a name allowed exactly ("mynets.MLP") lets
    # its module be imported ("mynets"); any other module must be imported already
    exact = set(allowed_names) | {".".join(a.split(".")[:i]) for a in allowed_names for i in range(1, a.count(".") + 1)}
    admitted, refused, missing = [], [], []
    for name in sorted(global_names):
        if name in allowed_objects:
            admitted.append((allowed_objects[name], name))
            continue
        obj, why = resolve(name, (), exact)
        if obj is None:
            (missing if why.startswith("module ") else refused).append((name, why))
            continue
        if name in allowed_names:
            admitted.append((obj, name))  # named exactly by the user
        elif safe_functions().get(id(obj)) is obj:
            admitted.append((obj, name))  # tensor math, whatever name reached it
        elif isinstance(obj, type) and (obj in _CONTAINERS or obj in _registered or issubclass(obj, _FAMILIES)):
            admitted.append((obj, name))  # a class of a known family, whatever name reached it
        elif under(module_of(name), allowed_names) and not _defined_at(obj, name):
            refused.append((name, f"it names {_where(obj)}, which is not defined at that name (a stored class or "
                                  "function is named where it is defined)"))
        elif under(module_of(name), allowed_names):
            admitted.append((obj, name))  # defined in a module or package the user named
        elif not isinstance(obj, type):
            if safe_functions().get(id(obj)) is obj:
                admitted.append((obj, name))
            else:
                refused.append((name, f"it is a {type(obj).__name__}, not a class, and not one of the tensor math "
                                      "functions admitted by default"))
        elif obj in _CONTAINERS or obj in _registered or issubclass(obj, _FAMILIES):
            admitted.append((obj, name))
        else:
            refused.append((name, "it is a class outside the admitted families (modules, optimizers, schedulers, "
                                  "experiment_io classes, containers)"))
    return admitted, _Refusal(refused, missing, source, tuple(sorted(allowed_names)))


def admitted_globals(global_names: Iterable[str], *, allow: Sequence[Any] = (),
                     source: str = "the structure file") -> list[tuple[Any, str]]:
    """Decide which globals of a structure file to admit.

    :param global_names: globals the file refers to (as ``"module.Name"``).
    :param allow: objects or names the user trusts: a class or function object, an
        exact ``"module.Name"`` (whose module may then be imported), or a module or
        package name, whose classes and functions (defined there) are admitted and
        which may then be imported (not its submodules: those it does not import itself must be
        named). A class or function passed as an object also stands for the name it had in a
        training script (``"__main__.Name"``).
    :param source: the file, for error messages.
    :return: ``[(object, name)]`` to hand to :func:`torch.serialization.safe_globals`.
    :raises UnsafeCheckpointError: naming every refused global and each way to load anyway.
    :raises StructureClassError: when an admissible module lacks the named class.
    """
    admitted, refusal = _judge(global_names, allow, source)
    if refusal:
        raise refusal.error()
    return admitted


def _check_calls(source, path, entries, allow, refused, refusal):
    """Refuse a file whose pickle asks for calls the gate does not admit (see :mod:`experiment_io.run.calls`)."""
    allowed_names = {a for a in allow if isinstance(a, str)}
    trusted = frozenset({n for _, n in entries if n in allowed_names}
                        | {n for a in allow if not isinstance(a, str) for n in (qualified_name(a),)}
                        | set(_main_stand_ins(allow)))
    try:
        check_calls(pickle_of(source), {n: obj for obj, n in entries}, trusted=trusted,
                    trusted_packages=tuple(sorted(allowed_names)), refused=frozenset(refused),
                    torch_rebuilders=torch_rebuilders())
    except CallRefused as e:
        if e.name in refused:
            raise refusal.error(only={e.name}) from None
        raise UnsafeCheckpointError(f"{path}: {e}. Loading it with trusted=True would run what it asks for; do "
                                    "that only for a file you wrote yourself.") from None


class _Absent:
    """Stands, in a prediction's load, for a global of the training set-up that the gate refused.

    An instance keeps nothing and does nothing; if the model refers to one, the load
    raises the gate's error instead of returning the model."""

    stored_name = None
    #: whether the file called it with arguments (a function call, never a plain object): always refused
    called = False

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            cls.called = True
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<not loaded: {self.stored_name}>"


def _stand_in(name):
    return type(name.rsplit(".", 1)[-1], (_Absent,), {"stored_name": name})


def _absent_names(root):
    """The stored names of every stand-in that ``root`` refers to (through attributes and containers)."""
    found, seen, stack = set(), set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(obj))
        if isinstance(obj, type):
            if issubclass(obj, _Absent):
                found.add(obj.stored_name)
            continue
        if isinstance(obj, _Absent):
            found.add(obj.stored_name)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            stack.extend(obj)
        else:
            stack.append(type(obj))
            stack.extend(getattr(obj, "__dict__", {}).values())
    return found


def load_structure(path: Union[str, os.PathLike], *, allow: Sequence[Any] = (), trusted: bool = False,
                   digest: Any = None, read_from: Optional[str] = None, model_only: bool = False) -> Any:
    """Load a structure file through the trust gate, with every tensor on the CPU.

    :param path: the structure file (already verified against its digest).
    :param allow: see :func:`admitted_globals`.
    :param trusted: load with full pickle, skipping the gate (logged).
    :param digest: the file's digest, for the log.
    :param read_from: where to read the file's bytes (a verified descriptor's path; default: ``path``).
    :param model_only: only the model will be used (a prediction): globals of the rest of
        the training set-up (a custom optimizer, function metrics) that the gate refuses
        are unpickled as inert stand-ins, and the gate's error is raised only when the
        model itself refers to one.
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
        raise NotACheckpointError(f"{path} is not a structure file of experiment_io (unreadable torch.save archive: "
                                  f"{e!r})") from e
    entries, refusal = _judge(names, allow, str(path))
    if refusal and not model_only:
        raise refusal.error()
    stand_ins = [(_stand_in(n), n) for n, _ in refusal.refused + refusal.missing]
    _check_calls(source, path, entries, allow, {n for _, n in stand_ins}, refusal)
    with torch.serialization.safe_globals(entries + stand_ins):
        try:
            payload = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler raises many types for malformed input
            if refusal:
                raise refusal.error() from e
            raise NotACheckpointError(f"{path} could not be unpickled as a structure file: {e}") from e
    if any(cls.called for cls, _ in stand_ins):
        raise refusal.error(only={n for cls, n in stand_ins if cls.called})
    if stand_ins:
        model = getattr(payload.get("training_modules"), "model", None) if isinstance(payload, dict) else None
        needed = _absent_names(model) if model is not None else {n for _, n in stand_ins}
        if needed:
            raise refusal.error(only=needed)
        log.info("%s: the model needs none of %s (not loaded)", path, ", ".join(n for _, n in stand_ins))
    return payload
