"""The first hour of a new user: each error's suggested fix, followed literally, works; what matters is visible;
nothing is replaced by accident.

The user's project is a directory with its own modules (``mymodel.py``: the network; ``mytraining.py``: a custom
optimizer and a function metric) and an HDF5 file; scripts run in fresh processes in that directory, as a user
runs them, so that nothing is imported unless the script imports it.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from experiment_io import (HDF5Database, SetupParams, TrainingModules, Evaluator, load_checkpoint_from_cwd,
                           load_model_from_cwd, setup_training, train_model)
from experiment_io.errors import (CheckpointNotFoundError, CorruptCheckpointError, DeviceError, ExperimentIOError,
                                  RunExistsError, SetupError)
from experiment_io.frontends.cli import main as cli_main

from helpers import make_database, make_training_modules, train_tiny_run

MYMODEL = '''
import torch

class MLP(torch.nn.Module):
    def __init__(self, n_in=3, hidden=16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)
'''

MYTRAINING = '''
import torch

class ScaledAdam(torch.optim.Adam):
    pass

def rmse(predicted, target):
    return torch.sqrt(torch.mean((predicted - target) ** 2))
'''

TRAIN = '''
import sys
import torch
import mymodel, mytraining
from experiment_io import Evaluator, HDF5Database, SetupParams, TrainingModules, setup_training, train_model

torch.manual_seed(0)
model = mymodel.MLP()
evaluator = Evaluator(model, {"MSE": torch.nn.MSELoss(), "RMSE": mytraining.rmse})
database = HDF5Database("data.h5", inputs=["x"], targets=["y"], seed=0)
params = SetupParams(stopping_key="MSE", batch_size=16, max_epochs=2, optimizer=mytraining.ScaledAdam)
training_modules, controller, metrics = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator), params)
train_model(training_modules, database, controller, metrics, None, None, directory="run", quiet="quiet" in sys.argv)
'''


def write_data(path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    with h5py.File(path, "w") as h5:
        h5["x"] = x
        h5["y"] = np.sin(x.sum(axis=1, keepdims=True)).astype("float32")


def python(code, cwd, *, env=None):
    """Run ``code`` with a fresh interpreter in ``cwd`` (its modules importable, nothing else of the tests)."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=environment)


