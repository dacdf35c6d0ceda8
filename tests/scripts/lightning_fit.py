"""A Lightning fit with experiment_io's CheckpointIO and ExactResume, interrupted on request by a real signal.

python lightning_fit.py DIR [--devices N] [--signal-at STEP] [--signal-rank R] [--signal NAME] [--top-k K]

The final weights go to DIR/final.pt (rank 0). With --signal-at, the process of rank R sends itself the signal
during the training step of that global step. Rerunning the same command resumes from DIR/last.ckpt.
"""
import argparse
import os
import signal

import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from experiment_io import ResumableSampler
from experiment_io.frontends.lightning import AtomicCheckpointIO, ExactResume

ARGS = None


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))

    def training_step(self, batch, idx):
        x, y = batch
        if ARGS.signal_at is not None and self.global_step == ARGS.signal_at and self.global_rank == ARGS.signal_rank \
                and not os.path.exists(os.path.join(ARGS.directory, "last.ckpt")):
            os.kill(os.getpid(), getattr(signal, ARGS.signal))
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--signal-at", type=int)
    parser.add_argument("--signal-rank", type=int, default=0)
    parser.add_argument("--signal", default="SIGTERM")
    parser.add_argument("--top-k", type=int, default=0)
    ARGS = parser.parse_args()
    directory = ARGS.directory
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=g)
    y = x.sum(1, keepdim=True)
    ds = TensorDataset(x, y)
    devices = ARGS.devices
    model = Net()
    callbacks = [ModelCheckpoint(dirpath=os.path.join(directory, "top"), monitor="train_loss", save_top_k=ARGS.top_k)] \
        if ARGS.top_k else []
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         plugins=[AtomicCheckpointIO()], callbacks=callbacks, use_distributed_sampler=False,
                         enable_progress_bar=False, logger=False, enable_checkpointing=bool(ARGS.top_k),
                         default_root_dir=directory, enable_model_summary=False)
    sampler = ResumableSampler(ds, seed=3, rank=trainer.global_rank, world_size=trainer.world_size)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    resume = ExactResume(os.path.join(directory, "last.ckpt"), sampler=sampler)
    trainer.callbacks.append(resume)
    trainer.fit(model, loader, ckpt_path=resume.ckpt_path())
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), os.path.join(directory, "final.pt"))


if __name__ == "__main__":
    main()
