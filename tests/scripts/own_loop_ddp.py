"""A hand-written data-parallel loop: DDP, ResumableSampler, rank_zero_save and verified_load.

    torchrun --nproc_per_node=N own_loop_ddp.py [--stop-after STEPS]

Starts or resumes from ``state.pt`` in the current directory; every rank appends
the sample ids it trained on to ``samples.rank<R>.log`` (``epoch: ids``) and checks
after every save that the file it loads holds its own model.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from experiment_io import ResumableSampler, rank_zero_save, verified_load

EPOCHS, N, BATCH = 2, 30, 4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stop-after", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    data = TensorDataset(torch.arange(N, dtype=torch.float32)[:, None], torch.arange(N))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    sampler = ResumableSampler(data, seed=5, drop_last=True)  # rank and world size from the process group
    start_epoch = 0
    if os.path.exists("state.pt"):
        state = verified_load("state.pt")
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        start_epoch = sampler.epoch
    log = open(f"samples.rank{rank}.log", "a", buffering=1)
    steps = 0
    for epoch in range(start_epoch, EPOCHS):
        sampler.set_epoch(epoch)
        for x, ids in DataLoader(data, batch_size=BATCH, sampler=sampler):
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
            sampler.advance(len(ids))
            log.write(f"{epoch}: " + " ".join(str(int(i)) for i in ids) + "\n")
            rank_zero_save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                            "sampler": sampler.state_dict()}, "state.pt")
            loaded = verified_load("state.pt")  # every rank may read it: the save has committed
            assert all(torch.equal(loaded["model"][k], v) for k, v in model.module.state_dict().items())
            steps += 1
            if steps == args.stop_after:
                print(f"STOPPED rank {rank}", flush=True)
                return 0
    print(f"FINISHED rank {rank}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        status = main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # gloo's threads joined before the interpreter ends
    sys.exit(status)
