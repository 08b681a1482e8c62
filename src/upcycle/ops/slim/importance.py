"""What to cut: importance criteria measured on calibration text, one function each.

    block_influence(model, blocks)     ShortGPT: per layer, 1 - mean cos(layer input, layer output)
    angular_distance(model, blocks, n) Gromov et al.: per start ℓ, arccos(cos(x_ℓ, x_ℓ+n)) / π, last token
    hidden_importance(model, blocks)   SlimQwen / Minitron: per hidden channel, Σ over norms of mean |norm output|
    head_importance(model, blocks)     Minitron-style: per layer and query head, mean ‖head output through o_proj‖
    expert_importance(model, blocks)   per layer and expert: frequency, soft, reap (see ExpertStats)

Each reads the model only through upcycle.arch and forward hooks; none changes the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from upcycle.arch import adapter_for
from upcycle.ops.calibrate import _rows, hooked, run_blocks


@torch.no_grad()
def layer_states(model, blocks: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each layer and leaving the last: L + 1 tensors (n, T, H), fp32."""
    adapter = adapter_for(model)
    states: dict = {i: [] for i in range(adapter.num_layers + 1)}

    def enter(i, module, args):
        states[i].append(args[0].float().cpu())

    def leave(i, module, args, out):
        if i == adapter.num_layers - 1:
            states[i + 1].append((out[0] if isinstance(out, tuple) else out).float().cpu())

    layers = {i: adapter.layer(i) for i in range(adapter.num_layers)}
    with hooked(layers, pre=enter, post=leave):
        run_blocks(model, blocks)
    return [torch.cat(states[i]) for i in range(adapter.num_layers + 1)]


def block_influence(model, blocks: torch.Tensor) -> torch.Tensor:
    """(layers,) 1 - mean over tokens of cos(x_ℓ, x_ℓ+1): low = the layer barely turns the stream."""
    states = layer_states(model, blocks)
    return torch.stack([1 - F.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(states[:-1], states[1:])])


def angular_distance(model, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """(layers - n + 1,) for each start ℓ the mean over blocks of arccos(cos(x_ℓ, x_ℓ+n)) / π on the
    last token of each block: the smallest marks the n consecutive layers that change it least."""
    last = [s[:, -1] for s in layer_states(model, blocks)]
    return torch.stack(
        [
            torch.arccos(F.cosine_similarity(last[i], last[i + n], dim=-1).clamp(-1, 1)).mean() / math.pi
            for i in range(len(last) - n)
        ]
    )


@torch.no_grad()
def hidden_importance(model, blocks: torch.Tensor) -> torch.Tensor:
    """(hidden,) Σ over every RMSNorm (each layer's two and the final one) of mean |norm output|."""
    adapter = adapter_for(model)
    norms = {("final",): adapter.final_norm()}
    for i in range(adapter.num_layers):
        norms.update({(i, k): m for k, m in adapter.norms(i).items()})
    total = torch.zeros(adapter.hidden_size, dtype=torch.float64)
    count = {"tokens": 0}

    def add(key, module, args, out):
        rows = _rows(out)
        total.add_(rows.abs().double().sum(0))
        if key == ("final",):
            count["tokens"] += len(rows)

    with hooked(norms, post=add):
        run_blocks(model, blocks)
    return (total / max(count["tokens"], 1)).float()


@torch.no_grad()
def head_importance(model, blocks: torch.Tensor) -> torch.Tensor:
    """(layers, query heads) mean over tokens of the L2 norm of what each head adds to the residual
    stream (its attention output through its columns of o_proj). Minitron scores the attention output
    before o_proj; through it, a head whose output projection is zero scores zero, as it should."""
    adapter = adapter_for(model)
    heads = model.config.num_attention_heads
    sums = torch.zeros(adapter.num_layers, heads, dtype=torch.float64)
    count = {"tokens": 0}

    def add(i, module, args):
        rows = _rows(args[0]).reshape(-1, heads, module.weight.shape[1] // heads)  # (tokens, heads, head_dim)
        w = module.weight.detach().float().reshape(module.weight.shape[0], heads, -1)  # (H, heads, head_dim)
        sums[i] += torch.einsum("thd,Hhd->thH", rows, w).norm(dim=-1).double().sum(0)
        if i == 0:
            count["tokens"] += len(rows)

    with hooked({i: adapter.attention(i)["o"] for i in range(adapter.num_layers)}, pre=add):
        run_blocks(model, blocks)
    return (sums / max(count["tokens"], 1)).float()


@dataclass
class ExpertStats:
    """Per MoE layer, per expert (E,): how the router used it on calibration text.
    frequency: share of tokens that have the expert in their top-k; soft: mean routing weight it
    received (zero where not chosen); reap: mean over the tokens routed to it of weight × ‖expert
    output‖ (REAP); router_logits: (tokens, E) for similarity."""

    frequency: torch.Tensor
    soft: torch.Tensor
    reap: torch.Tensor
    router_logits: torch.Tensor


@torch.no_grad()
def expert_importance(model, blocks: torch.Tensor) -> dict[int, ExpertStats]:
    """Each MoE layer's ExpertStats. The routing (top-k, weights) is recomputed from the router's
    logits the way the stock block does it (softmax, top-k, renormalised if the model does), and each
    expert's output from its weights, so no model internals beyond the adapter are read."""
    adapter = adapter_for(model)
    layers = [i for i in range(adapter.num_layers) if adapter.ffn_kind(i) == "moe"]
    inputs: dict = {i: [] for i in layers}
    with hooked({i: adapter.ffn(i) for i in layers}, pre=lambda i, m, args: inputs[i].append(_rows(args[0]))):
        run_blocks(model, blocks)
    stats = {}
    for i in layers:
        stats[i] = expert_stats(
            torch.cat(inputs.pop(i)),
            adapter.router(i).weight.detach().float(),
            adapter.experts(i),
            adapter.top_k(i),
            normalize=adapter.normalizes_top_k(i),
        )
    return stats


@torch.no_grad()
def expert_stats(x: torch.Tensor, router: torch.Tensor, experts, k: int, *, normalize: bool) -> ExpertStats:
    """ExpertStats of one layer from its MoE inputs x (tokens, H), router weight (E, H) and stacked
    experts (SwiGLUWeights of (E, F, H), (E, F, H), (E, H, F))."""
    logits = x.float() @ router.float().T
    weights, index = route(logits, k, normalize=normalize)
    E = logits.shape[1]
    chosen = torch.zeros(len(x), E).scatter_(1, index, 1.0)
    dense_weights = torch.zeros(len(x), E).scatter_(1, index, weights)
    reap = torch.zeros(E)
    for e in range(E):
        rows = chosen[:, e].bool()
        if rows.any():
            xe = x[rows].float()
            out = (F.silu(xe @ experts.gate[e].float().T) * (xe @ experts.up[e].float().T)) @ experts.down[e].float().T
            reap[e] = (dense_weights[rows, e] * out.norm(dim=-1)).mean()
    return ExpertStats(chosen.mean(0), dense_weights.mean(0), reap, logits)


def route(logits: torch.Tensor, k: int, *, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, top-k indices) of softmax-then-top-k routing, renormalised when `normalize`."""
    probs = F.softmax(logits.float(), dim=-1)
    weights, index = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, index