def outcome(code, cwd):
    """What ``code`` printed, or the class and message of the error it raised."""
    result = python(f"""
try:
{textwrap.indent(textwrap.dedent(code), "    ")}
except Exception as e:
    print("ERROR", type(e).__name__)
    print(e)
""", cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    (project / "mymodel.py").write_text(MYMODEL)
    (project / "mytraining.py").write_text(MYTRAINING)
    (project / "train.py").write_text(TRAIN)
    write_data(project / "data.h5")
    result = subprocess.run([sys.executable, "train.py"], cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return project, result.stderr


@pytest.fixture
def project(trained_project, tmp_path):
    source, _ = trained_project
    copy = tmp_path / "project"
    shutil.copytree(source, copy)
    return copy


# --- 1. the trust gate: every remedy it suggests works -----------------------------------------------------------

def test_prediction_without_the_import_says_to_import_and_each_remedy_works(project):
    predict = "from experiment_io import load_model_from_cwd\nmodel = load_model_from_cwd(directory='run'{})\nprint('OK', type(model).__name__)"
    refused = outcome(predict.format(""), project)
    assert "ERROR UnsafeCheckpointError" in refused
    assert "import mymodel (the module that defines them)" in refused
    # the fixes, exactly as the message words them
    import_line = re.search(r"  - (import [\w., ]+) \(the module", refused).group(1)
    assert "OK MLP" in outcome(import_line + "\n" + predict.format(""), project)
    allow = re.search(r"pass (allow=\[[^\]]*\])", refused).group(1)
    assert allow == "allow=['mymodel.MLP']"
    assert "OK MLP" in outcome(predict.format(", " + allow), project)
    assert "OK MLP" in outcome(predict.format(", trusted=True"), project)


def test_a_restart_lists_everything_the_set_up_needs_and_the_suggested_allow_works(project):
    restart = "from experiment_io import load_checkpoint_from_cwd\ncheck = load_checkpoint_from_cwd(directory='run'{})\nprint('OK', check['controller'].current_epoch)"
    refused = outcome(restart.format(""), project)
    assert "ERROR UnsafeCheckpointError" in refused
    for name in ("mymodel.MLP", "mytraining.ScaledAdam", "mytraining.rmse"):
        assert name in refused
    allow = re.search(r"pass (allow=\[[^\]]*\])", refused).group(1)
    assert "OK 2" in outcome(restart.format(", " + allow), project)
    # the import fix: the classes are admitted, the function must still be allowed, as the message says
    after_import = outcome("import mymodel, mytraining\n" + restart.format(""), project)
    assert "mytraining.rmse: it is a function" in after_import and "mymodel.MLP" not in after_import
    assert "OK 2" in outcome("import mymodel, mytraining\n" + restart.format(", allow=['mytraining.rmse']"), project)


def test_an_allowed_name_whose_module_is_not_imported_is_found(saved_run, tmp_path):
    """allow=['module.Name'] for a module not imported yet imports exactly that module (not a sibling)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(MYMODEL)
    (package / "evil.py").write_text("open('CANARY', 'w').close()\n")
    (tmp_path / "train.py").write_text(TRAIN.replace("import mymodel, mytraining", "import pkg.nets as mymodel, mytraining")
                                       .replace("mytraining.ScaledAdam", "torch.optim.Adam"))
    (tmp_path / "mytraining.py").write_text(MYTRAINING)
    write_data(tmp_path / "data.h5")
    assert subprocess.run([sys.executable, "train.py", "quiet"], cwd=tmp_path, timeout=300).returncode == 0
    printed = outcome("from experiment_io import load_model_from_cwd\n"
                      "print('OK', type(load_model_from_cwd(directory='run', allow=['pkg.nets.MLP'])).__name__)\n"
                      "import sys; print('evil' if 'pkg.evil' in sys.modules else 'clean')", tmp_path)
    assert "OK MLP" in printed and "clean" in printed and not (tmp_path / "CANARY").exists()


# --- 2. what training does is visible without any set-up ---------------------------------------------------------

def test_epochs_and_a_summary_reach_a_user_who_configured_nothing(trained_project):
    _, stderr = trained_project
    assert re.search(r"epoch 0 \(1 of 2 done\): train loss [\d.e-]+; valid MSE [\d.e-]+, RMSE [\d.e-]+ \(best so far\)", stderr)
    assert "epoch 1 (2 of 2 done)" in stderr
    assert re.search(r"training stopped: reached max_epochs=2; 2 of 2 epochs done, best epoch \d \(valid MSE", stderr)


def test_quiet_and_logging_configuration_decide_what_is_shown(project):
    shutil.rmtree(project / "run")
    quiet = subprocess.run([sys.executable, "train.py", "quiet"], cwd=project, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "epoch 0" not in quiet.stderr and "training stopped" not in quiet.stderr
    shutil.rmtree(project / "run")
    configured = python("import logging\nlogging.basicConfig(level=logging.INFO, format='LOG %(name)s %(message)s')\n"
                        "exec(open('train.py').read())", project)
    assert configured.returncode == 0, configured.stderr
    lines = [line for line in configured.stderr.splitlines() if "epoch 0 (1 of 2 done)" in line]
    assert len(lines) == 1 and lines[0].startswith("LOG experiment_io.training.loop "), lines  # once, through the log


def test_warnings_reach_stderr_without_configuration(project):
    """A fallback to an older checkpoint is a warning a user must see, with no logging set up."""
    with open(project / "run" / "last_checkpoint.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 8)
    result = python("import mymodel\nfrom experiment_io import load_checkpoint_from_cwd\n"
                    "load_checkpoint_from_cwd(directory='run', allow=['mytraining.ScaledAdam', 'mytraining.rmse'])",
                    project)
    assert result.returncode == 0, result.stderr
    assert "last_checkpoint.pt" in result.stderr and "skipped" in result.stderr


# --- 3. a fresh start never replaces a run by accident ------------------------------------------------------------

def test_a_fresh_start_over_a_run_is_refused_and_each_way_on_works(project):
    again = subprocess.run([sys.executable, "train.py", "quiet"], cwd=project, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert "RunExistsError" in again.stderr
    message = again.stderr[again.stderr.index("RunExistsError"):]
    assert "2 of 2 epochs done, best epoch" in message and "finished" in message
    for way in ("load_checkpoint_from_cwd(", "overwrite=True", "directory='another/run'"):
        assert way in message
    resume = re.search(r"(check = load_checkpoint_from_cwd\(directory='[^']+'\))", message).group(1)
    printed = outcome(f"import mymodel, mytraining\nfrom experiment_io import load_checkpoint_from_cwd\n"
                      f"{resume[:-1]}, allow=['mytraining.rmse'])\nprint('OK', check['controller'].current_epoch)", project)
    assert "OK 2" in printed  # the resume it suggests names the right directory
    before = open(project / "run" / "best_model.pt", "rb").read()
    assert open(project / "run" / "best_model.pt", "rb").read() == before  # untouched
    # the ways on, as the message words them
    other = (project / "train.py").read_text().replace('directory="run"', "directory='another/run'")
    assert python(other.replace("quiet=", "overwrite=False, quiet="), project).returncode == 0
    assert os.path.exists(project / "another" / "run" / "best_model.pt")
    replaced = (project / "train.py").read_text().replace("None, None,", "None, None, overwrite=True,")
    result = python(replaced, project)
    assert result.returncode == 0, result.stderr
    assert "replaces the run there" in result.stderr


def test_the_one_liner_after_a_kill_before_the_first_save(tmp_path):
    """A run killed before its first checkpoint committed has nothing to protect: the one-liner starts it again."""
    database = make_database()
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32, max_epochs=1))
    from experiment_io.training.checkpointing import RunCheckpointer
    RunCheckpointer(str(tmp_path), tm, controller, tracker, database, resuming=False)  # the structure file only
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database, missing_ok=True)
    assert check is None
    tm, controller, tracker = setup_training(make_training_modules(seed=1), SetupParams(stopping_key="mse", batch_size=32, max_epochs=1))
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path), quiet=True)
    assert load_checkpoint_from_cwd(directory=str(tmp_path), database=database)["controller"].current_epoch == 1


def test_resuming_another_run_into_a_directory_with_a_run_is_refused(tmp_path):
    train_tiny_run(tmp_path / "a", max_epochs=1)
    train_tiny_run(tmp_path / "b", max_epochs=1, batch_size=16)  # another run (another structure file)
    check = load_checkpoint_from_cwd(directory=str(tmp_path / "a"), database=make_database())
    with pytest.raises(RunExistsError, match="loaded from another run"):
        train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, directory=str(tmp_path / "b"))


# --- 4. train_model(**check) continues where the checkpoint came from ----------------------------------------------

def test_train_model_continues_in_the_directory_the_checkpoint_came_from(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_tiny_run(run, max_epochs=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    check = load_checkpoint_from_cwd(directory=str(run), database=make_database())
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, max_epochs=2)
    assert os.listdir(elsewhere) == []
    assert load_checkpoint_from_cwd(directory=str(run), database=make_database())["controller"].current_epoch == 2


# --- 5. a model class defined in the training script ---------------------------------------------------------------

LOCAL_TRAIN = TRAIN.replace("import mymodel, mytraining", "import mytraining\n" + MYMODEL.replace("class MLP", "class LocalMLP")) \
    .replace("mymodel.MLP()", "LocalMLP()").replace("mytraining.ScaledAdam", "torch.optim.Adam")


def test_a_class_of_the_training_script_is_flagged_and_can_be_handed_to_the_loader(tmp_path):
    (tmp_path / "mytraining.py").write_text(MYTRAINING)
    (tmp_path / "train.py").write_text(LOCAL_TRAIN)
    write_data(tmp_path / "data.h5")
    trained = subprocess.run([sys.executable, "train.py", "quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert "LocalMLP are defined in the script being run (__main__)" in trained.stderr
    refused = outcome("from experiment_io import load_model_from_cwd\nload_model_from_cwd(directory='run')", tmp_path)
    assert "ERROR StructureClassError" in refused
    assert "defined in the script that trained" in refused and "allow=[LocalMLP]" in refused
    # the fix the message suggests: move the class into a module, hand the class itself to the loader
    (tmp_path / "nets.py").write_text(MYMODEL.replace("class MLP", "class LocalMLP"))
    printed = outcome("from nets import LocalMLP\nfrom experiment_io import load_model_from_cwd\n"
                      "print('OK', type(load_model_from_cwd(directory='run', allow=[LocalMLP])).__name__)", tmp_path)
    assert "OK LocalMLP" in printed


# --- 6. prediction needs only what the model needs ----------------------------------------------------------------

def test_prediction_needs_only_the_model_module(project):
    printed = outcome("import mymodel\nfrom experiment_io import load_model_from_cwd\n"
                      "model = load_model_from_cwd(directory='run')\nimport sys\n"
                      "print('OK', type(model).__name__, 'mytraining' in sys.modules)", project)
    assert "OK MLP False" in printed


def test_a_model_that_refers_to_something_refused_is_still_refused(tmp_path):
    """The stand-ins of prediction never reach the model: what the model itself refers to must be admitted."""
    (tmp_path / "mytraining.py").write_text(MYTRAINING)
    (tmp_path / "mymodel.py").write_text(MYMODEL.replace("self.net = ", "import mytraining\n        self.metric = mytraining.rmse\n        self.net = "))
    (tmp_path / "train.py").write_text(TRAIN)
    write_data(tmp_path / "data.h5")
    assert subprocess.run([sys.executable, "train.py", "quiet"], cwd=tmp_path, timeout=300).returncode == 0
    refused = outcome("import mymodel\nfrom experiment_io import load_model_from_cwd\nload_model_from_cwd(directory='run')", tmp_path)
    assert "ERROR UnsafeCheckpointError" in refused and "mytraining.rmse" in refused and "ScaledAdam" not in refused
    assert "OK" in outcome("import mymodel\nfrom experiment_io import load_model_from_cwd\n"
                           "load_model_from_cwd(directory='run', allow=['mytraining.rmse']); print('OK')", tmp_path)


# --- 7. errors of the library's classes, with the right words ------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_map_location_cuda_without_a_gpu_is_a_device_error(saved_run):
    with pytest.raises(DeviceError, match=r"map_location='cuda'.*no cuda device.*map_location='cpu'"):
        load_model_from_cwd(map_location="cuda", directory=str(saved_run))
    with pytest.raises(DeviceError, match="map_location"):
        load_checkpoint_from_cwd(map_location="cuda:0", directory=str(saved_run), database=make_database())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_setup_params_device_error_names_its_argument():
    with pytest.raises(DeviceError) as info:
        setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=8, max_epochs=1, device="cuda"))
    assert "device='cuda'" in str(info.value) and "device='cpu'" in str(info.value)
    assert "model_device" not in str(info.value)


def test_optimizer_by_name():
    _, controller, _ = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=8, max_epochs=1,
                                                                          optimizer="AdamW"))
    assert type(controller.optimizer) is torch.optim.AdamW
    with pytest.raises(SetupError, match="optimizer='Adamm' is not an optimizer of torch.optim .*Adam"):
        setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=8, max_epochs=1, optimizer="Adamm"))


def test_a_wrong_dataset_name_lists_what_the_file_holds(tmp_path):
    write_data(tmp_path / "data.h5")
    with pytest.raises(SetupError) as info:
        HDF5Database(tmp_path / "data.h5", inputs=["X"], targets=["y"], seed=0)
    message = str(info.value)
    assert isinstance(info.value, KeyError)
    assert "holds no datasets ['X']" in message and "['x', 'y']" in message and "case only" in message


def test_a_lambda_in_the_losses_is_named_when_training_starts(tmp_path):
    tm = make_training_modules()
    tm.evaluator.evaluation_losses["L1"] = lambda predicted, target: (predicted - target).abs().mean()
    tm, controller, tracker = setup_training(tm, SetupParams(stopping_key="mse", batch_size=32, max_epochs=1))
    with pytest.raises(SetupError, match=r"evaluator\.evaluation_losses\['L1'\] holds '[\w.<>]*<lambda>'.*top level of a module"):
        train_model(tm, make_database(), controller, tracker, None, None, directory=str(tmp_path), quiet=True)
    assert not os.path.exists(tmp_path / "last_checkpoint.pt")


def test_loading_while_a_live_process_writes_the_first_checkpoint_names_it(tmp_path):
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32, max_epochs=1))
    from experiment_io.training.checkpointing import RunCheckpointer
    RunCheckpointer(str(tmp_path), tm, controller, tracker, make_database(), resuming=False)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom experiment_io import RunLock\n"
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointNotFoundError, match=f"pid {holder.pid} on this host has been training there"):
            load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database())
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(CheckpointNotFoundError, match="Start the run from the beginning"):  # the holder is gone
        load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database())


def test_strict_lists_only_files_that_differ(tmp_path):
    train_tiny_run(tmp_path, max_epochs=3)
    shutil.copy(tmp_path / "last_checkpoint.prev.pt", tmp_path / "last_checkpoint.pt")
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database(), strict=True)
    message = str(info.value)
    assert message.startswith("the committed generation of last_checkpoint.pt")
    assert "last_checkpoint.prev.pt" not in message  # intact: the previous generation, not a problem
    for expected, found in re.findall(r"digest (\S+), found \d+ bytes with digest (\S+)", message):
        assert expected != found


# --- 8. nothing continues silently on the wrong thing ---------------------------------------------------------------

def test_missing_ok_does_not_hide_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist.*os.makedirs"):
        load_checkpoint_from_cwd(directory=str(tmp_path / "mistyped"), missing_ok=True)
    os.makedirs(tmp_path / "mistyped", exist_ok=True)  # the fix the message gives
    assert load_checkpoint_from_cwd(directory=str(tmp_path / "mistyped"), missing_ok=True) is None


def test_a_data_file_with_other_content_at_the_same_path_is_refused_at_restart(project):
    shutil.rmtree(project / "run")  # a run of its own, that reads this copy's data file
    assert subprocess.run([sys.executable, "train.py", "quiet"], cwd=project, timeout=300).returncode == 0
    write_data(project / "data.h5", seed=1)  # same names, sizes and seed; other values
    printed = outcome("import mymodel\nfrom experiment_io import load_checkpoint_from_cwd\n"
                      "load_checkpoint_from_cwd(directory='run', allow=['mytraining.ScaledAdam', 'mytraining.rmse'])\n"
                      "print('OK')", project)
    assert "ERROR IncompatibleCheckpointError" in printed and "data.h5 differ" in printed
    write_data(project / "data.h5", seed=0)  # the data it was trained on
    assert "OK" in outcome("import mymodel\nfrom experiment_io import load_checkpoint_from_cwd\n"
                           "load_checkpoint_from_cwd(directory='run', allow=['mytraining.ScaledAdam', 'mytraining.rmse'])\n"
                           "print('OK')", project)


# --- 9. what a user looks for -------------------------------------------------------------------------------------

def test_larger_is_better_picks_the_largest(tmp_path):
    tm = make_training_modules()
    tm.evaluator.evaluation_losses["negative_mse"] = NegativeMSE()
    tm, controller, tracker = setup_training(tm, SetupParams(stopping_key="negative_mse", batch_size=32, max_epochs=3,
                                                             larger_is_better=True))
    train_model(tm, make_database(), controller, tracker, None, None, directory=str(tmp_path), quiet=True)
    values = tracker.history["valid"]["negative_mse"]
    assert tracker.best_epoch == int(np.argmax(values)) and values[tracker.best_epoch] > min(values)


class NegativeMSE(torch.nn.Module):
    def forward(self, predicted, target):
        return -torch.mean((predicted - target) ** 2)


def test_a_finished_run_is_extended_with_max_epochs(tmp_path):
    train_tiny_run(tmp_path, max_epochs=2)
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database())
    assert check["controller"].finished
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, max_epochs=4)
    assert load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database())["controller"].current_epoch == 4


def test_loading_the_model_of_an_epoch_or_the_last_model(tmp_path):
    _, _, tracker, _ = train_tiny_run(tmp_path, max_epochs=3, store_every=1)
    last = load_model_from_cwd(directory=str(tmp_path), which="last")
    epoch_2 = load_model_from_cwd(directory=str(tmp_path), epoch=2)
    for a, b in zip(last.state_dict().values(), epoch_2.state_dict().values()):
        assert torch.equal(a, b)  # the last model is that after epoch 2
    epoch_0 = load_model_from_cwd(directory=str(tmp_path), epoch=0)
    assert not all(torch.equal(a, b) for a, b in zip(epoch_0.state_dict().values(), last.state_dict().values()))
    with pytest.raises(CheckpointNotFoundError, match=r"no model of epoch 7: models are kept for epochs \[0, 1, 2\]"):
        load_model_from_cwd(directory=str(tmp_path), epoch=7)


def test_info_says_where_the_run_stands(tmp_path, capsys):
    train_tiny_run(tmp_path, max_epochs=3)
    assert cli_main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"run: 3 of 3 epochs done, best epoch \d, finished", out)
    assert re.search(r"best_model\.pt .* model after epoch \d", out)


def test_a_moved_data_file_is_passed_as_the_message_says(tmp_path):
    write_data(tmp_path / "data.h5")
    database = HDF5Database(tmp_path / "data.h5", inputs=["x"], targets=["y"], seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), Evaluator(model, {"MSE": torch.nn.MSELoss()})),
                                             SetupParams(stopping_key="MSE", batch_size=32, max_epochs=1))
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path / "run"), quiet=True)
    os.rename(tmp_path / "data.h5", tmp_path / "moved.h5")
    with pytest.raises(ExperimentIOError) as info:
        load_checkpoint_from_cwd(directory=str(tmp_path / "run"))
    assert "Pass data_file='<its new path>' to the load function" in str(info.value)
    check = load_checkpoint_from_cwd(directory=str(tmp_path / "run"), data_file=tmp_path / "moved.h5")
    assert check["database"].path == str(tmp_path / "moved.h5")
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, max_epochs=2)
    assert check["controller"].current_epoch == 2
