"""A tiny HIP-NN (hippynn's network) trained by experiment_io or by hippynn itself, for the tests.

    python hippynn_driver.py train DIR --epochs N [--kill-at-batch K] [--reverse-inputs]
        start or resume (the start-or-resume one-liner) with experiment_io's train_model,
        a checkpoint after every batch; with --kill-at-batch, SIGKILL itself after batch K
    python hippynn_driver.py hippynn-train DIR --epochs N
        train with hippynn's own train_model (writes a hippynn run directory)

hippynn's torch.compile kernels are switched off (HIPPYNN_USE_CUSTOM_KERNELS=_pytorch_raw).
"""
import argparse
import os
import signal
import sys
import warnings

os.environ.setdefault("HIPPYNN_USE_CUSTOM_KERNELS", "_pytorch_raw")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def arrays(n=48, atoms=4):
    rng = np.random.default_rng(0)
    species = rng.choice([1, 2], size=(n, atoms)).astype(np.int64)
    positions = (rng.normal(scale=0.8, size=(n, atoms, 3)) + np.arange(atoms)[None, :, None] * 1.5).astype(np.float32)
    energy = (species.sum(axis=1, keepdims=True) * 0.1 + (positions ** 2).sum(axis=(1, 2))[:, None] * 0.01)
    return {"Z": species, "R": positions, "T": energy.astype(np.float32)}


def assemble():
    """The HIP-NN graph of hippynn's barebones example, tiny: modules, db_info, energy node."""
    import hippynn
    from hippynn.graphs import inputs, loss, networks, targets

    torch.manual_seed(0)
    species = inputs.SpeciesNode(db_name="Z")
    positions = inputs.PositionsNode(db_name="R")
    params = dict(possible_species=[0, 1, 2], n_features=8, n_sensitivities=8, dist_soft_min=0.5, dist_soft_max=3.0,
                  dist_hard_max=4.0, n_interaction_layers=1, n_atom_layers=1)
    network = networks.Hipnn("hipnn_model", (species, positions), module_kwargs=params)
    energy = targets.HEnergyNode("HEnergy", network, db_name="T")
    mse = loss.MSELoss.of_node(energy)
    validation = {"RMSE": mse ** (1 / 2), "MAE": loss.MAELoss.of_node(energy), "MSE": mse}
    training_modules, db_info = hippynn.experiment.assemble_for_training(mse, validation)
    return training_modules, db_info


def train(args):
    from experiment_io import Database, SetupParams, load_checkpoint_from_cwd, setup_training, train_model

    # every process assembles the graph again, as a hippynn script does: the order of its inputs (and so of
    # db_info's) may differ from the run's; --reverse-inputs makes sure it does
    training_modules, db_info = assemble()
    names = list(reversed(db_info["inputs"])) if args.reverse_inputs else db_info["inputs"]
    database = Database(arr_dict=arrays(), inputs=names, targets=db_info["targets"], seed=1, test_size=0.1,
                        valid_size=0.2, quiet=True)

    def start_fresh():
        nonlocal training_modules
        params = SetupParams(stopping_key="MSE", batch_size=8, max_epochs=args.epochs, learning_rate=1e-2)
        training_modules, controller, metric_tracker = setup_training(training_modules, params)
        return dict(training_modules=training_modules, database=database, controller=controller,
                    metric_tracker=metric_tracker)

    batches = []

    def kill(*_):
        batches.append(1)
        if args.kill_at_batch and len(batches) == args.kill_at_batch:
            os.kill(os.getpid(), signal.SIGKILL)

    os.makedirs(args.directory, exist_ok=True)
    check = load_checkpoint_from_cwd(directory=args.directory, allow=["hippynn"], database=database,
                                     missing_ok=True) or start_fresh()
    train_model(**check, callbacks=None, batch_callbacks=[kill], quiet=True, checkpoint_every_batches=1,
                directory=args.directory)


def hippynn_train(args):
    import hippynn
    from hippynn.experiment import SetupParams, setup_and_train

    training_modules, db_info = assemble()
    database = hippynn.databases.Database(arrays(), seed=1, test_size=0.1, valid_size=0.2, quiet=True, **db_info)
    os.makedirs(args.directory, exist_ok=True)
    os.chdir(args.directory)
    setup_and_train(training_modules=training_modules, database=database,
                    setup_params=SetupParams(stopping_key="MSE", batch_size=8, max_epochs=args.epochs,
                                             optimizer=torch.optim.Adam, learning_rate=1e-2))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "hippynn-train"])
    parser.add_argument("directory")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--kill-at-batch", type=int, default=0)
    parser.add_argument("--reverse-inputs", action="store_true")
    args = parser.parse_args(argv)
    (train if args.mode == "train" else hippynn_train)(args)


if __name__ == "__main__":
    sys.exit(main())
