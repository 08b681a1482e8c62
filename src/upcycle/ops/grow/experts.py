"""MoE → more experts, and top-k raised alone.

Cloning each expert n times with its router row tiled is exact for softmax-then-top-k routers, with or
without renormalisation: the n clones of expert e share its logit, so each holds p_e / n of the softmax
mass, top-(n·k) picks exactly the clones of the k experts top-k picked before, and their weights add
back to p_e (or to p_e / Σp renormalised). No weight is rescaled. Noise on the clones' router rows or
re-drawn neurons (Drop-Upcycling) trade that exactness for diversity, measured by the caller.
Raising top-k alone adds experts to each token's mix: it changes the function (measured).
"""

from __future__ import annotations

import torch

from upcycle.arch import SwiGLUWeights, adapter_for
from upcycle.errors import ConfigError
from upcycle.ops.grow.copying import copy_except, redraw
from upcycle.ops.grow.step import GrowStep


def _moe_layers(adapter, op: str) -> list[int]:
    layers = [i for i in range(adapter.num_layers) if adapter.ffn_kind(i) == "moe"]
    if not layers:
        raise ConfigError(
            f"op {op} needs a mixture-of-experts model; this {adapter.family} model has none "
            "(grow it first with op moe)"
        )
    return layers


def clone_experts(model, step: GrowStep):
    """(model with factor × the experts and top-k × factor, facts incl. each new expert's origin)."""
    source = adapter_for(model)
    layers = _moe_layers(source, "experts")
    n = step.factor
    groups, params = source.parameter_groups(), dict(model.named_parameters())
    grown = copy_except(model, [params[n] for n in groups["router"] + groups["experts"]])
    target = adapter_for(grown)
    generator = torch.Generator().manual_seed(step.seed)
    for i in layers:
        old = source.experts(i)
        experts = SwiGLUWeights(*(t.detach().repeat_interleave(n, dim=0) for t in (old.gate, old.up, old.down)))
        router = source.router(i).weight.detach().repeat_interleave(n, dim=0)
        if step.noise:  # relative to each row's scale, so logits move by about `noise` of their size
            router = router + torch.randn(router.shape, generator=generator) * step.noise * router.std(1, keepdim=True)
        if step.redraw:
            for e in range(len(router)):
                if e % n:  # the first clone of each expert stays the original
                    width = experts.gate.shape[1]
                    index = torch.randperm(width, generator=generator)[: round(step.redraw * width)]
                    clone = SwiGLUWeights(experts.gate[e], experts.up[e], experts.down[e])
                    redraw(clone, index, clone, generator)
        target.set_experts(i, experts)
        target.set_router(i, router)
    target.set_config(num_experts=source.num_experts(layers[0]) * n, top_k=source.top_k(layers[0]) * n)
    origin = {i: [e // n for e in range(source.num_experts(i) * n)] for i in layers}
    kind = "diversity" if step.noise or step.redraw else "exact"
    why = (
        "each clone holds 1/n of its expert's softmax mass and top-k × n picks all clones"
        if kind == "exact"
        else "router noise / re-drawn neurons on the clones"
    )
    return grown, {"kind": kind, "why": why, "origin": origin}


def raise_top_k(model, step: GrowStep):
    source = adapter_for(model)
    layers = _moe_layers(source, "top_k")
    experts = source.num_experts(layers[0])
    if step.top_k > experts:
        raise ConfigError(f"top_k={step.top_k} is more than the {experts} experts per layer")
    grown = copy_except(model, [])
    adapter_for(grown).set_config(top_k=step.top_k)
    was = source.top_k(layers[0])
    return grown, {
        "kind": "exact" if step.top_k == was else "changed",
        "why": f"top-k {was} → {step.top_k}: more experts in each token's mix",
        "origin": {i: list(range(experts)) for i in layers},
    }
