"""Checkpoints as a cache for re-runs (experiment_io.lineage): blocks, forks, rollbacks, the cache, kills."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiment_io import load_model_from_cwd
from experiment_io.frontends.cli import main as cli_main
from experiment_io.errors import CheckpointNotFoundError, IncompatibleCheckpointError, SetupError
from experiment_io.frontends.lineage import Model, metric
from experiment_io.frontends.lineage.records import BACKUP_NAME, PROGRESS_NAME
from experiment_io.storage.manifest import manifest_path, read_manifest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "lineage_notebook.py")
CALLS = {"metric": 0}


@metric("accuracy")
def metric_accuracy(outputs, targets):
    CALLS["metric"] += 1
    return (outputs.argmax(dim=-1) == targets).sum().item()


@metric("flat", higher_is_better=True)
def metric_flat(outputs, targets):
    """The same value every epoch: the first epoch stays the best (an epoch must be strictly better)."""
    return float(targets.shape[0])


def loaders(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 5, generator=generator)
    y = (x[:, 0] + x[:, 2] > 0).long()
    return (DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32))


def new_model(root, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return Model("net", net, "test model", root=root, quiet=True)


def first_block(model, train_dl, test_dl, epochs=3, **train_args):
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01),
                 epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR, epoch_scheduler_args=dict(step_size=1, gamma=0.5))
        result = cp.train(train_dl, test_dl, watch="accuracy", epochs=epochs, metrics=[metric_accuracy], **train_args)
    return result


def two_blocks(root, train_dl, test_dl, first_epochs):
    """A model with checkpoint 1 (``first_block``) and checkpoint 2 (one epoch more) trained."""
    model = new_model(root)
    first_block(model, train_dl, test_dl, epochs=first_epochs)
    with model.checkpoint(2) as cp:
        cp.train(train_dl, test_dl, epochs=1)
    return model


def params(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_returns_cached_results_and_restores_the_end_state(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    first = first_block(model, train_dl, test_dl)
    end = params(model)
    end_lr = model.optimizer.param_groups[0]["lr"]
    after = torch.rand(4)
    assert len(first["history"]["epoch"]) == 3 and model.current == "1" and model.epoch == 3

    CALLS["metric"] = 0
    again = new_model(tmp_path, seed=1)  # a re-run builds the model again (other initial weights here)
    assert not same(params(again), end)
    second = first_block(again, train_dl, test_dl)
    assert CALLS["metric"] == 0  # nothing trained or evaluated
    assert second == first
    assert same(params(again), end)
    assert again.optimizer.param_groups[0]["lr"] == end_lr == 0.01 * 0.5 ** 3
    assert again.epoch_scheduler.last_epoch == 3 and again.epoch == 3
    assert torch.equal(torch.rand(4), after)  # the random streams continue as after the training


def test_a_third_train_call_trains_only_the_third(tmp_path):
    train_dl, test_dl = loaders()

    def block(model, calls):
        with model.checkpoint("a") as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
            return [cp.train(train_dl, test_dl, epochs=1, metrics=[metric_accuracy]) for _ in range(calls)]

    two = block(new_model(tmp_path), 2)
    CALLS["metric"] = 0
    model = new_model(tmp_path)
    three = block(model, 3)
    assert three[:2] == two
    assert three[2]["history"]["epoch"] == [3]
    assert CALLS["metric"] == 4 + 1  # the third call alone: 4 training batches, 1 validation batch
    # the same three calls without a cache give the same model
    reference = new_model(tmp_path / "reference")
    block(reference, 3)
    assert same(params(reference), params(model))


def test_setup_that_no_longer_fits_is_an_error_naming_the_fix(tmp_path):
    train_dl, test_dl = loaders()
    first_block(new_model(tmp_path), train_dl, test_dl, epochs=1)
    model = new_model(tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match=r"Adam.*SGD.*delete_checkpoint\('1'\)") as error:
        with model.checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.01),
                     epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR,
                     epoch_scheduler_args=dict(step_size=1, gamma=0.5))
    assert "optimizer" in str(error.value)
    model.delete_checkpoint("1")  # the suggested fix
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.01))
        cp.train(train_dl, test_dl, epochs=1)
    assert isinstance(model.optimizer, torch.optim.SGD)


def test_setup_rules(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    with model.checkpoint(1) as cp:
        with pytest.raises(SetupError, match="needs a loss and an optimizer"):
            cp.train(train_dl, test_dl, epochs=1)
    model = new_model(tmp_path / "b")
    with pytest.raises(SetupError, match="at most once"):
        with model.checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.MSELoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
            cp.setup(optimizer_cls=torch.optim.Adam)
    model = new_model(tmp_path / "c")
    with pytest.raises(SetupError, match="before train"):
        with model.checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
            cp.train(train_dl, epochs=1)
            cp.setup(optimizer_args=dict(lr=0.2))
    with pytest.raises(SetupError, match="plain data"):
        with new_model(tmp_path / "d").checkpoint(1) as cp:
            cp.setup(optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=torch.tensor(0.1)))
    with pytest.raises(SetupError, match="optimizer_cls must be"):
        with new_model(tmp_path / "e").checkpoint(1) as cp:
            cp.setup(optimizer_cls=torch.nn.Linear)
    with pytest.raises(SetupError, match="id"):
        new_model(tmp_path).checkpoint("../x")
    with pytest.raises(SetupError, match="watch"):
        with new_model(tmp_path / "f").checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
            cp.train(train_dl, epochs=1, watch="accuracy")


def test_omitted_components_carry_over_with_their_state(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    first_block(model, train_dl, test_dl, epochs=2)
    adam_state = {k: v["exp_avg"].clone() for k, v in model.optimizer.state_dict()["state"].items()}
    with model.checkpoint(2) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss)  # optimizer and scheduler carried over
        assert isinstance(model.optimizer, torch.optim.Adam)
        assert all(torch.equal(model.optimizer.state_dict()["state"][k]["exp_avg"], v) for k, v in adam_state.items())
        assert model.epoch_scheduler.last_epoch == 2
        cp.train(train_dl, test_dl, epochs=1)
    with model.checkpoint(3) as cp:  # a new optimizer: the scheduler is rebuilt on it and keeps its count
        cp.setup(optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.2))
        assert model.epoch_scheduler.optimizer is model.optimizer and model.epoch_scheduler.last_epoch == 3
    with model.checkpoint(4) as cp:
        cp.setup(clear_epoch_scheduler=True)
        assert model.epoch_scheduler is None


def test_load_best_keeps_the_scheduler_and_backup_rollback(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1),
                 epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR, epoch_scheduler_args=dict(step_size=1, gamma=0.5))
        result = cp.train(train_dl, test_dl, watch="flat", load_best=True, epochs=3, metrics=[metric_flat])
        assert result["best_epoch"] == 1
        best_after_one = load_model_from_cwd(directory=model.checkpoint_directory(1)).state_dict()
        assert same(params(model), best_after_one)  # ended on the best epoch's model
        assert model.optimizer.param_groups[0]["lr"] == 0.1 * 0.5 ** 3  # but the scheduler's learning rate
        second = cp.train(train_dl, test_dl, watch="flat", load_best=False, epochs=3, metrics=[metric_flat])
    assert second["history"]["lr"] == [0.1 * 0.5 ** 3, 0.1 * 0.5 ** 4, 0.1 * 0.5 ** 5]
    assert second["best_epoch"] == 4
    directory = model.checkpoint_directory(1)
    assert BACKUP_NAME in read_manifest(directory)[1]
    end = params(model)
    best = load_model_from_cwd(directory=directory).state_dict()  # the prediction model is the best epoch's
    assert not same(end, best)

    fresh = new_model(tmp_path)  # a fresh session rolls back without running the block
    fresh.load_checkpoint(1, from_backup=True)
    assert same(params(fresh), best)
    assert fresh.epoch_scheduler.last_epoch == 4 and fresh.epoch == 4
    fresh.load_checkpoint(1, from_backup=True, load_schedulers=False)
    assert same(params(fresh), best)
    assert fresh.epoch_scheduler.last_epoch == 0  # as built from the recipe
    fresh.load_checkpoint(1)
    assert same(params(fresh), end) and fresh.epoch == 6 and fresh.epoch_scheduler.last_epoch == 6
    assert isinstance(fresh.optimizer, torch.optim.SGD) and fresh.current == "1"


def test_fork_tree_and_parent_check(tmp_path, capsys):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    first_block(model, train_dl, test_dl, epochs=1)
    for cp_id in (2, 3):
        model.load_checkpoint(1)
        with model.checkpoint(cp_id) as cp:
            cp.train(train_dl, test_dl, epochs=cp_id - 1)
    with model.checkpoint(4, description="from 3") as cp:
        cp.train(train_dl, epochs=1)
    text = model.tree()
    lines = text.splitlines()
    assert lines[0] == "net: test model"
    assert lines[1].startswith("└── 1 ")
    assert lines[2].startswith("    ├── 2 ") and lines[3].startswith("    └── 3 ")
    assert lines[4].startswith("        └── 4 \"from 3\"")
    assert cli_main(["lineage", str(tmp_path / "net")]) == 0
    assert capsys.readouterr().out.strip() == text  # the same tree, read from the files alone
    assert model.checkpoints() == ["1", "2", "3", "4"]
    # a re-run that reaches checkpoint 3 from checkpoint 2 is refused
    model.load_checkpoint(2)
    with pytest.raises(IncompatibleCheckpointError, match=r"continued from checkpoint 1.*load_checkpoint\('1'\)"):
        with model.checkpoint(3) as cp:
            cp.train(train_dl, test_dl, epochs=2)


def test_cache_computes_once_and_deletes(tmp_path):
    train_dl, test_dl = loaders()
    model = two_blocks(tmp_path, train_dl, test_dl, first_epochs=2)
    at_two = params(model)
    CALLS["metric"] = 0
    evaluation = model.cache(1).evaluate(test_dl, metrics=[metric_accuracy])
    assert CALLS["metric"] == 1 and set(evaluation) == {"loss", "accuracy"}
    assert same(params(model), at_two) and model.current == "2"  # checkpoint 1 was evaluated on a copy
    reference = new_model(tmp_path)
    reference.load_checkpoint(1)
    reference_loss = torch.nn.functional.cross_entropy(reference.model(test_dl.dataset.tensors[0]),
                                                       test_dl.dataset.tensors[1]).item()
    assert evaluation["loss"] == pytest.approx(reference_loss, rel=1e-5)
    state = torch.get_rng_state()
    found = model.cache(1).find_lr(train_dl, optimizer_cls=torch.optim.SGD, epochs=2)
    assert torch.equal(torch.get_rng_state(), state)  # computing drew nothing from the streams that follow
    assert len(found["lrs"]) == len(found["losses"]) and found["lrs"][0] == 1e-8
    assert found["suggested_lr"] in found["lrs"]
    assert same(params(model), at_two)
    live = {k: v["exp_avg"].clone() for k, v in model.optimizer.state_dict()["state"].items()}
    model.cache(2).find_lr(train_dl)  # the checkpoint's own optimizer (Adam), with its state, on copies
    assert all(torch.equal(model.optimizer.state_dict()["state"][k]["exp_avg"], v) for k, v in live.items())
    assert model.cache(1).evaluate(test_dl, metrics=[metric_accuracy]) == evaluation
    assert model.cache(1).find_lr(train_dl, optimizer_cls=torch.optim.SGD, epochs=2) == found
    assert CALLS["metric"] == 1
    assert model.cache(1).names() == ["evaluate", "find_lr"] and model.cache(2).names() == ["find_lr"]
    model.cache(1).delete("evaluate")
    assert model.cache(1).names() == ["find_lr"]
    model.cache(1).evaluate(test_dl, metrics=[metric_accuracy])
    assert CALLS["metric"] == 2
    model.cache(1).delete()
    assert model.cache(1).names() == [] and model.cache(1).get("find_lr") is None
    with pytest.raises(CheckpointNotFoundError, match="run its block first"):
        model.cache(9).evaluate(test_dl)
    model.delete_checkpoint(1)
    assert not os.path.exists(model.checkpoint_directory(1)) and model.checkpoints() == ["2"]
    model.delete()
    assert not os.path.exists(tmp_path / "net")


def test_an_interrupted_block_is_not_taken_for_a_finished_one(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    with pytest.raises(RuntimeError, match="stop"):
        with model.checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
            cp.train(train_dl, test_dl, epochs=1)
            raise RuntimeError("stop")
    assert "UNFINISHED" in model.tree()
    with pytest.raises(CheckpointNotFoundError, match="never ran to its end"):
        new_model(tmp_path).load_checkpoint(1)
    again = new_model(tmp_path)
    with again.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
        cp.train(train_dl, test_dl, epochs=1)
    assert "UNFINISHED" not in again.tree()
    again.load_checkpoint(1)


def test_progress_saves_resume_exactly_in_process(tmp_path):
    """A train() call whose process stopped after a mid-epoch progress save continues there, bit for bit."""
    train_dl, test_dl = loaders()
    reference = new_model(tmp_path / "reference")
    expected = first_block(reference, train_dl, test_dl, epochs=3, save_every=3)
    expected_random = torch.rand(2)

    model = new_model(tmp_path / "run")
    stop = {"after": 7}

    @metric("accuracy")
    def stopping_accuracy(outputs, targets):
        stop["after"] -= 1
        if stop["after"] == 0:
            raise KeyboardInterrupt  # the 7th training batch: after the progress save at batch 6 (epoch 2, batch 2)
        return metric_accuracy(outputs, targets)

    with pytest.raises(KeyboardInterrupt):
        with model.checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01),
                     epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR,
                     epoch_scheduler_args=dict(step_size=1, gamma=0.5))
            cp.train(train_dl, test_dl, watch="accuracy", epochs=3, metrics=[stopping_accuracy], save_every=3)
    progress = read_manifest(model.checkpoint_directory(1))[1][PROGRESS_NAME]
    assert progress["epochs_done"] == 1
    torch.manual_seed(123)  # whatever the streams are now, the resumed call restores them
    again = new_model(tmp_path / "run", seed=5)
    result = first_block(again, train_dl, test_dl, epochs=3, save_every=3)
    assert result == expected
    assert same(params(again), params(reference))
    assert torch.equal(torch.rand(2), expected_random)
    assert PROGRESS_NAME not in read_manifest(model.checkpoint_directory(1))[1]


def _manifests(root):
    """``{checkpoint id: the manifest's modification time}``."""
    found = {}
    for cp in ("1", "2", "3"):
        try:
            found[cp] = os.stat(manifest_path(os.path.join(root, "net", cp))).st_mtime_ns
        except FileNotFoundError:
            pass
    return found


def _run_script(root, out, slow=0.0):
    return subprocess.Popen([sys.executable, SCRIPT, str(root), str(out), "--slow", str(slow)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_inside_train_and_rerun_gives_the_uninterrupted_result(tmp_path):
    reference = _run_script(tmp_path / "reference", tmp_path / "reference.pt")
    out, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err
    expected = torch.load(tmp_path / "reference.pt", weights_only=True)

    rng = random.Random(0)
    root, result = tmp_path / "killed", tmp_path / "killed.pt"
    resumed_mid_epoch = 0
    for attempt in range(5):
        before = _manifests(root)
        process = _run_script(root, result, slow=0.002)
        deadline = time.monotonic() + 60
        # kill once this process is inside a train() call (it wrote a progress save), after a random delay
        while time.monotonic() < deadline and process.poll() is None:
            now = _manifests(root)
            if any(now[cp] != before.get(cp) and os.path.exists(os.path.join(root, "net", cp, PROGRESS_NAME))
                   for cp in now):
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
        resumed_mid_epoch += err.count("continuing the interrupted train() call")
    final = _run_script(root, result)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    resumed_mid_epoch += err.count("continuing the interrupted train() call")
    assert attempt >= 2 and resumed_mid_epoch >= 2, err  # the kills landed inside train() calls that were continued
    got = torch.load(result, weights_only=True)
    assert got["results"] == expected["results"]
    assert same(got["state"], expected["state"])
    assert torch.equal(got["next_random"], expected["next_random"])
    assert got["tree"] == expected["tree"]
    assert cli_main(["verify", str(root / "net" / "1")]) == 0


def test_plot_metrics(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    backend = matplotlib.get_backend()
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
        cp.train(train_dl, test_dl, epochs=2, metrics=[metric_accuracy])
        cp.train(train_dl, test_dl, epochs=1, metrics=[metric_accuracy])
        figure = cp.plot_metrics(tmp_path / "curves.png")
    axes = figure.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["accuracy", "loss"]
    train_line = axes[1].get_lines()[0]
    assert list(train_line.get_xdata()) == [1, 2, 3]
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    assert matplotlib.get_backend() == backend  # a notebook's backend is left alone


class WithLambda(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(5, 2)
        self.activation = lambda x: x * 2  # does not pickle

    def forward(self, x):
        return self.activation(self.layer(x))


def test_a_model_that_does_not_pickle_still_trains_and_caches(tmp_path, caplog):
    train_dl, test_dl = loaders()
    model = Model("lam", WithLambda(), root=tmp_path, quiet=True)
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
        first = cp.train(train_dl, test_dl, epochs=1)
    assert "does not pickle" in caplog.text
    again = Model("lam", WithLambda(), root=tmp_path, quiet=True)
    with again.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
        assert cp.train(train_dl, test_dl, epochs=1) == first
    assert same(params(again), params(model))
    with pytest.raises(CheckpointNotFoundError):
        load_model_from_cwd(directory=again.checkpoint_directory(1))


def test_the_notebook_example_reads_everything_back_on_its_second_run(tmp_path):
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                           "notebook_lineage.py")
    (tmp_path / "notebook_lineage.py").write_text(open(example).read())

    def run():
        done = subprocess.run([sys.executable, str(tmp_path / "notebook_lineage.py")], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done
    first, second = run(), run()
    assert "read from the checkpoint" not in first.stderr
    assert second.stderr.count("read from the checkpoint") == 3 and "epoch 1 (1 of" not in second.stderr
    assert second.stdout == first.stdout
    assert "├── 2" in first.stdout and "└── 3" in first.stdout


def test_the_same_cell_twice_in_one_session_and_a_block_extended_later(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    first = first_block(model, train_dl, test_dl, epochs=2)
    end = params(model)
    assert first_block(model, train_dl, test_dl, epochs=2) == first  # run the cell again: read back
    assert same(params(model), end) and model.current == "1"
    with model.checkpoint(2) as cp:
        cp.train(train_dl, test_dl, epochs=1)
    model.cache(1).evaluate(test_dl)
    model.load_checkpoint(1)
    with model.checkpoint(1) as cp:  # checkpoint 1 gets a second call: its cache and its children no longer fit
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01),
                 epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR, epoch_scheduler_args=dict(step_size=1, gamma=0.5))
        cp.train(train_dl, test_dl, watch="accuracy", epochs=2, metrics=[metric_accuracy])
        cp.train(train_dl, test_dl, epochs=1)
    assert model.cache(1).names() == [] and model.epoch == 3
    with pytest.raises(IncompatibleCheckpointError, match=r"another state of checkpoint 1.*delete_checkpoint\('2'\)"):
        with model.checkpoint(2) as cp:
            cp.train(train_dl, test_dl, epochs=1)
    model.delete_checkpoint(2)
    with model.checkpoint(2) as cp:
        assert cp.train(train_dl, test_dl, epochs=1)["history"]["epoch"] == [4]


def error_after_training(model, cp_id, train_dl, test_dl):
    """A block whose cell raises after its train() call."""
    with pytest.raises(RuntimeError):
        with model.checkpoint(cp_id) as cp:
            cp.train(train_dl, test_dl, epochs=1)
            raise RuntimeError("a cell's error after training")


def refused(model, cp_id, match):
    with pytest.raises(IncompatibleCheckpointError, match=match):
        with model.checkpoint(cp_id):
            pass


def test_a_model_left_midway_or_deleted_is_not_a_parent(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    first_block(model, train_dl, test_dl, epochs=1)
    error_after_training(model, 2, train_dl, test_dl)
    refused(model, 3, "checkpoint 2 left when it was interrupted")
    with model.checkpoint(2) as cp:  # running the interrupted block again finishes it
        cp.train(train_dl, test_dl, epochs=1)
    with model.checkpoint(3) as cp:
        cp.train(train_dl, test_dl, epochs=1)
    model.delete_checkpoint(3)
    with pytest.raises(IncompatibleCheckpointError, match="deleted checkpoint 3 left.*load_checkpoint"):
        with model.checkpoint(3) as cp:
            pass
    model.load_checkpoint(2)  # the suggested fix
    with model.checkpoint(3) as cp:
        assert cp.train(train_dl, test_dl, epochs=1)["history"]["epoch"] == [3]
    # a checkpoint extended with a call that is interrupted is unfinished again
    model.load_checkpoint(2)
    with pytest.raises(KeyboardInterrupt):
        with model.checkpoint(2) as cp:
            cp.train(train_dl, test_dl, epochs=1)
            cp.train(train_dl, test_dl, epochs=1, metrics=[interrupting(1)])
    with pytest.raises(CheckpointNotFoundError, match="never ran to its end"):
        new_model(tmp_path).load_checkpoint(2)


def interrupting(after):
    """A metric that raises KeyboardInterrupt (a notebook's Ctrl-C) at its ``after``-th call."""
    count = {"n": 0}

    @metric("accuracy")
    def accuracy(outputs, targets):
        count["n"] += 1
        if count["n"] == after:
            raise KeyboardInterrupt
        return (outputs.argmax(dim=-1) == targets).sum().item()
    return accuracy


def test_ctrl_c_before_any_save_and_rerun_in_the_same_session(tmp_path):
    train_dl, test_dl = loaders()
    reference = new_model(tmp_path / "reference")
    expected = first_block(reference, train_dl, test_dl, epochs=2)
    expected_random = torch.rand(3)
    model = new_model(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C at the first call's 2nd batch, before any progress save
        with model.checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01),
                     epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR,
                     epoch_scheduler_args=dict(step_size=1, gamma=0.5))
            cp.train(train_dl, test_dl, watch="accuracy", epochs=2, metrics=[interrupting(2)])
    torch.manual_seed(99)
    result = first_block(model, train_dl, test_dl, epochs=2)  # the cell again, in the same session
    assert result == expected and same(params(model), params(reference))
    assert torch.equal(torch.rand(3), expected_random)


def test_random_draws_in_a_block_and_a_loader_generator_are_kept(tmp_path):
    x = torch.randn(48, 5)
    y = (x[:, 0] > 0).long()

    def notebook(root):
        generator = torch.Generator().manual_seed(7)
        train_dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=generator)
        model = new_model(root)
        with model.checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1))
            cp.train(train_dl, epochs=2)
            inside = torch.rand(2)  # drawn after the last train() of the block
        with model.checkpoint(2) as cp:
            second = cp.train(train_dl, epochs=2)
        return inside, torch.rand(2), second, params(model)

    first = notebook(tmp_path / "a")
    again = notebook(tmp_path / "a")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2] == again[2] and same(first[3], again[3])
    (tmp_path / "b").mkdir()
    model_b = notebook(tmp_path / "b")  # trained without any cache: the same
    assert model_b[2] == first[2] and same(model_b[3], first[3])
    generator = torch.Generator().manual_seed(7)
    train_dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=generator)
    model = new_model(tmp_path / "a")
    model.load_checkpoint(1)
    model.delete_checkpoint(2)
    assert not os.path.exists(model.checkpoint_directory(2))


