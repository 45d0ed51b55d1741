"""Data-parallel training with ``torchrun``: one process per device, gradients all-reduced.

Started as ``torchrun --nproc-per-node N -m everseg train ...`` (or ``everseg train --nproc N``,
which runs that command), every process runs the same command; torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) says which one it is.
Several machines are torchrun's business too (``--nnodes``, ``--rdzv-endpoint``); nothing
here is specific to one machine.

What changes under it (see :class:`everseg.learn.trainer.Trainer`): ``train.batch_size`` is
the *global* batch, split evenly over the processes, so a run means the same on 1 or N
processes; each process reads its own share of every epoch (``DistributedSampler``, shuffled
by seed and epoch) and of the validation set (the confusion matrices are summed); process 0
alone writes the run folder (config, checkpoints, TensorBoard, model); decisions that must
agree (the time budget, early stopping) are taken together. BatchNorm is synchronised
across GPUs (``SyncBatchNorm``); on CPUs (gloo) each process normalises its own share.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def check_data_parallel(batch_size: int, finetune: str, processes: int) -> None:
    """Refuse a training config that cannot run over ``processes``: checked by the trainer in
    every process, and by ``everseg train --nproc`` before it starts any."""
    if batch_size % processes:
        raise ValueError(f"train.batch_size {batch_size} is the global batch: it must split evenly "
                         f"over the {processes} processes")
    if finetune == "gradual":
        raise ValueError("train.finetune gradual cannot run data-parallel: it changes which weights "
                         "train during the run, and DistributedDataParallel fixes them at the start")


def current_world() -> World | None:
    """This process's place in the group, or None when training alone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return None


def init_from_environment(device_spec: str = "auto") -> World | None:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for CPUs); None when not under torchrun."""
    if not launched_by_torchrun():
        return None
    if not dist.is_initialized():
        cuda = device_spec != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    world = current_world()
    if world is not None and not world.main:
        # One voice: the other processes report warnings and errors only.
        logging.getLogger("everseg").setLevel(logging.WARNING)
    return world


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current_world() is not None:
        dist.barrier()


def any_process(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true in any process (every process gets the same answer)."""
    if current_world() is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_main(value: float, device: torch.device | str = "cpu") -> float:
    """Process 0's ``value`` in every process (itself when alone): decisions taken from a clock
    (a step's time budget) must be the same everywhere, or the processes' LRs drift apart."""
    if current_world() is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the processes (itself when alone)."""
    if current_world() is None:
        return value
    t = value.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()
