"""hippynn's barebones example, trained by experiment_io: interrupted, resumed, predicted.

Needs hippynn (``pip install 'experiment_io[hippynn]'``). Runs in a few seconds on two
CPU cores, on a small synthetic data set instead of QM7::

    python examples/hippynn_port.py            # all steps, each in its own process
    python examples/hippynn_port.py train      # or one step: train, resume, predict

1. ``train`` builds the HIP-NN graph as hippynn's barebones example does and trains
   it with experiment_io; a SIGTERM (what a scheduler sends at a time limit) arrives
   in the second epoch: a checkpoint is written and the process exits with status 75.
2. ``resume`` assembles the graph again, as a new job would, and continues the run.
3. ``predict`` loads the best model and predicts energies.
"""
import os
import signal
import subprocess
import sys

os.environ.setdefault("HIPPYNN_USE_CUSTOM_KERNELS", "_pytorch_raw")  # no torch.compile: starts at once on a CPU

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(HERE, "run", "hippynn_port")


def make_data(n=200, atoms=5, seed=0):
    """Clusters of two species with a pairwise energy: ``Z`` (species), ``R`` (positions), ``T`` (energy)."""
    rng = np.random.default_rng(seed)
    species = rng.choice([1, 6], size=(n, atoms)).astype(np.int64)
    positions = (rng.normal(scale=0.6, size=(n, atoms, 3)) + np.arange(atoms)[None, :, None] * 1.4).astype(np.float32)
    distances = np.linalg.norm(positions[:, :, None] - positions[:, None], axis=-1) + np.eye(atoms)
    energy = (np.exp(-distances) * (1 - np.eye(atoms))).sum(axis=(1, 2)) / 2 + 0.05 * species.sum(axis=1)
    return {"Z": species, "R": positions, "T": energy[:, None].astype(np.float32)}


def assemble():
    # --- the port: hippynn's graph, as in its barebones example
    import hippynn
    from hippynn.graphs import inputs, loss, networks, targets

    network_params = {"possible_species": [0, 1, 6], "n_features": 10, "n_sensitivities": 10, "dist_soft_min": 0.7,
                      "dist_soft_max": 4.0, "n_interaction_layers": 1, "n_atom_layers": 2, "dist_hard_max": 5.0}
    species = inputs.SpeciesNode(db_name="Z")
    positions = inputs.PositionsNode(db_name="R")
    network = networks.Hipnn("hipnn_model", (species, positions), module_kwargs=network_params)
    henergy = targets.HEnergyNode("HEnergy", network, db_name="T")
    mse_energy = loss.MSELoss.of_node(henergy)
    validation_losses = {"RMSE": mse_energy ** (1 / 2), "MAE": loss.MAELoss.of_node(henergy), "MSE": mse_energy}
    training_modules, db_info = hippynn.experiment.assemble_for_training(mse_energy, validation_losses)
    return training_modules, db_info
    # --- end of the graph


def train():
    from experiment_io import Database, SetupParams, setup_training, train_model

    torch.manual_seed(0)
    training_modules, db_info = assemble()
    # --- the port: an experiment_io database and training instead of hippynn's setup_and_train
    database = Database(make_data(), seed=2001, test_size=0.1, valid_size=0.1, **db_info)
    params = SetupParams(stopping_key="MSE", batch_size=12, optimizer=torch.optim.Adam, max_epochs=6, learning_rate=3e-3)
    training_modules, controller, metric_tracker = setup_training(training_modules, params)
    # --- end of the port
    batches = []

    def preempt_in_epoch_two(*_):  # a scheduler's time limit, for the example
        batches.append(1)
        if len(batches) == 20:
            os.kill(os.getpid(), signal.SIGTERM)

    os.makedirs(RUN, exist_ok=True)
    train_model(training_modules, database, controller, metric_tracker, None, [preempt_in_epoch_two],
                directory=RUN, overwrite=True)


def resume():
    from experiment_io import Database, load_checkpoint_from_cwd, train_model

    _, db_info = assemble()  # a new job assembles the graph again: its input order may differ; the run realigns
    database = Database(make_data(), seed=2001, test_size=0.1, valid_size=0.1, **db_info)
    check = load_checkpoint_from_cwd(directory=RUN, allow=["hippynn"], database=database)
    print(f"resuming at epoch {check['controller'].position.epoch}, sample {check['controller'].position.samples_done}")
    train_model(**check, callbacks=None, batch_callbacks=None)


def predict():
    from experiment_io import load_model_from_cwd

    model = load_model_from_cwd(directory=RUN, allow=["hippynn"], model_device="auto")
    data = make_data(n=4, seed=1)
    device = next(model.parameters()).device
    with torch.no_grad():
        # the model takes its inputs in the order of its input nodes (db_info["inputs"])
        by_name = {"Z": torch.as_tensor(data["Z"], device=device), "R": torch.as_tensor(data["R"], device=device)}
        energy = model(*(by_name[node.db_name] for node in model.input_nodes))[0]
    for predicted, true in zip(energy.flatten().tolist(), data["T"].flatten().tolist()):
        print(f"predicted {predicted:8.4f}   true {true:8.4f}")


def main(argv):
    steps = {"train": train, "resume": resume, "predict": predict}
    if argv:
        steps[argv[0]]()
        return 0
    for step, expected in (("train", 75), ("resume", 0), ("predict", 0)):
        print(f"== {step}", flush=True)
        status = subprocess.run([sys.executable, os.path.abspath(__file__), step]).returncode
        if status != expected:
            print(f"{step} ended with status {status}, expected {expected}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
