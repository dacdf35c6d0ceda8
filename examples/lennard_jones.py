"""Train on Lennard-Jones cluster energies, get killed, restart, predict.

The end-to-end example of experiment_io. Run it from anywhere::

    python examples/lennard_jones.py

It runs these phases one after the other; each one can also be run alone
(``python examples/lennard_jones.py PHASE``):

``data``
    Generate 2000 perturbed 5-atom Lennard-Jones clusters with numpy and write
    them to ``lj_data.h5``: input ``descriptor`` (the 10 pair distances, sorted,
    so the input does not depend on how the atoms are numbered) and target
    ``energy`` (in units of epsilon). The energy of a pair potential is a function
    of the pair distances alone, so the descriptor determines the target.
``train``
    Train a small network with ``setup_training`` and ``train_model`` in the run
    directory ``experiment/``, from scratch, with checkpoints written in the
    background (``async_save=True``). The full run starts this phase in a
    subprocess and kills it with SIGKILL once a ``last_checkpoint.pt`` is written,
    the way a batch scheduler ends a job at its wall-clock limit.
``restart``
    ``check = load_checkpoint_from_cwd()`` then ``train_model(**check, ...)``:
    training continues from the last checkpoint and runs to the end.
``predict``
    ``load_model_from_cwd(model_device="auto")`` and the energy errors on the
    test split.
``reference``
    Train the same experiment without interruption in ``reference/``.
``compare``
    Check that the killed-and-restarted run ended with exactly the same weights,
    optimizer state and metric history as the reference run.

Everything is written under ``examples/run/`` (``--work-dir`` to change it). The
model lives in ``lj_model.py``, next to this script, because a restart unpickles
it and must be able to import its class.
"""
import argparse
import csv
import functools
import glob
import logging
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import torch

from experiment_io import Evaluator, HDF5Database, SetupParams, TrainingModules, setup_training, train_model
from experiment_io import load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.storage.lock import LOCK_NAME
from experiment_io.storage.manifest import MANIFEST_NAME, read_manifest

EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES_DIR not in sys.path:  # when this file is imported rather than run
    sys.path.insert(0, EXAMPLES_DIR)

from lj_model import LJEnergyNet, MaxAbsError  # noqa: E402  (must be importable as lj_model)

DEFAULT_WORK_DIR = os.path.join(EXAMPLES_DIR, "run")
DATA_NAME = "lj_data.h5"
RUN_NAME = "experiment"
REFERENCE_NAME = "reference"

N_ATOMS = 5
N_CONFIGS = 2000
SEED = 0
# What train_model leaves in a run directory: checkpoint files (and their previous
# generations, *.prev.pt), the manifest, the lock file, temporaries of a killed write.
RUN_FILES = ("*.pt", MANIFEST_NAME, LOCK_NAME, ".*.tmp")


# ---------------------------------------------------------------------------------
# data


def lj_energy_and_distances(positions):
    """Lennard-Jones energy (epsilon = sigma = 1) and sorted pair distances of one cluster."""
    i, j = np.triu_indices(len(positions), k=1)
    distances = np.linalg.norm(positions[i] - positions[j], axis=1)
    inv6 = distances ** -6
    return float(np.sum(4.0 * (inv6 * inv6 - inv6))), np.sort(distances)


def reference_cluster():
    """The minimum-energy 5-atom cluster: a trigonal bipyramid with bond length 2^(1/6)."""
    bond = 2.0 ** (1.0 / 6.0)
    radius = bond / np.sqrt(3.0)
    height = np.sqrt(bond ** 2 - radius ** 2)
    angles = np.array([0.0, 2.0, 4.0]) * np.pi / 3.0
    ring = np.stack([radius * np.cos(angles), radius * np.sin(angles), np.zeros(3)], axis=1)
    return np.concatenate([ring, [[0.0, 0.0, height], [0.0, 0.0, -height]]])


