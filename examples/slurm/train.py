"""One training script for the first allocation and every requeued one.

Run it in the run directory (or name it with ``--run-dir``)::

    python examples/slurm/train.py --run-dir RUN_DIR [--data lj_data.h5] [--epochs 30]

When ``RUN_DIR`` holds no checkpoint it sets up the Lennard-Jones experiment of
``examples/lennard_jones.py`` from the beginning; when it holds one it resumes
from it. Both cases are one line::

    check = load_checkpoint_from_cwd(missing_ok=True) or start_fresh(args)

``train_model`` then writes ``last_checkpoint.pt`` after every epoch and every
``--checkpoint-every-seconds`` (or ``--checkpoint-every-batches``). On SIGUSR1
or SIGTERM it finishes the current batch, writes a mid-epoch checkpoint and exits
with status 75 (:data:`experiment_io.PREEMPTED_EXIT_CODE`): the job
script (``job.sbatch``) requeues the job on that status. When training is complete the
script writes ``final_result.pt`` (final weights, optimizer and scheduler state,
metric history, best epoch, test errors), which ``local_driver.py`` compares
between an interrupted and an uninterrupted run. It loads with
``torch.load(path, weights_only=True)``.

Exit status: 0 when training is complete, 75 when it stopped on a signal after
saving its checkpoint, anything else on an error.
"""
import logging
import os
import signal
import sys

# When run as a script, install a handler for the scheduler's signals before
# anything slow is imported: a SIGUSR1/SIGTERM with its default action would kill
# the process with status 128+N instead of 75, and the job script would not
# requeue. A signal that comes before train_model takes over makes the script exit
# with 75 right after the checkpoint is loaded, before any training. (Nothing is
# installed when local_driver.py imports this file for its helpers.)
_EARLY_SIGNALS = []


def _early_signal(signum, frame):
    _EARLY_SIGNALS.append(signal.Signals(signum).name)


if __name__ == "__main__":
    for _signal in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(_signal, _early_signal)

import argparse  # noqa: E402
import functools  # noqa: E402
import socket  # noqa: E402

import torch  # noqa: E402

SLURM_DIR = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_DIR = os.path.dirname(SLURM_DIR)
if EXAMPLES_DIR not in sys.path:
    # lj_model must be importable under the name ``lj_model``: the structure file
    # refers to lj_model.LJEnergyNet, and the trust gate admits it because the
    # module is imported below, before the checkpoint is loaded.
    sys.path.insert(0, EXAMPLES_DIR)

import lennard_jones  # noqa: E402  (data generation and helpers of the end-to-end example)
from lj_model import LJEnergyNet, MaxAbsError  # noqa: E402

from experiment_io import Evaluator, HDF5Database, SetupParams, TrainingModules, setup_training, train_model  # noqa: E402
from experiment_io import PREEMPTED_EXIT_CODE  # noqa: E402
from experiment_io import load_checkpoint_from_cwd  # noqa: E402

log = logging.getLogger("train")

RESULT_NAME = "final_result.pt"
DEFAULTS = {"n_configs": 2000, "epochs": 30, "batch_size": 32, "hidden": 64, "learning_rate": 3e-3}


def ensure_data(path, n_configs):
    """Write the Lennard-Jones data set to ``path`` unless it is there already.

    It is written to a temporary name and renamed, so that a job killed while
    writing it leaves no half-written file behind.
    """
    if os.path.exists(path):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    lennard_jones.make_data(temporary, n_configs=n_configs)
    os.replace(temporary, path)
    log.info("wrote %d Lennard-Jones clusters to %s", n_configs, path)
    return True


def open_database(path):
    """The database of the example: the same seed and split as ``lennard_jones.py``."""
    return HDF5Database(path, inputs=["descriptor"], targets=["energy"], seed=lennard_jones.SEED,
                        valid_size=0.1, test_size=0.1)


def start_fresh(args):
    """Set up the experiment from the beginning; the same arguments as ``train_model`` takes."""
    ensure_data(args.data, args.n_configs)
    database = open_database(args.data)
    train_inputs, train_targets = lennard_jones.split_arrays(database, "train")
    torch.manual_seed(lennard_jones.SEED)  # the same initial weights in every fresh run
    model = LJEnergyNet(train_inputs.shape[1], hidden=args.hidden,
                        feature_mean=train_inputs.mean(0), feature_std=train_inputs.std(0),
                        energy_mean=train_targets.mean(), energy_std=train_targets.std())
    evaluator = Evaluator(model, {"MSE": torch.nn.MSELoss(), "MAE": torch.nn.L1Loss(), "MaxAE": MaxAbsError()})
    params = SetupParams(stopping_key="MSE", batch_size=args.batch_size, max_epochs=args.epochs,
                         optimizer=torch.optim.Adam, learning_rate=args.learning_rate, device=args.device,
                         scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=2))
    training_modules, controller, metric_tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator), params)
    log.info("no checkpoint in %s: starting a new run of %d epochs on %d training clusters",
             os.getcwd(), args.epochs, database.split_size("train"))
    return {"training_modules": training_modules, "database": database, "controller": controller,
            "metric_tracker": metric_tracker}


