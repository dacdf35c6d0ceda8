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
from experiment_io.errors import StructureClassError, UnsafeCheckpointError
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


def payloads(canary):
    touch = f"open({str(canary)!r}, 'w').close()"
    return {
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
        assert "allow=" in message and "trusted=True" in message
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
