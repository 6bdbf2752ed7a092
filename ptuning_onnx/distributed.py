"""Data-parallel training under ``torchrun`` or ``accelerate launch``: the world they describe, and what it changes.

Both launchers set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with a world of
one (or none) nothing here does anything, so ``ptuning-train`` runs unchanged either way. In a world of N:

- every optimizer step sees the same GLOBAL batch as one process with the same ``--batch-size``: each micro-batch
  of the epoch's order (train.epoch_order) is dealt out row by row, rank r taking rows r, r+N, ...;
- each rank's loss is weighted by its share of the micro-batch's loss items (rows for seq-cls, target tokens
  otherwise), so that after the gradients are summed they equal the one-process mean exactly, up to float order;
- the gradients are summed with one ``all_reduce`` per trainable tensor: only the prompt encoder and the task head
  train, so the traffic is tiny (no ``DistributedDataParallel`` wrapper, whose key prefixes would leak into
  checkpoints);
- every rank takes the same AdamW step and keeps the same weights and RNG states; rank 0 alone writes checkpoints
  and the adapter, and the others wait for it (so a resume, in any world size, reads a complete checkpoint).

Backends: gloo on CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``).

``accelerate launch --multi_gpu --num_processes N`` starts its processes through torch's elastic launcher, so it
sets the same variables; not run here (no GPUs). On the CPU, ``accelerate launch --cpu --num_processes 2`` started
ONE process on this machine (accelerate's multi-CPU mode wants MPI): that trains, correctly, as one process. Use
torchrun on CPUs.

Tested (tests/test_train_distributed.py): 2 CPU processes against one on seq-cls (BERT, LSTM encoder with dropout,
uneven 3 + 2 row shares, grad accumulation): the adapter within 1e-4 of each tensor's scale, step losses within
1e-5, and a one-process resume from the 2-process checkpoint. Causal-LM batches are padded on the right in training
(train.padding_side), so each row's loss does not depend on how its rank pads it (tests/test_train_robust.py); the
2-process equality itself is tested on seq-cls only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .config import TaskType
from .errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The launcher's world, read from the environment; a world of one when no launcher set it."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers: {exc}") from None
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return World(rank=rank, size=size, local_rank=local)


def init(world: World, device: torch.device) -> torch.device:
    """Join the process group (once); returns this rank's device."""
    if not world.distributed:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(indices: list, world: World) -> list:
    """This rank's rows of one micro-batch: rows rank, rank + N, ..."""
    return indices[world.rank::world.size]


def loss_items(batch: dict, task: TaskType) -> int:
    """How many items the model's loss averages over: rows for seq-cls, labelled target tokens otherwise (the
    prompt's positions are -100 and not counted, as in the loss)."""
    labels = batch["labels"]
    if task == TaskType.SEQ_CLS:
        return int(labels.shape[0])
    return int((labels != -100).sum())


def all_sum(value: float, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def sum_gradients(params, world: World) -> None:
    """Sum every trainable tensor's gradient over the ranks (a rank without one contributes zeros)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def finish(world: Optional[World]) -> None:
    if world is not None and world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
