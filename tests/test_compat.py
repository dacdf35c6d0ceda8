"""Runs written by earlier format versions load with the current code (golden directories).

``tests/data/run_v<N>`` was written by ``tests/data/make_golden_run.py`` at format
version N and is never rewritten.
"""
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from experiment_io import train_model
from experiment_io.loading.loaders import load_checkpoint_from_cwd, load_model_from_cwd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from make_golden_run import golden_database, golden_inputs  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = sorted(name for name in os.listdir(DATA) if name.startswith("run_v"))


def test_every_format_version_has_a_golden_run():
    from experiment_io.format.codec import FORMAT_VERSION
    assert GOLDEN == [f"run_v{v}" for v in range(1, FORMAT_VERSION + 1)]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_model_predicts_as_when_it_was_written(name):
    """The prediction was computed on the machine that wrote the run: another CPU's float kernels may differ in
    the last bits (one ulp seen on AVX-512), so it is compared within float32 rounding; the weights are exact."""
    directory = os.path.join(DATA, name)
    model = load_model_from_cwd(directory=directory)
    with torch.no_grad():
        prediction = model(golden_inputs()).numpy()
    np.testing.assert_allclose(prediction, np.load(os.path.join(directory, "expected_prediction.npy")),
                               rtol=1e-5, atol=1e-6)
    assert not model.training


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_model_weights_are_exactly_the_stored_ones(name):
    directory = os.path.join(DATA, name)
    model = load_model_from_cwd(directory=directory)
    stored = torch.load(os.path.join(directory, "best_model.pt"), map_location="cpu", weights_only=True)
    stored = stored.get("model", stored) if isinstance(stored, dict) else stored
    stored = {k: v for k, v in stored.items() if isinstance(v, torch.Tensor)}
    weights = model.state_dict()
    assert stored and set(stored) <= set(weights)
    for key, value in stored.items():
        assert torch.equal(weights[key], value), key


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_run_resumes(tmp_path, name):
    directory = tmp_path / name
    shutil.copytree(os.path.join(DATA, name), directory)
    check = load_checkpoint_from_cwd(directory=str(directory), database=golden_database())
    model = check["training_modules"].model
    optimizer = check["controller"].optimizer
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert all(p.device.type == "cpu" for p in model.parameters())
    check["controller"].max_epochs += 1
    before = [p.detach().clone() for p in model.parameters()]
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, directory=str(directory))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert check["controller"].current_epoch == 4