def make_data(path, n_configs=N_CONFIGS, seed=SEED):
    """Random stretched and perturbed clusters; configurations with two atoms closer than 0.9 are redrawn."""
    rng = np.random.default_rng(seed)
    base = reference_cluster()
    descriptors, energies = [], []
    while len(energies) < n_configs:
        positions = base * rng.uniform(0.95, 1.2) + rng.normal(0.0, 0.1, size=base.shape)
        energy, distances = lj_energy_and_distances(positions)
        if distances[0] < 0.9:
            continue
        descriptors.append(distances)
        energies.append(energy)
    descriptors = np.asarray(descriptors, dtype=np.float32)
    energies = np.asarray(energies, dtype=np.float32)[:, None]
    with h5py.File(path, "w") as h5:
        h5.create_dataset("descriptor", data=descriptors)
        h5.create_dataset("energy", data=energies)
        h5.attrs["n_atoms"] = N_ATOMS
        h5.attrs["units"] = "lengths in sigma, energies in epsilon"
    return descriptors, energies


def phase_data(args):
    path = data_path(args)
    os.makedirs(args.work_dir, exist_ok=True)
    descriptors, energies = make_data(path)
    print(f"wrote {len(energies)} clusters of {N_ATOMS} atoms to {path}")
    print(f"  input 'descriptor': {descriptors.shape[1]} sorted pair distances per cluster")
    print(f"  target 'energy': from {energies.min():.3f} to {energies.max():.3f} epsilon "
          f"(mean {energies.mean():.3f}, std {energies.std():.3f}); the minimum of LJ5 is -9.104")


# ---------------------------------------------------------------------------------
# training


def open_database(args):
    return HDF5Database(data_path(args), inputs=["descriptor"], targets=["energy"], seed=SEED,
                        valid_size=0.1, test_size=0.1)


def split_arrays(database, split):
    """All inputs and targets of one split, as CPU tensors."""
    positions = np.arange(database.split_size(split))
    (inputs,), (targets,) = database.get(database.sample_indices(split, positions))
    return inputs, targets


def remove_previous_run(run_dir):
    """Remove the files of an earlier run, so that training starts from scratch."""
    old = sorted({p for pattern in RUN_FILES for p in glob.glob(os.path.join(run_dir, pattern))})
    for path in old:
        os.remove(path)
    if old:
        print(f"removed {len(old)} file(s) of a previous run from {run_dir}")


def phase_train(args, run_name=RUN_NAME):
    run_dir = os.path.join(args.work_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    remove_previous_run(run_dir)
    os.chdir(run_dir)  # the library writes into the current working directory
    database = open_database(args)
    train_inputs, train_targets = split_arrays(database, "train")

    torch.manual_seed(SEED)  # the same initial weights in every run, for the comparison at the end
    model = LJEnergyNet(train_inputs.shape[1], hidden=64,
                        feature_mean=train_inputs.mean(0), feature_std=train_inputs.std(0),
                        energy_mean=train_targets.mean(), energy_std=train_targets.std())
    loss = torch.nn.MSELoss()
    evaluator = Evaluator(model, {"MSE": torch.nn.MSELoss(), "MAE": torch.nn.L1Loss(), "MaxAE": MaxAbsError()})
    params = SetupParams(stopping_key="MSE", batch_size=32, max_epochs=args.epochs,
                         optimizer=torch.optim.Adam, learning_rate=3e-3, device=args.device,
                         scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=2))
    training_modules, controller, metrics = setup_training(TrainingModules(model, loss, evaluator), params)
    print(f"[pid {os.getpid()}] training {args.epochs} epochs on {database.split_size('train')} clusters "
          f"in {run_dir}", flush=True)
    # async_save=True: checkpoints are written by a background thread while training goes on
    train_model(training_modules, database, controller, metrics, callbacks=None, batch_callbacks=None, quiet=True,
                async_save=True)
    print(f"[pid {os.getpid()}] training ended: {metrics.stop_reason}; {metrics.summary()}", flush=True)


def phase_reference(args):
    logging.getLogger("experiment_io").setLevel(logging.WARNING)  # the epochs were shown once already
    phase_train(args, REFERENCE_NAME)


