"""Mid-epoch resume inside one process: the position is counted in samples."""
import os
import signal

import numpy as np
import torch

from experiment_io import Database, Evaluator, SetupParams, TrainingModules, setup_training, train_model
from experiment_io.loading.loaders import load_checkpoint_from_cwd
from experiment_io.storage.manifest import read_manifest

from helpers import make_arrays


class IndexedNet(torch.nn.Module):
    """Takes the sample index as a second input (and ignores it), so callbacks can see which samples were trained."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def forward(self, x, idx):
        return self.layer(x)


def indexed_database():
    return Database(make_arrays(300), ["x", "idx"], ["y"], seed=3, valid_size=0.1, test_size=0.1)


def test_batch_size_changed_between_save_and_restart_sees_each_remaining_sample_once(tmp_path):
    database = indexed_database()
    model = IndexedNet()
    evaluator = Evaluator(model, {"mse": torch.nn.MSELoss()})
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                                             SetupParams(stopping_key="mse", batch_size=16, max_epochs=2))
    seen = []  # (epoch, batch of sample indices)

    def record_and_interrupt(inputs, outputs, targets):
        seen.append((controller.current_epoch, inputs[1].tolist()))
        if controller.current_epoch == 1 and sum(1 for e, _ in seen if e == 1) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the 5th batch of epoch 1

    tracker = train_model(tm, database, controller, tracker, None, [record_and_interrupt], quiet=True, directory=str(tmp_path))
    assert tracker.stop_reason == "interrupted by SIGINT"
    before = [i for e, batch in seen if e == 1 for i in batch]
    assert len(before) == 5 * 16

    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    assert check["controller"].position.samples_done == 80
    check["controller"].batch_size = 24
    after_batches = []
    train_model(**check, callbacks=None, batch_callbacks=[lambda i, o, t: after_batches.append(i[1].tolist())],
                quiet=True, directory=str(tmp_path))
    after = [i for batch in after_batches for i in batch]

    expected = database.sample_indices("train", database.epoch_order(1)).tolist()
    assert before + after == expected  # the epoch's order, each remaining sample exactly once
    assert sorted(before + after) == sorted(database.splits["train"].tolist())
    assert all(len(b) == 24 for b in after_batches[:-1])
    assert len(set(before) & set(after)) == 0


def test_epoch_order_differs_between_epochs_and_is_reproducible():
    database = indexed_database()
    assert not np.array_equal(database.epoch_order(0), database.epoch_order(1))
    assert np.array_equal(database.epoch_order(4), indexed_database().epoch_order(4))


def test_signal_during_setup_still_ends_in_a_checkpoint(tmp_path, monkeypatch):
    """A scheduler signal that arrives before the first batch (while the run is set up)."""
    from experiment_io.training import checkpointing

    real_init = checkpointing.RunCheckpointer.__init__

    def init_then_signal(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(checkpointing.RunCheckpointer, "__init__", init_then_signal)
    database = indexed_database()
    model = IndexedNet()
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), Evaluator(model, {"mse": torch.nn.MSELoss()})),
                                             SetupParams(stopping_key="mse", batch_size=16, max_epochs=2))
    trained = []
    tracker = train_model(tm, database, controller, tracker, None, [lambda *a: trained.append(1)], quiet=True,
                          directory=str(tmp_path), exit_on_preemption=False)
    assert tracker.stop_reason == "interrupted by SIGUSR1"
    assert trained == []  # stopped before the first batch
    record = read_manifest(str(tmp_path))[1]["last_checkpoint.pt"]
    assert record["interrupted"] == "SIGUSR1" and record["step"] == 0
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the previous handler is back


def test_a_compiled_model_trains_and_its_files_hold_the_plain_model(tmp_path):
    from experiment_io import load_model_from_cwd

    database = indexed_database()
    torch.manual_seed(0)
    model = IndexedNet()
    compiled = torch.compile(model, backend="eager")
    evaluator = Evaluator(compiled, {"mse": torch.nn.MSELoss()})
    tm, controller, tracker = setup_training(TrainingModules(compiled, torch.nn.MSELoss(), evaluator),
                                             SetupParams(stopping_key="mse", batch_size=16, max_epochs=2))
    train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path))
    loaded = load_model_from_cwd(directory=str(tmp_path))
    assert type(loaded) is IndexedNet
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tracker.best_model_state.items())
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    assert check["training_modules"].model is check["training_modules"].evaluator.model
    assert all(torch.equal(check["training_modules"].model.state_dict()[k], v) for k, v in model.state_dict().items())
