"""Names of classes stored in files: ``"module.QualName"`` turned back into objects, safely.

Structure files and database descriptors refer to classes by import path. A
stored name must not make a load import arbitrary code, so :func:`resolve` uses
modules that are already imported and imports only modules under the roots it
is given (torch, experiment_io, and what the user allowed).
"""
import importlib
import sys
import types

__all__ = ["qualified_name", "under", "resolve", "module_of"]


def qualified_name(obj) -> str:
    """``"module.QualName"`` of a class or function."""
    return f"{obj.__module__}.{obj.__qualname__}"


def under(module_name: str, roots) -> bool:
    """Whether ``module_name`` is one of ``roots`` or a submodule of one."""
    return any(module_name == r or module_name.startswith(r + ".") for r in roots)


def resolve(name: str, importable=(), exact=()):
    """Find the object ``name`` (``"module.QualName"``) names.

    :param importable: module names (and their submodules) that may be imported to
        find it; any other module must be imported already.
    :param exact: module names that may be imported themselves (not their submodules).
    :return: ``(object, None)``, or ``(None, why not)``; the reason starts with
        ``"module "`` when the module exists but lacks the name or cannot be imported.
    """
    parts = name.split(".")
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
