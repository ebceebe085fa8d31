"""Multi-process training (DistributedDataParallel) under ``torchrun``.

``torchrun`` (the Slurm and Kubernetes launchers use it for more than one GPU) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them everything here is a no-op and training runs
in one process. The backend is NCCL on CUDA and gloo on CPU (what the tests use).

Only rank 0 talks to MLflow, validates and writes checkpoints; the other ranks follow its
decisions (resume state, early stop, preemption) through broadcasts, so every rank takes the
same number of steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_name: str) -> Dist:
    """Join the process group torchrun describes (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def device(info: Dist, name: str) -> torch.device:
    if info.enabled and name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cuda" if name == "cuda" else "cpu") if name != "auto" else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")


def wrap(model: nn.Module, trainable: nn.Module, info: Dist) -> nn.Module:
    """The module to call in training steps: DDP over ``model`` when distributed.

    The entropy bottlenecks' quantiles are left out of DDP's gradient reduction: they are
    trained by the auxiliary loss outside the forward pass (see :func:`sync_grads`).
    Parameters of a frozen part (the base under an enhancement) have no gradient at all.
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, p in model.named_parameters()
               if name.endswith(".quantiles") or not p.requires_grad]
    ignored += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                   find_unused_parameters=True)


def sync_grads(params: list[torch.Tensor], info: Dist) -> None:
    """Average gradients that DDP does not reduce (the auxiliary quantiles)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world_size


def any_rank(flag: bool, info: Dist) -> bool:
    """True on every rank when it is true on one (a preemption signal seen by any process)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast(obj: Any, info: Dist) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