def phase_restart(args):
    run_dir = os.path.join(args.work_dir, RUN_NAME)
    os.chdir(run_dir)
    # The structure file names the class lj_model.LJEnergyNet: the trust gate admits it
    # because lj_model is already imported (see the imports at the top of this file).
    check = load_checkpoint_from_cwd()
    controller = check["controller"]
    print(f"[pid {os.getpid()}] restarting in {run_dir} at epoch {controller.current_epoch} "
          f"of {controller.max_epochs} ({len(check['metric_tracker'].epochs)} epochs already in the metric history)",
          flush=True)
    metrics = train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, async_save=True)
    print(f"[pid {os.getpid()}] training ended: {metrics.stop_reason}; {metrics.summary()}", flush=True)


# ---------------------------------------------------------------------------------
# prediction and comparison


def phase_predict(args):
    run_dir = os.path.join(args.work_dir, RUN_NAME)
    os.chdir(run_dir)
    model = load_model_from_cwd(model_device="auto")
    device = next(model.parameters()).device
    inputs, targets = split_arrays(open_database(args), "test")
    with torch.no_grad():
        predicted = model(inputs.to(device)).cpu()
    errors = (predicted - targets).squeeze(1)
    spread = targets.std().item()
    print(f"best model of {run_dir} on {device}, {len(targets)} test clusters (energies in epsilon):")
    print(f"  MAE  {errors.abs().mean().item():.4f}")
    print(f"  RMSE {errors.pow(2).mean().sqrt().item():.4f}   (standard deviation of the test energies: {spread:.4f})")
    print(f"  max  {errors.abs().max().item():.4f}")
    print("  first clusters:   true   predicted")
    for true, pred in zip(targets[:5, 0].tolist(), predicted[:5, 0].tolist()):
        print(f"               {true:8.3f}  {pred:8.3f}")


def _load_state(run_dir, name):
    # State files hold tensors and plain data only, so they load with weights_only=True.
    return torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)


def _differences(a, b, where=""):
    """Paths at which two nested structures of tensors and plain data differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [where + " (keys)"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [where + " (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}/{i}")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b))
    return [] if same else [where]


def _history(run_dir):
    """The metric history as metrics.csv holds it (every float written exactly), without the wall-clock times."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return [row[:1] + row[2:] for row in csv.reader(f)]


def phase_compare(args):
    run_dir = os.path.join(args.work_dir, RUN_NAME)
    reference_dir = os.path.join(args.work_dir, REFERENCE_NAME)
    resumed, reference = _load_state(run_dir, "last_checkpoint.pt"), _load_state(reference_dir, "last_checkpoint.pt")
    checks = {
        "model weights": (resumed["model"], reference["model"]),
        "optimizer and scheduler state": (resumed["controller"], reference["controller"]),
        "metric history": (_history(run_dir), _history(reference_dir)),
        "best epoch": (resumed["metric_tracker"]["best_epoch"], reference["metric_tracker"]["best_epoch"]),
        "best model": (_load_state(run_dir, "best_model.pt"), _load_state(reference_dir, "best_model.pt")),  # plain state_dicts
    }
    failed = False
    for what, (a, b) in checks.items():
        differences = _differences(a, b)
        print(f"  {what}: {'identical' if not differences else 'DIFFERENT at ' + ', '.join(differences[:5])}")
        failed = failed or bool(differences)
    if failed:
        print("the restarted run differs from the uninterrupted one")
        return 1
    print("the killed and restarted run ended bit-for-bit where the uninterrupted run did")
    return 0


# ---------------------------------------------------------------------------------
# the whole story


def data_path(args):
    return os.path.join(args.work_dir, DATA_NAME)


