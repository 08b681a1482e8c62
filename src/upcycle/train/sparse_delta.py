"""A linear layer that fine-tunes a sparse set of (position, delta) pairs over frozen, pruned weights:
W_eff = W + scatter(δ at positions), zero wherever the layer's mask says pruned (SEFT, SpIEL).

    layer = SparseDeltaLinear(linear, budget=20_000)       # δ = 0: computes what `linear` computed
    merged = layer.merged()                                 # a stock nn.Linear holding W_eff

Memory: the frozen weight, the mask, the positions and the deltas (the only trainable tensor, with
its Adam state). W_eff is rebuilt in the forward and again in the backward rather than kept between
them, and the weight gradient is one matrix at a time, gathered at the positions and freed — so
training holds about one copy of the weights, not three. While `collect` is set (the SEFT callback's
window before a topology update) the dense weight gradient is also summed into `window`.

Invariants (held by every method here and by the SEFT callback): the frozen weight is zero where the
mask prunes; every position holds a live (unpruned) weight; no position appears twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, index, bias, layer):
        w = weight.reshape(-1).index_add(0, index, delta.to(weight.dtype)).view_as(weight)
        ctx.save_for_backward(x, delta, weight, index)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, delta, weight, index = ctx.saved_tensors
        w = weight.reshape(-1).index_add(0, index, delta.to(weight.dtype)).view_as(weight)
        grad_x = grad_out @ w if ctx.needs_input_grad[0] else None
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = g2.T.to(torch.float32) @ x2.to(torch.float32)  # (out, in), this matrix only
        if ctx.layer.collect:
            ctx.layer.add_to_window(grad_w)
        grad_delta = grad_w.reshape(-1)[index].to(delta.dtype)
        return grad_x, grad_delta, None, None, None, None


class SparseDeltaLinear(nn.Module):
    """`linear` frozen, with `budget` trainable deltas at live positions (chosen at random, seeded, until the
    first topology update moves them to where the gradient is)."""

    def __init__(self, linear: nn.Linear, budget: int, *, seed: int = 0):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", weight.clone())
        self.register_buffer("live", weight != 0)  # the mask: False = pruned
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        live = self.live.reshape(-1).nonzero().flatten()
        budget = min(budget, len(live))
        pick = torch.randperm(len(live), generator=torch.Generator().manual_seed(seed))[:budget]
        self.register_buffer("index", live[pick].sort().values)
        self.delta = nn.Parameter(torch.zeros(budget, dtype=torch.float32))
        self.collect = False
        self.window: torch.Tensor | None = None

    @property
    def budget(self) -> int:
        return self.delta.numel()

    def forward(self, x):
        return _SparseDeltaLinear.apply(x, self.delta, self.weight, self.index, self.bias, self)

    def add_to_window(self, grad_w: torch.Tensor) -> None:
        self.window = grad_w.clone() if self.window is None else self.window.add_(grad_w)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        return self.weight.reshape(-1).index_add(0, self.index, self.delta.to(self.weight.dtype)).view_as(self.weight)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A stock nn.Linear holding W_eff (zero wherever the mask prunes)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.weight.dtype)
        out.weight.copy_(self.effective_weight() * self.live)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, budget={self.budget}, "
            f"live={int(self.live.sum())}/{self.live.numel()}"
        )
