"""One process or many under torchrun: DDP by default, FSDP2 (fully_shard per decoder layer) by option.

gloo on CPU, nccl on GPU, chosen automatically. Parallelism wraps a plain model from the outside;
the model code knows nothing of it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from upcycle import arch

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.size
        return value

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world() -> World:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return World(rank, size, torch.device("cuda", local))
    return World(rank, size, torch.device("cpu"))


def wrap(model, world: World, mode: str):
    """DDP or FSDP2 around `model` (returned as is in a world of one)."""
    if world.size <= 1:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard  # only under torchrun with FSDP2 (torch >= 2.6 names it so)

        for layer in arch.adapter_for(model).layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def unwrap(model):
    return getattr(model, "module", model)


def no_sync(model, last_micro_batch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation (DDP)."""
    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def full_state(model, optimizer=None):
    """Full (unsharded) model and optimizer state dicts, keyed by parameter names, on the CPU.
    The same form for one process, DDP and FSDP, so any checkpoint loads in a single process."""
    inner = unwrap(model)
    model_sd = get_model_state_dict(inner, options=FULL)
    optim_sd = get_optimizer_state_dict(inner, optimizer, options=FULL) if optimizer is not None else None
    return model_sd, optim_sd


def load_full_state(model, optimizer, model_sd, optim_sd) -> None:
    inner = unwrap(model)
    if optimizer is None:
        set_state_dict(
            inner,
            (),
            model_state_dict=model_sd,
            optim_state_dict={},
            options=StateDictOptions(full_state_dict=True, strict=True),
        )
    else:
        set_state_dict(
            inner,
            optimizer,
            model_state_dict=model_sd,
            optim_state_dict=optim_sd,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
        )
