"""One script for one process or many: starts or resumes a small run in the current directory.

    torchrun --nproc_per_node=2 ddp_driver.py [--epochs E] [--every N] [--async] [--wrap]
             [--kill-rank R --kill-at B] [--raise-signal NAME --raise-at B]

The start-or-resume one-liner (``load_checkpoint_from_cwd(missing_ok=True) or
start_fresh()``) serves the first start and every restart. Each rank appends one
line per trained batch to ``batches.rank<R>.log`` (``epoch: sample ids``); rank 0
writes ``result.pt`` (final parameters, optimizer state, metric history) when
training ends. ``--kill-rank R --kill-at B`` makes rank R SIGKILL itself after its
B-th batch of this attempt (only in the first attempt of ``torchrun
--max-restarts``); ``--raise-signal NAME --raise-at B`` makes every rank send itself
the signal after its B-th batch. A rank whose ``train_model`` raises ``SystemExit``
writes ``exit.rank<R>`` with the status first.
"""
import argparse
import os
import signal
import sys
import time

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from driver_model import DropoutNet, save_result  # noqa: E402  (importable, so the structure file can name it)

from experiment_io import (  # noqa: E402
    Evaluator,
    HDF5Database,
    SetupParams,
    TrainingModules,
    load_checkpoint_from_cwd,
    setup_training,
    train_model,
)

DATA = "data.h5"

import experiment_io.training.checkpointing

experiment_io.training.checkpointing.ASYNC_MIN_BYTES = 0  # the tiny model's saves go to the background writer, as a large one's


def make_data(path, n=150, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = np.sin(x).sum(axis=1, keepdims=True) + 0.1 * x[:, :1] ** 2
    with h5py.File(path + ".tmp", "w") as f:
        f["x"] = x
        f["y"] = y
        f["index"] = np.arange(n, dtype=np.float64)[:, None]
    os.replace(path + ".tmp", path)


def start_fresh(args):
    torch.manual_seed(1234)
    np.random.seed(99)
    model = DropoutNet()
    evaluator = Evaluator(model, {"MSE": torch.nn.MSELoss(), "MAE": torch.nn.L1Loss()})
    if args.wrap:  # the user's own DDP wrapper, around a group the user initialized
        torch.distributed.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(model)
    database = HDF5Database(os.path.abspath(DATA), inputs=["x", "index"], targets=["y"], seed=7, valid_size=0.2,
                            test_size=0.1)
    params = SetupParams(stopping_key="MSE", batch_size=args.batch_size, max_epochs=args.epochs, device=args.device,
                         optimizer=torch.optim.Adam, learning_rate=3e-3,
                         scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9))
    training_modules, controller, metrics = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator), params)
    return {"training_modules": training_modules, "database": database, "controller": controller,
            "metric_tracker": metrics}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--every", type=int, default=0, help="checkpoint_every_batches")
    parser.add_argument("--async", dest="async_save", action="store_true")
    parser.add_argument("--wrap", action="store_true", help="wrap the model in DDP before setup_training")
    parser.add_argument("--fail-save", type=int, default=0, help="rank 0's n-th file write fails (disk full)")
    parser.add_argument("--device", default="cpu", help="SetupParams.device ('auto': each rank's GPU, NCCL)")
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--raise-signal", default=None)
    parser.add_argument("--raise-at", type=int, default=0)
    parser.add_argument("--raise-rank", type=int, default=None, help="only this rank sends itself the signal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if rank == 0 and not os.path.exists(DATA):
        make_data(DATA)
    log = open(f"batches.rank{rank}.log", "a", buffering=1)
    trained = []

    def record(inputs, outputs, targets):
        trained.append(1)
        epoch = check["controller"].position.epoch
        log.write(f"{epoch}: " + " ".join(str(int(i)) for i in inputs[1].flatten().tolist()) + "\n")
        if args.kill_rank == rank and len(trained) == args.kill_at and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.raise_signal and len(trained) == args.raise_at and args.raise_rank in (None, rank):
            os.kill(os.getpid(), signal.Signals[args.raise_signal])

    if args.fail_save and rank == 0:
        from experiment_io.storage import atomic as storage
        writes = []

        def disk_full(step, path):
            if step == "written" and os.path.basename(path).startswith(".last_checkpoint"):
                writes.append(path)
                if len(writes) == args.fail_save:
                    raise OSError(28, "No space left on device")

        failing = storage.observe_write_steps(disk_full)
        failing.__enter__()
    while not os.path.exists(DATA):  # rank 0 writes it
        time.sleep(0.01)
    check = load_checkpoint_from_cwd(missing_ok=True) or start_fresh(args)
    try:
        metrics = train_model(**check, callbacks=None, batch_callbacks=[record], quiet=True,
                              checkpoint_every_batches=args.every, async_save=args.async_save)
    except SystemExit as e:
        with open(f"exit.rank{rank}", "w") as f:
            f.write(str(e.code))
        raise
    if metrics.stop_reason.startswith("interrupted"):
        print(f"INTERRUPTED rank {rank}", flush=True)
        return 0
    controller = check["controller"]
    if rank == 0:
        model = check["training_modules"].model
        save_result(getattr(model, "module", model), controller, metrics)
    print(f"FINISHED rank {rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
