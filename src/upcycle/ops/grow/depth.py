"""Deeper: identity layers inserted (exact), or a layer map that repeats trained layers (measured).

A pre-norm decoder layer adds attention(norm(h)) and FFN(norm(h)) to the residual stream h. With the
attention output projection and the FFN's down projections zero both terms are zero, so the new layer
passes h through unchanged: exact. Its other weights are a copy of the layer below it (LLaMA-Pro's
block expansion), so the layer starts with a trained attention and FFN whose outputs learn to open.
"""

from __future__ import annotations

import copy

import torch

from upcycle.arch import adapter_for
from upcycle.errors import ConfigError
from upcycle.ops.grow.step import GrowStep


def evenly(layers: int, add: int) -> list[int]:
    """Where `add` new layers go, spread over a stack of `layers`: each is inserted after the index given."""
    return [round((j + 1) * layers / (add + 1)) - 1 for j in range(add)]


def add_layers(model, step: GrowStep):
    source = adapter_for(model)
    n = source.num_layers
    grown = copy.deepcopy(model)
    target = adapter_for(grown)
    old = list(target.layers)
    if step.layer_map:
        bad = [o for o in step.layer_map if not 0 <= o < n]
        if bad:
            raise ConfigError(f"layer_map names layer {bad[0]}: this model has layers 0..{n - 1}")
        seen, layers = set(), []
        for o in step.layer_map:
            layers.append(old[o] if o not in seen else copy.deepcopy(old[o]))
            seen.add(o)
        target.set_layers(layers, list(step.layer_map))
        same = list(step.layer_map) == list(range(n))
        return grown, {
            "kind": "exact" if same else "changed",
            "why": "trained layers repeated or dropped by the map",
            "layer_map": list(step.layer_map),
        }
    after = sorted(step.at) if step.at else evenly(n, step.add)
    bad = [p for p in after if not -1 <= p < n]
    if bad:
        raise ConfigError(f"at names layer {bad[0]}: this model has layers 0..{n - 1} (-1: before the first)")
    layers, origin, new = [], [], []
    for p in [-1] + list(range(n)):
        if p >= 0:
            layers.append(old[p]), origin.append(p)
        for _ in range(after.count(p)):
            base = max(p, 0)  # a layer inserted before the first copies the first
            layers.append(copy.deepcopy(old[base])), origin.append(base), new.append(len(layers) - 1)
    target.set_layers(layers, origin)
    with torch.no_grad():
        for j in new:
            for weight in target.residual_writers(j):
                weight.zero_()
    return grown, {
        "kind": "exact",
        "why": "new layers write nothing to the residual stream (o_proj and down = 0)",
        "new_layers": new,
    }
