"""No code runs from a file unless the user says so.

Malicious structure files are placed in a real run directory, with the manifest
rewritten to match (an attacker who can write the directory can do that too), so
that only the trust gate stands between the file and the payload.
"""
import builtins
import importlib
import io
import operator
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import experiment_io.run.trust as trust
from experiment_io.storage import atomic as storage
from experiment_io.run.payloads import STRUCTURE_NAME
from experiment_io.errors import ExperimentIOError, StructureClassError, UnsafeCheckpointError
from experiment_io.format.codec import HEADER_KEY, make_header
from experiment_io.loading.loaders import load_checkpoint, load_checkpoint_from_cwd, load_model_from_cwd

from helpers import rewrite_manifest, make_database, record_torch_loads, train_tiny_run


class Gadget:
    """An object whose unpickling calls ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class CallGadget(Gadget):
    """A gadget whose result is then called (pickle checks only that the object is callable when writing)."""

    def __call__(self, *args):
        raise AssertionError("never called while writing")


class TouchingModule(torch.nn.Module):
    """A module of an imported module (admitted by its family) whose constructor has an effect: a file must not
    be able to run it."""

    def __init__(self, path, *size):
        super().__init__()
        open(path, "w").close()
        self.big = torch.nn.Parameter(torch.empty(*size)) if size else None


class Doubling:
    """``operator.add(x, x)`` on the previous level: memoised, a file of a few hundred bytes doubles a string
    ``levels`` times."""

    def __init__(self, levels):
        self.below = Doubling(levels - 1) if levels > 1 else "ab"

    def __reduce__(self):
        return operator.add, (self.below, self.below)


def payloads(canary):
    touch = f"open({str(canary)!r}, 'w').close()"
    return {
        # the constructor of a class the gate admits by its family (pickle REDUCE calls the class)
        "module constructor": Gadget(TouchingModule, str(canary)),
        "torch.nn.Linear(20000, 20000)": [Gadget(torch.nn.Linear, 20000, 20000), Gadget(TouchingModule, str(canary))],
        "optimizer constructor": [Gadget(torch.optim.SGD, [torch.zeros(1)], 0.1), Gadget(TouchingModule, str(canary))],
        # an admitted function called on itself until memory runs out
        "operator.add doubling": [Doubling(28), Gadget(TouchingModule, str(canary))],
        "torch.tanh called": [Gadget(torch.tanh, torch.zeros(2)), Gadget(TouchingModule, str(canary))],
        # torch's own rebuilder of bytes asked to allocate
        "bytearray(10**12)": [Gadget(bytearray, 10**12), Gadget(TouchingModule, str(canary))],
        "os.system": Gadget(os.system, f"touch {canary}"),
        "eval": Gadget(eval, touch),
        "builtins.exec": Gadget(builtins.exec, touch),
        "subprocess.call": Gadget(subprocess.call, ["touch", str(canary)]),
        "subprocess.Popen": Gadget(subprocess.Popen, ["touch", str(canary)]),
        "importlib": Gadget(importlib.import_module, "this"),
        "nested reduce gadget": Gadget(getattr, Gadget(importlib.import_module, "os"), "system"),
        # functions next to those admitted by default (tensor math), which must stay refused
        "torch.save": Gadget(torch.save, {"x": 1}, str(canary)),
        "torch.load": Gadget(torch.load, str(canary)),
        "torch.from_file": Gadget(torch.from_file, str(canary), True, 8),
        "io.open": Gadget(io.open, str(canary), "w"),
        "getattr of torch": Gadget(CallGadget(getattr, torch._C._VariableFunctionsClass, "from_file"), str(canary), True, 8),
        "operator.call": Gadget(operator.call, CallGadget(getattr, torch._C._VariableFunctionsClass, "from_file"),
                                str(canary), True, 8),
        "operator.methodcaller": Gadget(CallGadget(operator.methodcaller, "from_file", str(canary), True, 8),
                                        torch._C._VariableFunctionsClass),
        "operator.attrgetter": Gadget(CallGadget(operator.attrgetter, "from_file"), torch._C._VariableFunctionsClass),
        "handle_torch_function": Gadget(torch.nn.functional.handle_torch_function, torch.save, (),
                                        {"x": 1}, str(canary)),
    }


def plant_structure(directory, obj):
    """Replace the run's structure file by ``obj`` and make the manifest vouch for it."""
    path = os.path.join(directory, STRUCTURE_NAME)
    payload = {HEADER_KEY: make_header("structure"), "training_modules": obj, "controller": None, "database": None}
    record = storage.atomic_write(path, lambda f: torch.save(payload, f))
    def vouch(files):
        old = files[STRUCTURE_NAME]["digest"]
        files[STRUCTURE_NAME].update(record.as_dict())
        for entry in files.values():
            if entry.get("structure_digest") == old:
                entry["structure_digest"] = record.digest

    rewrite_manifest(directory, vouch)
    return path


