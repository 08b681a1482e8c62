"""Importance measured once, on the source, for a whole plan (`recompute: false`): where each part of
the current model came from, so that scores measured on the source can be read for the model as the
earlier cuts left it.

    lineage = Lineage.of(source)
    scores = source_scores(source, steps, blocks)             # {kind: tensor in the source's indices}
    for step in steps:
        slim, report = apply_cut(slim, step, blocks, held, scores=lineage.read(scores, step))
        lineage = lineage.after(step, report.removed)

Kinds that carry: layer scores (block influence), hidden channels, query heads, FFN neurons. The
`last` criterion needs no scores; `angular` (a distance between layers n apart, which a depth cut
changes) and expert criteria are always measured on the model as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from upcycle.arch import adapter_for
from upcycle.ops.calibrate import LayerStream, channel_importance
from upcycle.ops.slim import importance
from upcycle.ops.slim.step import SlimStep


def carries(step: SlimStep) -> bool:
    """Whether this cut can use scores measured on the source."""
    return (step.op, step.rule) in {
        ("depth", "block_influence"),
        ("hidden", "rmsnorm"),
        ("heads", "output_norm"),
        ("ffn_width", "activation"),
    }


@dataclass(frozen=True)
class Lineage:
    layers: tuple[int, ...]  # the source layer of each current layer
    channels: tuple[int, ...]  # the source hidden channel of each current channel
    heads: tuple[tuple[int, ...], ...]  # per current layer, the source query heads it keeps
    neurons: tuple[tuple[int, ...], ...] | None  # per current layer, the source FFN neurons (dense FFNs)

    @classmethod
    def of(cls, model) -> "Lineage":
        adapter = adapter_for(model)
        n, heads = adapter.num_layers, model.config.num_attention_heads
        dense = all(adapter.ffn_kind(i) == "dense" for i in range(n))
        return cls(
            tuple(range(n)),
            tuple(range(adapter.hidden_size)),
            tuple(tuple(range(heads)) for _ in range(n)),
            tuple(tuple(range(adapter.ffn_weights(i).width)) for i in range(n)) if dense else None,
        )

    def after(self, step: SlimStep, removed: dict) -> "Lineage":
        if step.op == "depth":
            keep = [i for i in range(len(self.layers)) if i not in set(removed["removed_layers"])]
            return replace(
                self,
                layers=tuple(self.layers[i] for i in keep),
                heads=tuple(self.heads[i] for i in keep),
                neurons=None if self.neurons is None else tuple(self.neurons[i] for i in keep),
            )
        if step.op == "hidden":
            return replace(self, channels=tuple(self.channels[c] for c in removed["kept_channels"]))
        if step.op == "heads":
            return replace(
                self, heads=tuple(tuple(h[k] for k in kept) for h, kept in zip(self.heads, removed["kept_heads"]))
            )
        if step.op == "ffn_width":
            return replace(
                self, neurons=tuple(tuple(n[k] for k in kept) for n, kept in zip(self.neurons, removed["kept_neurons"]))
            )
        return self  # experts: routed experts are not tracked (their criteria are always measured anew)

    def read(self, scores: dict | None, step: SlimStep):
        """The source's scores for this cut, in the current model's indices (None: measure them now)."""
        if scores is None or not carries(step):
            return None
        source = scores[step.op]
        if step.op == "depth":
            return source[list(self.layers)]
        if step.op == "hidden":
            return source[list(self.channels)]
        if step.op == "heads":
            return torch.stack([source[layer, list(kept)] for layer, kept in zip(self.layers, self.heads)])
        return [source[layer][list(kept)] for layer, kept in zip(self.layers, self.neurons)]


@torch.no_grad()
def source_scores(model, steps: list[SlimStep], blocks: torch.Tensor) -> dict:
    """Every score the plan's cuts can carry, measured once on `model` (the source)."""
    out = {}
    ops = {step.op for step in steps if carries(step)}
    if "depth" in ops:
        out["depth"] = importance.block_influence(model, blocks)
    if "hidden" in ops:
        out["hidden"] = importance.hidden_importance(model, blocks)
    if "heads" in ops:
        out["heads"] = importance.head_importance(model, blocks)
    if "ffn_width" in ops:
        adapter, stream, per_layer = adapter_for(model), LayerStream(model, blocks), []
        for i in range(adapter.num_layers):
            per_layer.append(channel_importance(adapter.ffn_weights(i), stream.module_inputs(adapter.ffn(i))))
            stream.advance()
        out["ffn_width"] = per_layer
    return out
