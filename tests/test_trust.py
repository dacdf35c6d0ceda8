"""The trust gate: what a structure file may construct when it is loaded."""
import builtins
import importlib
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.optim import lr_scheduler

import helpers
from experiment_io.storage import verification
from experiment_io import PatienceController, TrainingModules, register_safe_classes
from experiment_io.run import trust
from experiment_io.errors import ExperimentIOError, NotACheckpointError, StructureClassError, UnsafeCheckpointError
from experiment_io.run.trust import admitted_globals, load_structure
from experiment_io.storage.manifest import read_manifest, write_manifest

from helpers import TinyNet, make_training_modules


class PlainConfig:
    """A class of no admitted family (not a module, optimizer or scheduler)."""

    def __init__(self, value=1):
        self.value = value


def harmless_factory(n):
    return [n, n]


class CallsHarmless:
    def __reduce__(self):
        return (harmless_factory, (3,))


class RunsShell:
    """Unpickling this runs a shell command."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


class RunsEval:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.canary)!r}, 'w').close()",))


class RunsPopen:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.canary)],))


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.setattr(trust, "_registered", set())


def structure(tmp_path):
    tm = make_training_modules()
    optimizer = torch.optim.Adam(tm.model.parameters(), lr=0.01)
    schedulers = [lr_scheduler.StepLR(optimizer, step_size=2), lr_scheduler.ReduceLROnPlateau(optimizer)]
    controller = PatienceController(optimizer, schedulers, 8, 10, "mse", termination_patience=3)
    path = tmp_path / "structure.pt"
    torch.save({"training_modules": tm, "controller": controller, "extra": [1, (2.0, "x"), {"k": None}]}, path)
    return path, tm


def test_structure_of_admitted_classes_loads(tmp_path):
    path, tm = structure(tmp_path)
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert f"{TinyNet.__module__}.TinyNet" in names
    admitted = admitted_globals(names)
    assert sorted(name for _, name in admitted) == sorted(names)
    assert all(isinstance(obj, type) for obj, _ in admitted)

    loaded = load_structure(path)
    modules = loaded["training_modules"]
    assert isinstance(modules, TrainingModules) and isinstance(modules.model, TinyNet)
    assert modules.evaluator.model is modules.model
    for key, value in modules.model.state_dict().items():
        assert torch.equal(value, tm.model.state_dict()[key])
    controller = loaded["controller"]
    assert isinstance(controller, PatienceController)
    assert isinstance(controller.schedulers[0], lr_scheduler.StepLR)
    assert controller.schedulers[1].optimizer is controller.optimizer
    assert loaded["extra"] == [1, (2.0, "x"), {"k": None}]


@pytest.mark.slow
def test_loading_leaves_the_users_safe_globals_as_they_were(tmp_path):
    path, _ = structure(tmp_path)
    torch.serialization.add_safe_globals([PlainConfig])  # the user's own entry
    try:
        before = list(torch.serialization.get_safe_globals())
        load_structure(path)
        after = list(torch.serialization.get_safe_globals())
        assert len(after) == len(before) and set(after) == set(before)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals([g for g in before if g is not PlainConfig])
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # TinyNet was admitted for that one load only


@pytest.mark.parametrize("name", ["posix.system", "os.system", "builtins.eval", "builtins.exec", "torch.load",
                                  "subprocess.call", "experiment_io.storage.atomic.atomic_write_bytes"])
def test_functions_are_refused(name):
    with pytest.raises(UnsafeCheckpointError) as info:
        admitted_globals([name])
    message = str(info.value)
    assert name in message and ("not a class" in message or "not defined at that name" in message)


@pytest.mark.slow
def test_class_outside_the_families_is_refused():
    assert "subprocess" in sys.modules
    with pytest.raises(UnsafeCheckpointError) as info:
        admitted_globals(["subprocess.Popen"])
    assert "subprocess.Popen" in str(info.value) and "outside the admitted families" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        admitted_globals([f"{PlainConfig.__module__}.PlainConfig"])


def test_module_that_is_not_imported_is_refused_without_importing():
    with pytest.raises(UnsafeCheckpointError) as info:
        admitted_globals(["not_imported_pkg.Thing"])
    assert "not_imported_pkg.Thing" in str(info.value)
    assert "not_imported_pkg" not in sys.modules


def test_importable_module_is_not_imported_unless_allowed(canary_module):
    name, canary = canary_module
    with pytest.raises(UnsafeCheckpointError) as info:
        admitted_globals([f"{name}.Net"])
    assert "allow=" in str(info.value)
    assert name not in sys.modules and not canary.exists()

    admitted = admitted_globals([f"{name}.Net"], allow=[name])
    assert canary.exists() and name in sys.modules
    assert admitted == [(sys.modules[name].Net, f"{name}.Net")]


@pytest.mark.slow
def test_message_names_every_offender_and_both_ways_out():
    names = ["os.system", "builtins.eval", "subprocess.Popen", "not_imported_pkg.Thing", "torch.nn.Linear"]
    with pytest.raises(UnsafeCheckpointError) as info:
        admitted_globals(names)
    message = str(info.value)
    for name in names[:4]:
        assert name in message
    assert "torch.nn.Linear" not in message
    assert "4 global(s)" in message
    assert "allow=[" in message and "trusted=True" in message
    assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, ExperimentIOError)


def test_allow_admits_a_function_by_object_or_name():
    name = f"{harmless_factory.__module__}.harmless_factory"
    with pytest.raises(UnsafeCheckpointError):
        admitted_globals([name])
    assert admitted_globals([name], allow=[harmless_factory]) == [(harmless_factory, name)]
    assert admitted_globals([name], allow=[name]) == [(harmless_factory, name)]
    # allowing one name does not admit another
    with pytest.raises(UnsafeCheckpointError) as info:
        admitted_globals([name, "os.system"], allow=[harmless_factory])
    assert "os.system" in str(info.value) and name not in str(info.value).split("\n")[1]


def test_allow_admits_a_function_in_a_file(tmp_path):
    path = tmp_path / "s.pt"
    torch.save({"made": CallsHarmless()}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_structure(path)
    assert load_structure(path, allow=[harmless_factory])["made"] == [3, 3]


def test_register_safe_classes():
    name = f"{PlainConfig.__module__}.PlainConfig"
    with pytest.raises(UnsafeCheckpointError):
        admitted_globals([name])
    register_safe_classes(PlainConfig)
    assert admitted_globals([name]) == [(PlainConfig, name)]


@pytest.mark.parametrize("thing", [harmless_factory, os.system, PlainConfig(), "tests.PlainConfig", len])
def test_register_safe_classes_refuses_non_classes(thing):
    with pytest.raises(TypeError, match="classes only"):
        register_safe_classes(thing)
    assert trust._registered == set()


def test_renamed_class(tmp_path, monkeypatch):
    path = tmp_path / "structure.pt"
    torch.save({"model": helpers.RenamedLater()}, path)
    monkeypatch.delattr(helpers, "RenamedLater")
    with pytest.raises(StructureClassError) as info:
        load_structure(path)
    message = str(info.value)
    assert "RenamedLater" in message
    assert isinstance(info.value, ImportError)
    assert str(path) in message  # the message names the file (errors.StructureClassError)


def test_allowed_module_that_is_no_longer_installed(tmp_path, canary_module, monkeypatch):
    """A class whose module was removed since the file was saved, the module being allowed."""
    name, _ = canary_module
    module = __import__(name)
    path = tmp_path / "structure.pt"
    torch.save({"model": module.Net()}, path)
    monkeypatch.delitem(sys.modules, name)
    os.remove(module.__file__)
    importlib.invalidate_caches()
    with pytest.raises(StructureClassError) as info:
        load_structure(path, allow=[name])
    assert f"{name}.Net" in str(info.value)
    assert name not in sys.modules


# --- malicious files --------------------------------------------------------------


@pytest.mark.parametrize("force_env", [False, True], ids=["plain", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("attack", [RunsShell, RunsEval, RunsPopen])
def test_malicious_structure_never_runs(tmp_path, monkeypatch, force_env, attack):
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    canary = tmp_path / "CANARY"
    path = tmp_path / "structure.pt"
    tm = make_training_modules()
    torch.save({"experiment_io": {"kind": "structure", "format_version": 1}, "training_modules": tm,
                "controller": attack(canary), "database": None}, path)
    assert not canary.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_structure(path)
    with pytest.raises(UnsafeCheckpointError):
        load_structure(path, allow=["torch"])  # allowing a module never admits a function
    assert not canary.exists()


def test_malicious_file_is_refused_by_the_public_loader(tmp_path, monkeypatch):
    """A planted structure file with a manifest that vouches for it still does not run."""
    from experiment_io.run.payloads import STRUCTURE_NAME
    from experiment_io.loading.loaders import load_checkpoint, load_checkpoint_from_cwd, load_model_from_cwd

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    canary = tmp_path / "CANARY"
    run = tmp_path / "run"
    helpers.train_tiny_run(run, max_epochs=1)
    manifest = read_manifest(run)[1]
    torch.save({"experiment_io": {"kind": "structure", "format_version": 1}, "training_modules": RunsShell(canary),
                "controller": None, "database": None}, run / STRUCTURE_NAME)
    planted = verification.file_digest(run / STRUCTURE_NAME).as_dict()
    manifest[STRUCTURE_NAME].update(planted)
    for record in manifest.values():  # make every state file claim to belong to it
        if "structure_digest" in record:
            record["structure_digest"] = planted["digest"]
    write_manifest(run, manifest)
    for load in (lambda: load_checkpoint_from_cwd(directory=run, database=helpers.make_database()),
                 lambda: load_model_from_cwd(directory=run),
                 lambda: load_checkpoint(run / STRUCTURE_NAME, run / "last_checkpoint.pt"),
                 lambda: load_checkpoint(run / STRUCTURE_NAME, run / "last_checkpoint.pt", verify=False)):
        with pytest.raises(UnsafeCheckpointError):
            load()
    assert not canary.exists()


def test_trusted_skips_the_gate(tmp_path):
    path = tmp_path / "s.pt"
    torch.save({"config": PlainConfig(5)}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_structure(path)
    assert load_structure(path, trusted=True)["config"].value == 5


@pytest.mark.parametrize("content", [b"", b"hello, I am text\n", b"PK\x03\x04 broken zip"])
def test_not_a_torch_file(tmp_path, content):
    path = tmp_path / "structure.pt"
    path.write_bytes(content)
    with pytest.raises(NotACheckpointError) as info:
        load_structure(path)
    assert str(path) in str(info.value)


def test_legacy_pickle_file_is_not_a_structure(tmp_path):
    """A plain pickle (not a torch.save archive) of a harmful object is refused, and does not run."""
    canary = tmp_path / "CANARY"
    path = tmp_path / "structure.pt"
    path.write_bytes(pickle.dumps(RunsShell(canary)))
    with pytest.raises((NotACheckpointError, UnsafeCheckpointError)):
        load_structure(path)
    assert not canary.exists()


USERPKG_NETS = '''
import operator
import torch
import torch.nn.functional as F


class Scaler:
    """A helper that is not a torch.nn.Module."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor


