"""A notebook re-run from the top: every training block that already ran is read back from its checkpoint.

Run it twice from anywhere::

    python examples/notebook_lineage.py            # trains: a few seconds on two cores
    python examples/notebook_lineage.py            # trains nothing: every block is cached

Each "cell" below is what a notebook cell would hold. The first run trains
checkpoint 1 (Adam with a step scheduler), runs a learning-rate range test on it,
continues it as checkpoint 2 (SGD), rolls back to checkpoint 1 and forks checkpoint
3 from it, and evaluates checkpoint 3. A second run returns every result from the
checkpoints (``ckpts/spiral-mlp/`` under ``examples/run/``) and ends with the
same model and the same random streams. Interrupt the first run with Ctrl-C (or
``kill -9`` it) in the middle of a block and run it again: the interrupted
``train()`` call continues from its last progress save and ends where an
uninterrupted run would have.

``--fresh`` deletes the checkpoints first (``model.delete()``).
"""
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiment_io.frontends.lineage import Model, metric

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "run", "ckpts")


# -- cell 1: data, model, metric ---------------------------------------------------------------------------------------
def spirals(n, seed):
    """Two interleaved spirals in the plane (class 0 and 1), with noise."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.05, 1.0, n)) * 3 * np.pi
    label = rng.integers(0, 2, n)
    sign = np.where(label == 0, 1.0, -1.0)
    xy = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / (3 * np.pi)
    xy += rng.normal(scale=0.04, size=xy.shape)
    return torch.tensor(xy, dtype=torch.float32), torch.tensor(label)


@metric("accuracy")
def metric_accuracy(outputs, targets):
    """The number of correct predictions in the batch (the epoch's accuracy is the total over the samples)."""
    return (outputs.argmax(dim=-1) == targets).sum().item()


def model_builder():
    return torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 2))


torch.manual_seed(0)
train_dl = DataLoader(TensorDataset(*spirals(2000, seed=1)), batch_size=64, shuffle=True)
test_dl = DataLoader(TensorDataset(*spirals(500, seed=2)), batch_size=250)
model = Model("spiral-mlp", model_builder(), "an MLP on two spirals", root=ROOT)
if "--fresh" in sys.argv:
    model.delete()

# -- cell 2: the first checkpoint ------------------------------------------------------------------------------------
with model.checkpoint(id=1) as cp:
    cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam,
             optimizer_args=dict(lr=5e-3, weight_decay=1e-5),
             epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR, epoch_scheduler_args=dict(step_size=10, gamma=0.3))
    first = cp.train(train_dl, test_dl, watch="accuracy", load_best=True, epochs=25, metrics=[metric_accuracy])
print(f"checkpoint 1: best test accuracy {first['best_value']:.3f} at epoch {first['best_epoch']}")

# -- cell 3: a learning-rate range test of SGD from checkpoint 1 (computed once) --------------------------------------
lr_test = model.cache(id=1).find_lr(train_dl, optimizer_cls=torch.optim.SGD, optimizer_args=dict(momentum=0.9),
                                    min_rate=1e-4, max_rate=10.0)
print(f"find_lr on checkpoint 1: suggested SGD learning rate {lr_test['suggested_lr']:.3g}")

# -- cell 4: continue with SGD --------------------------------------------------------------------------------------
with model.checkpoint(2) as cp:
    cp.setup(optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=lr_test["suggested_lr"] / 10, momentum=0.9),
             clear_epoch_scheduler=True)
    second = cp.train(train_dl, test_dl, watch="accuracy", load_best=True, epochs=10, metrics=[metric_accuracy])
print(f"checkpoint 2: best test accuracy {second['best_value']:.3f} at epoch {second['best_epoch']}")

# -- cell 5: roll back to checkpoint 1 and fork: 2 and 3 both continue from 1 ----------------------------------------
model.load_checkpoint(id=1)
with model.checkpoint(3) as cp:
    third = cp.train(train_dl, test_dl, watch="accuracy", load_best=False, epochs=15, metrics=[metric_accuracy])
print(f"checkpoint 3: best test accuracy {third['best_value']:.3f} at epoch {third['best_epoch']}")
evaluation = model.cache(3).evaluate(test_dl, metrics=[metric_accuracy])
print(f"checkpoint 3 evaluated: loss {evaluation['loss']:.4f}, accuracy {evaluation['accuracy']:.3f}")

# -- cell 6: the best epoch of checkpoint 3, if it was not its last; the tree of checkpoints --------------------------
model.load_checkpoint(3, from_backup=True, load_schedulers=False)
print(model.tree())
print("the same tree from the command line: experiment-io lineage", model.directory)
print("the model of checkpoint 3 for prediction: load_model_from_cwd(directory=%r)" % model.checkpoint_directory(3))
