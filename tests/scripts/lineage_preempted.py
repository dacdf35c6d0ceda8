"""A notebook cell with one checkpoint block, as a script, for the preemption tests.

Usage: ``python lineage_preempted.py ROOT OUT.pt [--slow SECONDS] [--log FILE]``.
``OUT.pt`` gets the block's ``train()`` results, the final parameters and optimizer
state, and the next random number. Each training sample read sleeps ``--slow``
seconds and appends a line to ``--log`` (flushed at once), so that a test can send a
signal inside ``train()``. A SIGTERM there makes the script exit with status 75.
"""
import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from experiment_io.lineage import Model, metric

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("out")
parser.add_argument("--slow", type=float, default=0.0)
parser.add_argument("--log", default=None)
args = parser.parse_args()
torch.set_num_threads(1)
log = open(args.log, "a", buffering=1) if args.log else None


class SlowData(TensorDataset):
    def __getitem__(self, index):
        if args.slow:
            time.sleep(args.slow)
        if log is not None:
            log.write(f"{index}\n")
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
model = Model("net", net, root=args.root, quiet=True)
with model.checkpoint(1) as cp:
    cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01),
             epoch_scheduler_cls=torch.optim.lr_scheduler.StepLR, epoch_scheduler_args=dict(step_size=1, gamma=0.5))
    result = cp.train(train_dl, test_dl, watch="accuracy", epochs=3, metrics=[metric_accuracy])
torch.save({"result": result, "state": model.model.state_dict(), "optimizer": model.optimizer.state_dict(),
            "next_random": torch.rand(3)}, args.out)