def shifted_softplus(x):
    return F.softplus(x) - 0.6931


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.act = torch.tanh
        self.act2 = F.silu
        self.combine = operator.add
        self.scale = Scaler(2.0)
        self.custom = shifted_softplus

    def forward(self, x):
        return self.lin(self.custom(self.scale(self.combine(self.act(x), self.act2(x)))))
'''

USERPKG_TRAIN = '''
import numpy as np
import torch
import torch.nn.functional as F
from userpkg.nets import Net
from experiment_io import Database, Evaluator, SetupParams, TrainingModules, setup_training, train_model

torch.manual_seed(0)
x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
database = Database({"x": x, "y": x[:, :1] ** 2}, ["x"], ["y"], seed=0)
model = Net()
evaluator = Evaluator(model, {"MSE": F.mse_loss, "MAE": F.l1_loss})
tm, controller, tracker = setup_training(TrainingModules(model, F.mse_loss, evaluator),
                                         SetupParams(stopping_key="MSE", batch_size=16, max_epochs=1))
train_model(tm, database, controller, tracker, None, None, directory="run", quiet=True)
torch.save(model(torch.ones(2, 3)).detach(), "expected.pt")
'''


def test_a_model_with_functions_and_helper_classes_of_a_user_package(tmp_path):
    """Tensor math (torch.tanh, F.silu, operator.add, F.mse_loss) is admitted by default; the package's own helpers
    need the user's word, and allow=['package'] is that word for its classes and functions alike."""
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(USERPKG_NETS)
    (tmp_path / "train.py").write_text(USERPKG_TRAIN)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True, timeout=300, env=env)

    def load(code):
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env=env)
        return result.returncode, result.stdout + result.stderr

    status, output = load("""
        import userpkg.nets
        from experiment_io import load_model_from_cwd
        load_model_from_cwd(directory="run")
    """)
    assert status != 0 and "UnsafeCheckpointError" in output
    refused = output[output.index("UnsafeCheckpointError"):]
    assert "userpkg.nets.Scaler" in refused and "userpkg.nets.shifted_softplus" in refused
    for admitted in ("torch.tanh", "silu", "operator", "mse_loss", "getattr"):
        assert admitted not in refused, admitted
    status, output = load("""
        from experiment_io import load_model_from_cwd
        load_model_from_cwd(directory="run", allow=["userpkg"])
    """)
    # the package is imported, not the submodules the file names: the message says how to name them
    assert status != 0 and "allow=['userpkg.nets']" in output, output
    status, output = load("""
        import torch
        from experiment_io import load_checkpoint_from_cwd, load_model_from_cwd
        model = load_model_from_cwd(directory="run", allow=["userpkg.nets"])
        assert torch.equal(model(torch.ones(2, 3)), torch.load("expected.pt"))
        check = load_checkpoint_from_cwd(directory="run", allow=["userpkg.nets"], database=None, restart_db=False)
        print("OK", type(check["training_modules"].model.scale).__name__)
    """)
    assert status == 0 and "OK Scaler" in output, output
