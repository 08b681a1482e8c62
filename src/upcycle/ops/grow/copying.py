"""What every growth operator shares: copying a model without its heaviest tensors, and the neurons of
a SwiGLU FFN taken, stacked or re-drawn."""

from __future__ import annotations

import copy

import torch

from upcycle.arch import SwiGLUWeights


def copy_except(model, heavy: list[torch.Tensor]):
    """A deep copy of `model` in which the parameters `heavy` are empty (0 elements), for an operator
    that replaces them anyway: the source and the grown model are then all that is in memory, never
    a second copy of what is about to be rebuilt."""
    saved = [(p, p.data) for p in heavy]
    try:
        for p in heavy:
            p.data = torch.empty(0, dtype=p.dtype)
        return copy.deepcopy(model)
    finally:
        for p, data in saved:
            p.data = data


def neurons(ffn: SwiGLUWeights, index: torch.Tensor) -> SwiGLUWeights:
    """The FFN restricted to neurons `index` (rows of gate/up, columns of down), as new tensors."""
    return SwiGLUWeights(
        ffn.gate[index].detach().clone(), ffn.up[index].detach().clone(), ffn.down[:, index].detach().clone()
    )


def stack(parts: list[SwiGLUWeights]) -> SwiGLUWeights:
    """Experts stacked as (E, F, H), (E, F, H), (E, H, F)."""
    return SwiGLUWeights(*(torch.stack([getattr(p, n).detach() for p in parts]) for n in ("gate", "up", "down")))


@torch.no_grad()
def redraw(expert: SwiGLUWeights, index: torch.Tensor, stats: SwiGLUWeights, generator: torch.Generator) -> None:
    """Re-draw neurons `index` of `expert` (in place) from normals with the mean and std of each matrix
    of `stats` (Drop-Upcycling)."""
    for name in ("gate", "up", "down"):
        target, source = getattr(expert, name), getattr(stats, name).float()
        rows = name != "down"
        shape = (len(index), target.shape[1]) if rows else (target.shape[0], len(index))
        fresh = (torch.randn(shape, generator=generator) * source.std() + source.mean()).to(target.dtype)
        if rows:
            target[index] = fresh
        else:
            target[:, index] = fresh