@pytest.fixture(scope="module")
def run_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    train_tiny_run(directory, max_epochs=1)
    return directory


@pytest.mark.parametrize("kind", sorted(payloads("x")))
def test_malicious_structure_is_refused_by_every_loader(run_directory, tmp_path, kind, environment):
    canary = tmp_path / "CANARY"
    directory = tmp_path / "run"
    directory.mkdir()
    for name in os.listdir(run_directory):
        if (run_directory / name).is_file():  # not plots/
            (directory / name).write_bytes((run_directory / name).read_bytes())
    path = plant_structure(str(directory), payloads(canary)[kind])
    loaders = [
        lambda: load_checkpoint_from_cwd(directory=str(directory), database=make_database()),
        lambda: load_model_from_cwd(directory=str(directory)),
        lambda: load_checkpoint(path, str(directory / "last_checkpoint.pt"), verify=False),
        lambda: trust.load_structure(path),
    ]
    for load in loaders:
        with pytest.raises(UnsafeCheckpointError) as excinfo:
            load()
        message = str(excinfo.value)
        assert "trusted=True" in message
        assert "allow=" in message or kind.startswith("bytearray")  # no allow makes an allocation of 1 TB safe
        assert not canary.exists(), f"the {kind} payload ran"


@pytest.mark.slow
def test_refusal_names_every_offending_global(tmp_path):
    path = str(tmp_path / "s.pt")
    torch.save({"a": Gadget(os.system, "true"), "b": Gadget(eval, "1"), "c": Gadget(subprocess.Popen, ["true"])}, path)
    with pytest.raises(UnsafeCheckpointError) as excinfo:
        trust.load_structure(path)
    for name in (os.system.__module__ + ".system", "builtins.eval", ".Popen"):
        assert name in str(excinfo.value)


