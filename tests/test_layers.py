"""The package's folders are its layers, and a lower layer never imports a higher one.

Every import of the package's own modules is read from the source (also those inside
functions), so that a new module or an import added anywhere is checked.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "experiment_io"

#: The layers, lowest first: a module may import its own layer and those below it.
LAYERS = ["errors", "version", "format", "platform", "storage", "experiment", "run", "training", "loading", "frontends"]
RANK = {"errors": 0, "version": 0, **{name: rank for rank, name in enumerate(LAYERS[1:], 1)}}
#: Files directly under experiment_io/: the package's entry points (and its two public base modules).
ENTRY_POINTS = {"__init__", "__main__", "serialization", "lineage", "lightning"}
TOP = max(RANK.values()) + 1


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts), path


def layer_of(module):
    """The rank of a module ``experiment_io.<layer>[...]``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ENTRY_POINTS:
        return TOP
    return RANK[parts[1]]


def imported(module, path):
    """The package's own modules that ``path`` imports, anywhere in it."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("experiment_io.") or name == "experiment_io":
                yield node.lineno, name


def test_every_layer_is_a_folder_and_the_top_level_holds_only_entry_points():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == ENTRY_POINTS | {"errors", "version"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {"errors", "version"}
    for folder in folders:
        assert (PACKAGE / folder / "__init__.py").exists(), folder


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_a_module_imports_only_its_own_layer_and_those_below(module, path):
    rank = layer_of(module)
    upward = [f"line {line}: {name}" for line, name in imported(module, path)
              if name != "experiment_io" and layer_of(name) > rank]
    assert not upward, f"{module} (layer {rank}) imports a higher layer: {upward}"


def test_package_inits_of_the_layers_import_nothing():
    """A layer's __init__ is its docstring: importing one module of a layer never imports the rest."""
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], init


def test_the_check_sees_an_upward_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from experiment_io.training.loop import train_model\n")
    assert layer_of("experiment_io.storage.m") < max(layer_of(n) for _, n in imported("experiment_io.storage.m", source))


#: The most lines a module of the package may have: one idea per module.
MODULE_LINES = 400


def test_no_module_is_over_the_size_of_one_idea():
    long = {module: n for module, path in modules() if (n := len(path.read_text().splitlines())) > MODULE_LINES}
    assert not long, f"modules over {MODULE_LINES} lines: {long}"


IMPORT_EVERYTHING = """
import atexit, os, signal, sys
calls = []


def recorded(what, real):
    def call(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("experiment_io"):
            calls.append((what, caller))
        return real(*args, **kwargs)
    return call


atexit.register = recorded("atexit.register", atexit.register)
os.register_at_fork = recorded("os.register_at_fork", os.register_at_fork)
handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
import importlib, pkgutil, experiment_io
for info in pkgutil.walk_packages(experiment_io.__path__, "experiment_io."):
    if info.name.endswith(("lightning", "__main__")):
        continue  # an optional integration (it imports Lightning); the command line (it runs)
    importlib.import_module(info.name)
assert {s: signal.getsignal(s) for s in handlers} == handlers, "a signal handler was installed at import"
assert not calls, calls
print(len(sys.modules))
"""


def test_importing_any_module_has_no_effect_on_the_process():
    """No fork hooks, exit hooks or signal handlers are installed by importing the package's modules."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


PUBLIC_EXCEPTIONS = {
    # DDP checks a communication hook's annotations against the real GradBucket class, and the module's
    # annotations are strings
    "experiment_io.training.distributed.ordered_mean_hook",
}


def _public_callables():
    import importlib
    import inspect

    for module_name, _ in modules():
        if module_name.endswith("lightning") or module_name.endswith("__main__"):
            continue
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{module_name}.{name}", obj
            elif inspect.isclass(obj):
                for attribute, member in vars(obj).items():
                    if inspect.isfunction(member) and (not attribute.startswith("_") or attribute == "__init__"):
                        yield f"{module_name}.{name}.{attribute}", member


def test_every_public_function_and_method_is_annotated():
    import inspect

    missing = []
    for qualified, function in _public_callables():
        if qualified in PUBLIC_EXCEPTIONS:
            continue
        signature = inspect.signature(function)
        parameters = [p for i, p in enumerate(signature.parameters.values())
                      if not (i == 0 and p.name in ("self", "cls"))]
        unannotated = [p.name for p in parameters if p.annotation is inspect.Parameter.empty]
        if unannotated or ("return" not in function.__annotations__ and function.__name__ != "__init__"):
            missing.append(f"{qualified}({', '.join(unannotated)})")
    assert not missing, f"{len(missing)} public functions without annotations: {missing}"
