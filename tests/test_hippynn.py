"""hippynn's own models, losses and run directories (needs hippynn, the ``hippynn`` extra; skipped without it).

Each run goes through ``tests/scripts/hippynn_driver.py`` in fresh processes: a tiny HIP-NN as in hippynn's
barebones example, trained by experiment_io's ``train_model`` or by hippynn's.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("hippynn")

from experiment_io import Database, load_checkpoint_from_cwd, load_model_from_cwd, train_model  # noqa: E402
from experiment_io.frontends.cli import main as cli_main

DRIVER = os.path.join(os.path.dirname(__file__), "scripts", "hippynn_driver.py")
os.environ.setdefault("HIPPYNN_USE_CUSTOM_KERNELS", "_pytorch_raw")  # no torch.compile: fast tests


def drive(*args, expect=0):
    result = subprocess.run([sys.executable, DRIVER, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def last_model(directory):
    return torch.load(os.path.join(directory, "last_checkpoint.pt"), weights_only=True)["model"]


def test_a_hipnn_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    """No adapter: hippynn's assembled modules go to setup_training and train_model as they are. The restart
    assembles the graph again (its input order may change between processes) and passes the inputs reversed on
    top: the database is realigned to the run's order."""
    drive("train", tmp_path / "straight", "--epochs", 3)
    drive("train", tmp_path / "killed", "--epochs", 3, "--kill-at-batch", 7, expect=-9)
    interrupted = torch.load(tmp_path / "killed" / "last_checkpoint.pt", weights_only=True)
    assert interrupted["position"]["samples_done"] > 0  # the kill came mid-epoch, after a checkpoint
    drive("train", tmp_path / "killed", "--epochs", 3, "--reverse-inputs")
    straight, resumed = last_model(tmp_path / "straight"), last_model(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_a_hippynn_run_directory_is_imported_and_resumed(tmp_path):
    sys.path.insert(0, os.path.dirname(DRIVER))
    try:
        import hippynn_driver
    finally:
        sys.path.pop(0)
    drive("hippynn-train", tmp_path / "hippynn_run", "--epochs", 3)
    assert cli_main(["import-hippynn", str(tmp_path / "hippynn_run"), str(tmp_path / "imported")]) == 0
    model = load_model_from_cwd(directory=str(tmp_path / "imported"), allow=["hippynn"])
    best = torch.load(tmp_path / "hippynn_run" / "best_model.pt", weights_only=True)
    assert best.keys() == model.state_dict().keys()
    for name, value in best.items():
        assert torch.equal(model.state_dict()[name], value), name
    _, db_info = hippynn_driver.assemble()
    database = Database(arr_dict=hippynn_driver.arrays(), seed=1, test_size=0.1, valid_size=0.2, **db_info)
    check = load_checkpoint_from_cwd(directory=str(tmp_path / "imported"), allow=["hippynn"], database=database)
    saved_epoch = check["controller"].current_epoch
    assert saved_epoch >= 1 and check["metric_tracker"].best_epoch == saved_epoch - 1
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, max_epochs=saved_epoch + 1)
    assert load_checkpoint_from_cwd(directory=str(tmp_path / "imported"), allow=["hippynn"],
                                    database=database)["controller"].current_epoch == saved_epoch + 1
    # a second import into the same directory is refused; --overwrite replaces it
    assert cli_main(["import-hippynn", str(tmp_path / "hippynn_run"), str(tmp_path / "imported")]) == 1
    assert cli_main(["import-hippynn", str(tmp_path / "hippynn_run"), str(tmp_path / "imported"), "--overwrite"]) == 0


BAREBONES_PORT = '''
import os, sys
sys.path.insert(0, {scripts!r})
import torch
import hippynn
from hippynn_driver import arrays
from hippynn.graphs import inputs, networks, targets, loss
# the two lines of the port (docs/hippynn.rst)
from experiment_io import Database, SetupParams, setup_and_train

network_params = {{"possible_species": [0, 1, 2], "n_features": 8, "n_sensitivities": 8, "dist_soft_min": 0.5,
                  "dist_soft_max": 3.0, "dist_hard_max": 4.0, "n_interaction_layers": 1, "n_atom_layers": 1}}
species = inputs.SpeciesNode(db_name="Z")
positions = inputs.PositionsNode(db_name="R")
network = networks.Hipnn("hipnn_model", (species, positions), module_kwargs=network_params)
henergy = targets.HEnergyNode("HEnergy", network, db_name="T")
mse_energy = loss.MSELoss.of_node(henergy)
mae_energy = loss.MAELoss.of_node(henergy)
rmse_energy = mse_energy ** (1 / 2)
validation_losses = {{"RMSE": rmse_energy, "MAE": mae_energy, "MSE": mse_energy}}
training_modules, db_info = hippynn.experiment.assemble_for_training(mse_energy, validation_losses)
with hippynn.tools.active_directory("TEST_BAREBONES_SCRIPT"):
    database = hippynn.databases.Database(arrays(), test_size=0.1, valid_size=0.1, seed=2001, quiet=True, **db_info)
    from hippynn.pretraining import set_e0_values
    set_e0_values(henergy, database, trainable_after=False)
    database = Database.from_hippynn(database, seed=2001)
    experiment_params = SetupParams(stopping_key="MSE", batch_size=12, optimizer=torch.optim.Adam, max_epochs=2,
                                    learning_rate=0.001)
    metrics = setup_and_train(training_modules=training_modules, database=database, setup_params=experiment_params,
                              quiet=True)
    print("TRAINED", sorted(metrics.evaluations["best"]))
'''


def test_the_barebones_example_ports_with_two_lines(tmp_path):
    script = tmp_path / "barebones.py"
    script.write_text(BAREBONES_PORT.format(scripts=os.path.dirname(DRIVER)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TRAINED ['test', 'train', 'valid']" in result.stdout
    model = load_model_from_cwd(directory=str(tmp_path / "TEST_BAREBONES_SCRIPT"), allow=["hippynn"])
    assert type(model).__name__ == "GraphModule"


def test_the_hippynn_port_example_runs():
    example = os.path.join(os.path.dirname(os.path.dirname(DRIVER)), os.pardir, "examples", "hippynn_port.py")
    result = subprocess.run([sys.executable, os.path.abspath(example)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== predict" in result.stdout and result.stdout.count("predicted") == 4
    assert "realigned" in result.stderr or "resuming at epoch 1" in result.stdout
