"""Write a small run directory to pin the on-disk format for backward compatibility.

Usage: ``python tests/data/make_golden_run.py tests/data/run_v<N>``. The directory
it wrote at each format version is kept (``run_v1``: format version 1, whose
structure file still holds the model's initial weights); the tests load every
kept directory with the current code. The model and losses are torch classes and
the database is in memory, so that loading needs nothing from the tests.

The files are digested in parts of at most 4 KiB (a large file's parts, format
version 5), so that the small files of the run are recorded in parts as large
files are.
"""
import os
import sys

import numpy as np
import torch

from experiment_io import Database, Evaluator, SetupParams, TrainingModules, setup_training, train_model
from experiment_io.storage import hashing


def golden_database():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, 3)).astype(np.float32)
    y = np.cos(x).sum(axis=1, keepdims=True).astype(np.float32)
    return Database({"x": x, "y": y}, ["x"], ["y"], 3, 0.2, 0.2)


def golden_inputs():
    return torch.linspace(-1, 1, 12).reshape(4, 3)


def main(directory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 1))
    evaluator = Evaluator(model, {"mse": torch.nn.MSELoss(), "mae": torch.nn.L1Loss()}, batch_size=16)
    tm, controller, tracker = setup_training(
        TrainingModules(model, torch.nn.MSELoss(), evaluator),
        SetupParams(stopping_key="mse", batch_size=16, max_epochs=3, learning_rate=0.01))
    train_model(tm, golden_database(), controller, tracker, None, None, quiet=True, directory=directory)
    best = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 1))
    best.load_state_dict(tracker.best_model_state)
    with torch.no_grad():
        expected = best.eval()(golden_inputs()).numpy()
    np.save(os.path.join(directory, "expected_prediction.npy"), expected)


if __name__ == "__main__":
    hashing.PART_AT_LEAST, hashing.PART_AT_MOST = 1024, 4096
    main(sys.argv[1])