def write_result(check, metric_tracker, path):
    """Save what an uninterrupted run must reproduce exactly (no times, no job ids)."""
    training_modules, database, controller = check["training_modules"], check["database"], check["controller"]
    state = metric_tracker.state_dict()
    result = {
        "model": training_modules.model.state_dict(),
        "controller": controller.state_dict(),  # optimizer, LR scheduler, epoch counter
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "best_model": metric_tracker.best_model_state,
        "stop_reason": metric_tracker.stop_reason,
        "test": training_modules.evaluator.evaluate("test", database=database),
    }
    temporary = f"{path}.{os.getpid()}.tmp"
    torch.save(result, temporary)
    os.replace(temporary, path)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=".", help="the run directory (default: the current directory)")
    parser.add_argument("--data", default=None,
                        help="the HDF5 data file, written if missing (default: lj_data.h5 beside the run directory)")
    parser.add_argument("--checkpoint-every-seconds", type=float, default=600.0,
                        help="also write a mid-epoch checkpoint this often (default: 600)")
    parser.add_argument("--checkpoint-every-batches", type=int, default=0,
                        help="also write a mid-epoch checkpoint every this many batches (default: 0, never)")
    parser.add_argument("--requeue", action="store_true",
                        help="let train_model run 'scontrol requeue' itself after a signal (leave it off with "
                             "job.sbatch, which requeues on exit status 75)")
    new_run = parser.add_argument_group("a new run (ignored when resuming: the checkpoint has them)")
    new_run.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    new_run.add_argument("--n-configs", type=int, default=DEFAULTS["n_configs"],
                         help="clusters in the data file when it is written")
    new_run.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    new_run.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    new_run.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    new_run.add_argument("--device", default="cpu",
                         help="where the model trains: cpu, cuda or auto (each rank's GPU in a data-parallel run)")
    args = parser.parse_args(argv)
    args.run_dir = os.path.abspath(args.run_dir)
    if args.data is None:
        args.data = os.path.join(os.path.dirname(args.run_dir), lennard_jones.DATA_NAME)
    args.data = os.path.abspath(args.data)
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [pid {os.getpid()}] %(name)s: %(message)s")
    log.info("SLURM_JOB_ID=%s SLURM_RESTART_COUNT=%s host=%s run directory %s",
             os.environ.get("SLURM_JOB_ID", "(not under SLURM)"), os.environ.get("SLURM_RESTART_COUNT", "0"),
             socket.gethostname(), args.run_dir)
    os.makedirs(args.run_dir, exist_ok=True)
    os.chdir(args.run_dir)  # the library reads and writes the current working directory

    check = load_checkpoint_from_cwd(missing_ok=True) or start_fresh(args)

    controller = check["controller"]
    position = controller.position  # restored by the loader
    if position.step > 0:
        log.info("resuming from the checkpoint at epoch %d of %d, %d samples into it (step %d)",
                 position.epoch, controller.max_epochs, position.samples_done, position.step)
    if _EARLY_SIGNALS:
        log.warning("%s arrived before training started: nothing new to save, exiting with status %d",
                    ", ".join(_EARLY_SIGNALS), PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    # SIGUSR1/SIGTERM from here on: train_model saves a checkpoint and raises SystemExit(75).
    metric_tracker = train_model(**check, callbacks=None, batch_callbacks=None, quiet=True,
                                 checkpoint_every_seconds=args.checkpoint_every_seconds,
                                 checkpoint_every_batches=args.checkpoint_every_batches, requeue=args.requeue)
    if metric_tracker.stop_reason and metric_tracker.stop_reason.startswith("interrupted"):
        # Only SIGINT (Ctrl-C) returns here: the checkpoint is saved, the run is not finished.
        log.warning("%s: checkpoint saved, run this script again to resume", metric_tracker.stop_reason)
        return PREEMPTED_EXIT_CODE
    if _EARLY_SIGNALS:
        # Came while train_model was starting (taking the lock, writing the structure
        # file) before its own handlers were installed, or after it had restored
        # ours: training went on, or was over, regardless.
        log.warning("%s arrived outside train_model's signal handling and was not acted on", ", ".join(_EARLY_SIGNALS))
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        return 0  # data-parallel: global rank 0 writes the result
    result = write_result(check, metric_tracker, os.path.join(args.run_dir, RESULT_NAME))
    log.info("training complete (%s); best epoch %s; test %s; wrote %s", result["stop_reason"], result["best_epoch"],
             ", ".join(f"{k}={v:.4g}" for k, v in result["test"].items()), RESULT_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
