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