def run_phase(args, phase):
    """Start ``python lennard_jones.py PHASE`` in a subprocess that can import lj_model."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (EXAMPLES_DIR, env.get("PYTHONPATH")) if p)
    command = [sys.executable, os.path.abspath(__file__), phase, "--work-dir", args.work_dir,
               "--epochs", str(args.epochs), "--device", args.device]
    return subprocess.Popen(command, env=env)


def last_checkpoint_epochs(run_dir):
    """Epochs done in the run's ``last_checkpoint.pt``, from the manifest (``None`` before the first one)."""
    try:
        manifest = read_manifest(run_dir)
    except (OSError, ValueError):
        return None
    record = manifest[1].get("last_checkpoint.pt") if manifest else None
    return None if record is None else record.get("epochs_done")


def train_and_kill(args):
    run_dir = os.path.join(args.work_dir, RUN_NAME)
    os.makedirs(run_dir, exist_ok=True)
    remove_previous_run(run_dir)
    kill_after = max(1, args.epochs // 3)
    print(f"starting the training in a subprocess; it gets SIGKILL once {kill_after} epoch(s) are checkpointed",
          flush=True)
    process = run_phase(args, "train")
    seen = {}  # epochs done -> when the manifest first showed it
    deadline = time.monotonic() + 600
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the training subprocess wrote no checkpoint in 10 minutes; killed it")
        done = last_checkpoint_epochs(run_dir)
        if done is not None and done not in seen:
            seen[done] = time.monotonic()
        if done is not None and done >= kill_after:
            # Kill half-way through the next epoch, as a wall-clock limit would.
            epoch_seconds = seen[done] - seen.get(done - 1, seen[done])
            time.sleep(epoch_seconds / 2)
            process.send_signal(signal.SIGKILL)
            process.wait()
            done = last_checkpoint_epochs(run_dir)
            print(f"SIGKILL sent to pid {process.pid} in the middle of an epoch: last_checkpoint.pt holds "
                  f"{done} finished epoch(s); the batches trained after it are lost", flush=True)
            break
        time.sleep(0.01)
    else:
        if process.returncode != 0:
            raise SystemExit(f"the training subprocess failed with exit code {process.returncode}")
        print("the training finished before it could be killed (the restart will have nothing left to do)")
    leftovers = [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    print(f"files in {run_dir}: {', '.join(sorted(n for n in os.listdir(run_dir) if not n.endswith('.tmp')))}"
          + (f" (and {len(leftovers)} temporary file(s) of an interrupted write, removed at restart)" if leftovers else ""))


def wait_for(process, phase):
    if process.wait() != 0:
        raise SystemExit(f"the {phase} subprocess failed with exit code {process.returncode}")


def phase_all(args):
    started = time.perf_counter()
    print("== 1. data", flush=True)
    phase_data(args)
    print("\n== 2. train, killed part way", flush=True)
    train_and_kill(args)
    print("\n== 3. restart in a new process: load_checkpoint_from_cwd() then train_model(**check, ...)", flush=True)
    wait_for(run_phase(args, "restart"), "restart")
    print("\n== 4. predict with load_model_from_cwd(model_device='auto')", flush=True)
    phase_predict(args)
    print("\n== 5. reference: the same training without interruption", flush=True)
    wait_for(run_phase(args, "reference"), "reference")
    print("\n== 6. compare the restarted run with the reference", flush=True)
    status = phase_compare(args)
    print(f"\ndone in {time.perf_counter() - started:.1f} s; everything is in {args.work_dir}")
    return status


PHASES = {
    "all": phase_all,
    "data": phase_data,
    "train": phase_train,
    "restart": phase_restart,
    "predict": phase_predict,
    "reference": phase_reference,
    "compare": phase_compare,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", nargs="?", default="all", choices=list(PHASES),
                        help="what to run (default: all phases, in order)")
    parser.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                        help=f"where the data and the run directories go (default: {DEFAULT_WORK_DIR})")
    parser.add_argument("--epochs", type=int, default=30, help="epochs to train (default: 30)")
    parser.add_argument("--device", default="cpu", help="training device: cpu, cuda, cuda:N or auto (default: cpu)")
    args = parser.parse_args(argv)
    args.work_dir = os.path.abspath(args.work_dir)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="    %(name)s: %(message)s")
    return PHASES[args.phase](args) or 0


if __name__ == "__main__":
    sys.exit(main())
