"""Trains a small model in the current directory; used by the subprocess tests.

    python train_driver.py fresh  [--epochs E] [--batch-sleep S] [--batch-size B] [--every N]
    python train_driver.py resume [--epochs E] [--batch-sleep S] [--batch-size B] [--every N]

Both write ``result.pt`` (final parameters, optimizer state, metric history) when
training ends, and append one line per trained batch to ``batches.log`` (the
epoch's sample checksum), flushed at once.
"""
import argparse
import os
import sys
import time

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from driver_model import DropoutNet, save_result  # noqa: E402  (importable, so the structure file can name it)

from experiment_io import Evaluator, HDF5Database, SetupParams, TrainingModules, setup_training, train_model  # noqa: E402
from experiment_io.loading.loaders import load_checkpoint_from_cwd

DATA = "data.h5"


def make_data(path, n=320, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = np.sin(x).sum(axis=1, keepdims=True) + 0.1 * x[:, :1] ** 2
    with h5py.File(path, "w") as f:
        f["x"] = x
        f["y"] = y
        f["index"] = np.arange(n, dtype=np.float64)[:, None]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fresh", "resume"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-sleep", type=float, default=0.0)
    parser.add_argument("--every", type=int, default=0, help="checkpoint_every_batches")
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = open("batches.log", "a", buffering=1)

    def record(inputs, outputs, targets):
        log.write(" ".join(str(int(i)) for i in inputs[1].flatten().tolist()) + "\n")
        if args.batch_sleep:
            time.sleep(args.batch_sleep)

    if args.mode == "fresh":
        if not os.path.exists(DATA):
            make_data(DATA)
        torch.manual_seed(1234)
        np.random.seed(99)
        model = DropoutNet()
        evaluator = Evaluator(model, {"MSE": torch.nn.MSELoss(), "MAE": torch.nn.L1Loss()})
        database = HDF5Database(DATA, inputs=["x", "index"], targets=["y"], seed=7, valid_size=0.15, test_size=0.1)
        params = SetupParams(
            stopping_key="MSE", batch_size=args.batch_size, max_epochs=args.epochs, optimizer=torch.optim.Adam,
            learning_rate=3e-3,
            scheduler=[lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
                       lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5)],
        )
        training_modules, controller, metrics = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator), params)
        train_model(training_modules, database, controller, metrics, callbacks=None, batch_callbacks=[record], quiet=True,
                    checkpoint_every_batches=args.every)
    else:
        check = load_checkpoint_from_cwd()
        controller, metrics = check["controller"], check["metric_tracker"]
        training_modules = check["training_modules"]
        train_model(**check, callbacks=None, batch_callbacks=[record], quiet=True, checkpoint_every_batches=args.every)
    if metrics.stop_reason.startswith("interrupted"):
        print("INTERRUPTED", flush=True)
        return 3
    save_result(training_modules.model, controller, metrics)
    print("FINISHED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