@pytest.mark.slow
def test_class_from_a_module_not_allowed_is_refused_without_importing_it(tmp_path):
    """The module's import would create the canary; the refusal must not import it."""
    canary = tmp_path / "CANARY"
    module_dir = tmp_path / "pkg"
    module_dir.mkdir()
    (module_dir / "sneaky_models.py").write_text(textwrap.dedent(f"""
        import torch
        open({str(canary)!r} + ".imported", "w").close() if __import__("os").environ.get("SNEAKY_MARK") else None

        class SneakyNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(2, 2)
    """))
    structure = str(tmp_path / STRUCTURE_NAME)
    code_save = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(module_dir)!r})
        from sneaky_models import SneakyNet
        torch.save({{"model": SneakyNet()}}, {structure!r})
    """)
    subprocess.run([sys.executable, "-c", code_save], check=True, timeout=120)
    code_load = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(module_dir)!r})
        from experiment_io.run.trust import load_structure
        from experiment_io.errors import UnsafeCheckpointError
        try:
            load_structure({structure!r})
        except UnsafeCheckpointError as e:
            assert "sneaky_models.SneakyNet" in str(e), e
            assert "sneaky_models" not in sys.modules
            print("REFUSED")
        obj = load_structure({structure!r}, allow=["sneaky_models"])
        assert type(obj["model"]).__name__ == "SneakyNet"
        print("ALLOWED")
    """)
    env = dict(os.environ, SNEAKY_MARK="1")
    proc = subprocess.run([sys.executable, "-c", code_load], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["REFUSED", "ALLOWED"]


def test_moved_class_raises_structure_class_error(tmp_path):
    import helpers

    class Moved(torch.nn.Module):
        pass

    Moved.__module__, Moved.__qualname__ = "helpers", "NoLongerHere"
    helpers.NoLongerHere = Moved
    path = str(tmp_path / "s.pt")
    torch.save({"model": Moved()}, path)
    del helpers.NoLongerHere  # the class is renamed away after saving
    with pytest.raises(StructureClassError, match="helpers.NoLongerHere"):
        trust.load_structure(path)


def test_no_call_passes_weights_only_false_unless_trusted(run_directory, monkeypatch):
    loads = record_torch_loads(monkeypatch)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    directory = str(run_directory)
    load_checkpoint_from_cwd(directory=directory, database=make_database())
    load_checkpoint_from_cwd(directory=directory, database=make_database(), which="best")
    load_model_from_cwd(directory=directory)
    load_checkpoint(os.path.join(directory, STRUCTURE_NAME), os.path.join(directory, "last_checkpoint.pt"),
                    database=make_database())
    assert loads and all(weights_only is True for _, weights_only in loads), loads

    loads.clear()
    load_model_from_cwd(directory=directory, trusted=True)
    assert [weights_only for _, weights_only in loads] == [False, True]  # only the structure file, and only because trusted=True was given


PACKAGE_PATH_GADGETS = {
    # names that a package allowed by name reaches through the modules it imports
    "pkg.torch.os.system": "userpkg_gadget.torch.os.system",
    "pkg.torch.builtins.eval": "userpkg_gadget.torch.builtins.eval",
    "pkg.np.load": "userpkg_gadget.np.load",
}


@pytest.mark.parametrize("kind", sorted(PACKAGE_PATH_GADGETS))
def test_a_package_allowed_by_name_admits_nothing_reached_through_its_imports(tmp_path, kind, monkeypatch):
    """allow=['pkg'] trusts what pkg defines, not whatever pkg imported: a stored name that walks from pkg into
    torch's imports (pkg.torch.os.system) is refused, and nothing runs."""
    package = tmp_path / "userpkg_gadget"
    package.mkdir()
    (package / "__init__.py").write_text("import torch\nimport numpy as np\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    canary = tmp_path / "CANARY"
    name = PACKAGE_PATH_GADGETS[kind]
    module, attr = name.rsplit(".", 1)
    argument = f"touch {canary}" if attr == "system" else (f"open({str(canary)!r}, 'w')" if attr == "eval" else str(canary))
    # a pickle whose REDUCE calls the function found at that dotted name (written by hand: pickle would name it
    # where it is defined)
    import pickle as pickle_module
    data = (b"\x80\x02c" + module.encode() + b"\n" + attr.encode() + b"\n" + pickle_module.dumps((argument,), protocol=2)[2:-1]
            + b"R}q\x00X\x01\x00\x00\x00aq\x01h\x01s.")
    path = tmp_path / "gadget.pt"
    import zipfile
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("gadget/data.pkl", data)
        archive.writestr("gadget/byteorder", "little")
        archive.writestr("gadget/version", "3\n")
    with pytest.raises((UnsafeCheckpointError, StructureClassError)) as info:
        trust.load_structure(str(path), allow=["userpkg_gadget"])
    assert "not defined at that name" in str(info.value) or "imported under another name" in str(info.value)
    assert not canary.exists()


def _pickled_archive(path, data):
    """A torch.save archive at ``path`` whose pickle is ``data`` (written by hand, as an attacker would)."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return str(path)


class Repeated:
    """``frozenset(items)``: one admitted call on a value the file holds once."""

    def __init__(self, items):
        self.items = items

    def __reduce__(self):
        return frozenset, (self.items,)


def test_calls_that_do_more_work_than_the_file_holds_are_refused(tmp_path):
    """Each call of a container constructor on a memoised list is allowed; ten thousand calls on the same list of
    ten thousand items (a file of about 100 KB asking for 10^8 steps) are more work than the file's size explains."""
    items = list(range(10_000))
    torch.save({"training_modules": [Repeated(items) for _ in range(10_000)]}, tmp_path / "many.pt")
    with pytest.raises(UnsafeCheckpointError, match="more work than its size explains"):
        trust.load_structure(str(tmp_path / "many.pt"))
    torch.save({"training_modules": [Repeated(items) for _ in range(3)]}, tmp_path / "few.pt")
    assert len(trust.load_structure(str(tmp_path / "few.pt"))["training_modules"]) == 3


def test_a_class_with_a_setstate_of_its_own_is_refused_unless_allowed(tmp_path):
    """Pickle runs __setstate__ when it restores an object; outside torch, experiment_io and what the user allowed,
    one that does more than store its state is a constructor by another name."""
    torch.save({"training_modules": Stateful()}, tmp_path / "s.pt")
    with pytest.raises(UnsafeCheckpointError, match="__setstate__ of its own") as info:
        trust.load_structure(str(tmp_path / "s.pt"))
    assert not Stateful.restored
    suggested = str(info.value).split("allow=", 1)[1].split("]", 1)[0] + "]"
    loaded = trust.load_structure(str(tmp_path / "s.pt"), allow=eval(suggested))  # the remedy, as written
    assert isinstance(loaded["training_modules"], Stateful) and Stateful.restored


class Stateful(torch.nn.Module):
    restored = False

    def __setstate__(self, state):
        type(self).restored = True
        super().__setstate__(state)


def test_a_hand_written_pickle_calling_a_constructor_is_refused(tmp_path):
    """The same without torch.save: GLOBAL torch.nn.Linear, then REDUCE with (20000, 20000)."""
    data = b"\x80\x02ctorch.nn.modules.linear\nLinear\nM\x20NM\x20N\x86R."
    path = _pickled_archive(tmp_path / "linear.pt", data)
    with pytest.raises(UnsafeCheckpointError, match="calls the class torch.nn.modules.linear.Linear"):
        trust.load_structure(path)


def test_a_package_allowed_by_name_imports_none_of_its_submodules_for_a_file(tmp_path, monkeypatch):
    """allow=['pkg'] imports pkg (the user named it), never pkg.train_all that a file names: its top-level code
    would run before anything is decided."""
    package = tmp_path / "userpkg_sub"
    package.mkdir()
    (package / "__init__.py").write_text("")
    canary = tmp_path / "RAN"
    (package / "train_all.py").write_text(f"open({str(canary)!r}, 'w').close()\nclass Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = b"\x80\x02cuserpkg_sub.train_all\nNet\n)\x81."
    path = _pickled_archive(tmp_path / "s.pt", data)
    with pytest.raises(UnsafeCheckpointError) as info:
        trust.load_structure(path, allow=["userpkg_sub"])
    assert not canary.exists()
    assert "allow=['userpkg_sub.train_all']" in str(info.value)
    sys.modules.pop("userpkg_sub", None)


def test_allowing_the_library_itself_never_runs_its_command_line(tmp_path):
    data = b"\x80\x02cexperiment_io.__main__\nmain\n."
    path = _pickled_archive(tmp_path / "s.pt", data)
    with pytest.raises((UnsafeCheckpointError, StructureClassError)):
        trust.load_structure(path, allow=["experiment_io"])
    assert "experiment_io.__main__" not in sys.modules


@pytest.mark.parametrize("held", ["a string", None, 3, {"model": 1}, [1, 2], "module", "tensor", "ordered"])
def test_a_structure_file_holding_no_training_modules_is_refused_with_the_librarys_error(run_directory, tmp_path,
                                                                                         held):
    held = {"module": torch.nn.Linear(2, 2), "tensor": torch.zeros(2),
            "ordered": __import__("collections").OrderedDict(a=1)}.get(held, held) if isinstance(held, str) else held
    directory = tmp_path / "run"
    directory.mkdir()
    for name in os.listdir(run_directory):
        if (run_directory / name).is_file():
            (directory / name).write_bytes((run_directory / name).read_bytes())
    plant_structure(str(directory), held)
    for load in (lambda: load_model_from_cwd(directory=str(directory)),
                 lambda: load_checkpoint_from_cwd(directory=str(directory), database=make_database())):
        with pytest.raises(ExperimentIOError) as info:
            load()
        assert "TrainingModules" in str(info.value)
