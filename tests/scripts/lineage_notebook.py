"""A notebook re-run from the top, as a script: checkpoint blocks that train, fork and roll back.

Usage: ``python lineage_notebook.py ROOT OUT.pt [--slow SECONDS]``. ``OUT.pt`` gets the
results of every ``train()`` call, the final parameters and the next random number.
``--slow`` sleeps in each training batch so that a test can kill the process inside
``train()``.
"""
import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from experiment_io.frontends.lineage import Model, metric

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("out")
parser.add_argument("--slow", type=float, default=0.0)
args = parser.parse_args()


class SlowData(TensorDataset):
    def __getitem__(self, index):
        if args.slow:
            time.sleep(args.slow)
        return super().__getitem__(index)


@metric("accuracy")
def metric_accuracy(outputs, targets):
    return (outputs.argmax(dim=-1) == targets).sum().item()


torch.manual_seed(0)
x = torch.randn(160, 6)
y = (x[:, 0] - x[:, 1] > 0).long()
train_dl = DataLoader(SlowData(x[:128], y[:128]), batch_size=16, shuffle=True)
test_dl = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=32)
net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(12, 2))
model = Model("net", net, "a notebook's model", root=args.root, quiet=True)
results = {}
with model.checkpoint(1) as cp:
    cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01),
             epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR, epoch_scheduler_args=dict(step_size=2, gamma=0.5))
    results["1a"] = cp.train(train_dl, test_dl, watch="accuracy", epochs=3, metrics=[metric_accuracy], save_every=3)
    results["1b"] = cp.train(train_dl, test_dl, watch="loss", load_best=True, epochs=2, metrics=[metric_accuracy],
                             save_every=3)
with model.checkpoint(2) as cp:
    cp.setup(optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=0.05, momentum=0.9), clear_epoch_scheduler=True)
    results["2"] = cp.train(train_dl, test_dl, watch="accuracy", epochs=2, metrics=[metric_accuracy], save_every=3)
model.load_checkpoint(1)
with model.checkpoint(3) as cp:
    results["3"] = cp.train(train_dl, test_dl, watch="accuracy", epochs=2, metrics=[metric_accuracy], save_every=3)
torch.save({"results": results, "state": model.model.state_dict(), "optimizer": model.optimizer.state_dict(),
            "next_random": torch.rand(3), "tree": model.tree()}, args.out)