def test_schedulers(tmp_path):
    train_dl, test_dl = loaders()
    with pytest.raises(SetupError, match="ReduceLROnPlateau"):
        with new_model(tmp_path / "a").checkpoint(1) as cp:
            cp.setup(optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1),
                     step_scheduler_cls=torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(SetupError, match="closure"):
        with new_model(tmp_path / "b").checkpoint(1) as cp:
            cp.setup(optimizer_cls=torch.optim.LBFGS)

    def block(model, cp_id, epochs, **setup):
        with model.checkpoint(cp_id) as cp:
            if setup:
                cp.setup(**setup)
            return cp.train(train_dl, test_dl, epochs=epochs)

    # a step scheduler (stepped every batch) is cached and continued exactly
    model = new_model(tmp_path / "c")
    cosine = dict(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1),
                  step_scheduler_cls=torch.optim.lr_scheduler.CosineAnnealingLR, step_scheduler_args=dict(T_max=24))
    block(model, 1, 2, **cosine)
    rates = block(model, 2, 2)["history"]["lr"]
    assert model.step_scheduler.last_epoch == 16 and model.step == 16
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                                                          T_max=24)
    expected = []
    for step in range(16):
        if step % 4 == 0:
            expected.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    assert rates == pytest.approx(expected[2:])
    # a scheduler carried over to a new optimizer goes on with the schedule, from the new optimizer's rate
    model = new_model(tmp_path / "d")
    step = dict(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1),
                epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR, epoch_scheduler_args=dict(step_size=1, gamma=0.5))
    block(model, 1, 2, **step)
    rates = block(model, 2, 2, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01))["history"]["lr"]
    assert rates == pytest.approx([0.01 * 0.25, 0.01 * 0.125])
    # load_schedulers=False: the schedule starts again, at the optimizer's rate as built
    fresh = new_model(tmp_path / "d")
    fresh.load_checkpoint(1, load_schedulers=False)
    assert fresh.epoch_scheduler.last_epoch == 0 and fresh.optimizer.param_groups[0]["lr"] == 0.1
    # ReduceLROnPlateau as the epoch scheduler gets the watched value
    model = new_model(tmp_path / "e")
    plateau = dict(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.1),
                   epoch_scheduler_cls=torch.optim.lr_scheduler.ReduceLROnPlateau,
                   epoch_scheduler_args=dict(mode="max", patience=0, factor=0.5))
    with model.checkpoint(1) as cp:
        cp.setup(**plateau)
        rates = cp.train(train_dl, test_dl, watch="flat", epochs=3, metrics=[metric_flat])["history"]["lr"]
    assert rates == [0.1, 0.1, 0.05]  # the flat metric does not improve in epoch 2: the rate halves after it


