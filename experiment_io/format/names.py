"""Names of classes stored in files: ``"module.QualName"`` turned back into objects, safely.

Structure files and database descriptors refer to classes by import path. A
stored name must not make a load import arbitrary code, so :func:`resolve` uses
modules that are already imported and imports only modules under the roots it
is given (torch, experiment_io, and what the user allowed).
"""
import importlib
import sys
import types
from typing import Any, Collection, Iterable, Optional

__all__ = ["qualified_name", "under", "resolve", "module_of", "current_name", "MOVED_MODULES", "MOVED_NAMES"]

#: Where the library's modules of format versions 1 to 3 (one flat package) live now: a file written then names
#: ``experiment_io.controllers.Controller``, found today at ``experiment_io.experiment.controllers.Controller``.
MOVED_MODULES = {
    "experiment_io.archive": "experiment_io.platform.archive",
    "experiment_io.asynchronous": "experiment_io.training.asynchronous",
    "experiment_io.checkpointing": "experiment_io.training.checkpointing",
    "experiment_io.cli": "experiment_io.frontends.cli",
    "experiment_io.controllers": "experiment_io.experiment.controllers",
    "experiment_io.databases": "experiment_io.experiment.databases",
    "experiment_io.devices": "experiment_io.experiment.devices",
    "experiment_io.distributed": "experiment_io.training.distributed",
    "experiment_io.format": "experiment_io.format.codec",
    "experiment_io.generations": "experiment_io.storage.generations",
    "experiment_io.hippynn_runs": "experiment_io.frontends.hippynn_runs",
    "experiment_io.launch": "experiment_io.experiment.launch",
    "experiment_io.lightning": "experiment_io.frontends.lightning",
    "experiment_io.lineage": "experiment_io.frontends.lineage",
    "experiment_io.lock": "experiment_io.storage.lock",
    "experiment_io.metric_tracker": "experiment_io.experiment.metric_tracker",
    "experiment_io.names": "experiment_io.format.names",
    "experiment_io.ordering": "experiment_io.experiment.ordering",
    "experiment_io.own_loop": "experiment_io.frontends.own_loop",
    "experiment_io.payloads": "experiment_io.run.payloads",
    "experiment_io.plots": "experiment_io.training.plots",
    "experiment_io.policy": "experiment_io.training.policy",
    "experiment_io.preemption": "experiment_io.training.preemption",
    "experiment_io.progress": "experiment_io.training.progress",
    "experiment_io.provenance": "experiment_io.training.provenance",
    "experiment_io.reading": "experiment_io.run.reading",
    "experiment_io.residence": "experiment_io.platform.residence",
    "experiment_io.retention": "experiment_io.training.retention",
    "experiment_io.rng": "experiment_io.experiment.rng",
    "experiment_io.routines": "experiment_io.training.routines",
    "experiment_io.sampler": "experiment_io.experiment.sampler",
    "experiment_io.serialization": "experiment_io.loading.loaders",
    "experiment_io.skeleton": "experiment_io.run.skeleton",
    "experiment_io.storage": "experiment_io.storage.atomic",
    "experiment_io.training": "experiment_io.training.loop",
    "experiment_io.training_modules": "experiment_io.experiment.training_modules",
    "experiment_io.trust": "experiment_io.run.trust",
    "experiment_io.verification": "experiment_io.storage.verification",
}


def qualified_name(obj: Any) -> str:
    """``"module.QualName"`` of a class or function."""
    return f"{obj.__module__}.{obj.__qualname__}"


def under(module_name: str, roots: Iterable[str]) -> bool:
    """Whether ``module_name`` is one of ``roots`` or a submodule of one."""
    return any(module_name == r or module_name.startswith(r + ".") for r in roots)


#: Classes that left the module their old module moved to (a stored ``"module.QualName"`` of format versions 1
#: to 3, and where the class is now).
MOVED_NAMES = {
    f"experiment_io.databases.{name}": f"experiment_io.experiment.restartable.{name}"
    for name in ("Restartable", "NPZDatabase", "HDF5Database", "restore_database")
}

_CURRENT_MODULES = frozenset(MOVED_MODULES.values())


def current_name(name: str) -> str:
    """``name`` (``"module.QualName"``) as it is today: a module of the library that moved (:data:`MOVED_MODULES`)
    replaced by where it is now; any other name as it is."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # a moved class (its methods, nested classes), else a moved module
        if ".".join(parts[:cut]) in MOVED_NAMES:
            return ".".join([MOVED_NAMES[".".join(parts[:cut])], *parts[cut:]])
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in _CURRENT_MODULES:
            return name
        if module in MOVED_MODULES:
            return ".".join([MOVED_MODULES[module], *parts[cut:]])
    return name


def resolve(name: str, importable: Collection[str] = (), exact: Collection[str] = ()) -> tuple[Any, Optional[str]]:
    """Find the object ``name`` (``"module.QualName"``) names.

    :param importable: module names (and their submodules) that may be imported to
        find it; any other module must be imported already.
    :param exact: module names that may be imported themselves (not their submodules).
    :return: ``(object, None)``, or ``(None, why not)``; the reason starts with
        ``"module "`` when the module exists but lacks the name or cannot be imported.
    """
    parts = current_name(name).split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        module = sys.modules.get(module_name)
        if module is None and (under(module_name, importable) or module_name in exact):
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                if cut == 1:
                    return None, f"module {module_name} cannot be imported (it is allowed, but not installed)"
        if module is None:
            continue
        obj = module
        for depth, attr in enumerate(parts[cut:], cut + 1):
            if attr not in getattr(obj, "__dict__", {}) and not hasattr(type(obj), attr):
                if cut < len(parts) - 1:  # maybe a submodule that is not imported: never imported for a file
                    return None, f"its module {'.'.join(parts[:-1])} is not imported"
                return None, f"module {module_name} has no attribute {'.'.join(parts[cut:])} (moved or renamed?)"
            obj = getattr(obj, attr)
            # a module reached by attribute must be the submodule of that name, never one imported under it
            # ("pkg.torch.os"): a path through another module's imports reaches anything
            if isinstance(obj, types.ModuleType) and obj.__name__ != ".".join(parts[:depth]):
                return None, (f"{'.'.join(parts[:depth])} is the module {obj.__name__} imported under another name; "
                              "a stored name never goes through another module's imports")
        return obj, None
    return None, f"its module {module_of(name)} is not imported"


def module_of(name: str) -> str:
    """The module part of a stored ``"module.QualName"``: everything before the first capitalised part, or
    before the last part."""
    parts = name.split(".")
    for i, part in enumerate(parts[1:], 1):
        if part[:1].isupper():
            return ".".join(parts[:i])
    return ".".join(parts[:-1]) or name
