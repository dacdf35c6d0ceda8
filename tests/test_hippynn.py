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
from experiment_io.cli import main as cli_main  # noqa: E402

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