def test_another_architecture_is_refused(tmp_path):
    train_dl, test_dl = loaders()
    first_block(new_model(tmp_path), train_dl, test_dl, epochs=1)
    torch.manual_seed(0)
    other = Model("net", torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)),
                  root=tmp_path, quiet=True)
    with pytest.raises(IncompatibleCheckpointError, match="another model architecture"):
        first_block(other, train_dl, test_dl, epochs=1)
    with pytest.raises(IncompatibleCheckpointError, match="another model architecture"):
        other.load_checkpoint(1)


def test_interrupted_then_deleted_or_rerun_with_other_arguments_in_one_session(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    first_block(model, train_dl, test_dl, epochs=1)

    def interrupted(cp_id, epochs):
        with pytest.raises(KeyboardInterrupt):
            with model.checkpoint(cp_id) as cp:
                cp.train(train_dl, test_dl, epochs=epochs, metrics=[interrupting(6)])

    # deleting an interrupted checkpoint does not make its half-trained state a parent
    interrupted(2, 2)
    model.delete_checkpoint(2)
    with pytest.raises(IncompatibleCheckpointError, match=r"deleted checkpoint 2 left.*load_checkpoint"):
        with model.checkpoint(2) as cp:
            cp.train(train_dl, test_dl, epochs=2)
    # re-running the interrupted block with other arguments: the state its call started from is gone
    model.load_checkpoint(1)
    interrupted(2, 2)
    with pytest.raises(IncompatibleCheckpointError, match=r"other arguments.*load_checkpoint\('1'\)"):
        with model.checkpoint(2) as cp:
            cp.train(train_dl, test_dl, epochs=3)
    model.load_checkpoint(1)  # the suggested fix
    with model.checkpoint(2) as cp:
        three = cp.train(train_dl, test_dl, epochs=3)
    reference = new_model(tmp_path / "reference")
    first_block(reference, train_dl, test_dl, epochs=1)
    with reference.checkpoint(2) as cp:
        assert cp.train(train_dl, test_dl, epochs=3) == three


def test_an_interrupted_extension_is_rerun_in_the_same_session(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    first_block(model, train_dl, test_dl, epochs=1)
    with model.checkpoint(2) as cp:
        one = cp.train(train_dl, test_dl, epochs=1)
    with pytest.raises(KeyboardInterrupt):
        with model.checkpoint(2) as cp:  # the same cell, given a second call, interrupted in it
            assert cp.train(train_dl, test_dl, epochs=1) == one
            cp.train(train_dl, test_dl, epochs=2, metrics=[interrupting(6)])
    with model.checkpoint(2) as cp:  # and run again: the first call read back, the second continued
        assert cp.train(train_dl, test_dl, epochs=1) == one
        two = cp.train(train_dl, test_dl, epochs=2, metrics=[metric_accuracy])
    reference = new_model(tmp_path / "reference")
    first_block(reference, train_dl, test_dl, epochs=1)
    with reference.checkpoint(2) as cp:
        cp.train(train_dl, test_dl, epochs=1)
        assert cp.train(train_dl, test_dl, epochs=2, metrics=[metric_accuracy]) == two
    assert same(params(model), params(reference))


def test_a_cell_error_after_a_cached_block_is_read_back(tmp_path):
    """A block whose cached call loaded its end state, then raised: the model is not at its parent any more."""
    train_dl, test_dl = loaders()
    two_blocks(tmp_path, train_dl, test_dl, first_epochs=1)
    again = new_model(tmp_path)
    first_block(again, train_dl, test_dl, epochs=1)
    error_after_training(again, 2, train_dl, test_dl)  # a plot that failed, say
    refused(again, 3, "checkpoint 2 left when it was interrupted")
    evaluation = again.cache(1).evaluate(test_dl)  # on checkpoint 1 as stored, not on the live model
    fresh = new_model(tmp_path)
    fresh.load_checkpoint(1)
    x, y = test_dl.dataset.tensors
    assert evaluation["loss"] == pytest.approx(torch.nn.functional.cross_entropy(fresh.model(x), y).item(), rel=1e-5)


def test_cached_operations_leave_a_loader_generator_alone(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)
    first_block(model, train_dl, test_dl, epochs=1)
    x, y = train_dl.dataset.tensors
    generator = torch.Generator().manual_seed(3)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=generator)
    before = generator.get_state()
    model.cache(1).find_lr(shuffled)
    assert torch.equal(generator.get_state(), before)
