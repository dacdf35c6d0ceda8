"""What the launcher says about this process: its rank, its local rank, the number of ranks.

Read from an initialized process group, else from ``torchrun``'s variables
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), else from those SLURM gives the tasks
of an ``srun`` step (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``;
never the job's ``SLURM_NTASKS``, which a batch script sees too: a single process
started by the batch script is one rank). Nothing here initializes anything; see
:mod:`experiment_io.training.distributed`.
"""
import os
from typing import Optional

import torch.distributed as dist

__all__ = ["launched_world"]


def _env_int(*names: str) -> Optional[int]:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                return None
    return None


def launched_world() -> tuple:
    """``(rank, local_rank, world_size)`` as the launcher describes this process (``(0, 0, 1)`` alone).

    An initialized process group wins; then torchrun's variables (``WORLD_SIZE``,
    whatever its value); then those of an ``srun`` step.
    """
    if dist.is_available() and dist.is_initialized():
        local = _env_int("LOCAL_RANK", "SLURM_LOCALID")
        return dist.get_rank(), local if local is not None else 0, dist.get_world_size()
    world = _env_int("WORLD_SIZE")
    if world is not None:  # torchrun (or the user) says how many ranks there are, 1 included
        return (_env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0, world) if world > 1 else (0, 0, 1)
    # srun: the tasks of this job step (not SLURM_NTASKS, which a batch script sees for the whole job)
    world = _env_int("SLURM_STEP_NUM_TASKS")
    if world is not None and world > 1 and _env_int("SLURM_PROCID") is not None:
        return _env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID") or 0, world
    return 0, 0, 1
