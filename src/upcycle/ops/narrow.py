"""Narrow every dense FFN to a fraction of its width, keeping the most important channels.

The "dense-4x" baseline of sparsify: a dense model with the same number of active FFN parameters per
token as a 16-of-64 bank-sparse one. Importance is measured on calibration text (see importance.py).
The result is a stock model of the same family with a smaller intermediate_size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from upcycle.arch import SwiGLUWeights, adapter_for
from upcycle.errors import check
from upcycle.ops.calibrate import channel_importance, ffn_inputs


@dataclass
class NarrowReport:
    width_before: int
    width_after: int
    kept_importance: list[float]  # per layer: share of the total channel importance that was kept


@torch.no_grad()
def narrow_ffn(model, calibration: torch.Tensor, fraction: float = 0.25) -> tuple[object, NarrowReport]:
    """A copy of `model` whose FFNs keep the top `fraction` of channels by importance on `calibration`
    blocks (token ids). The kept channels stay in their original order."""
    check(0 < fraction <= 1, "fraction", fraction, "a number in (0, 1]")
    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    layers = list(range(adapter.num_layers))
    for i in layers:
        check(
            adapter.ffn_kind(i) == "dense",
            "model",
            type(model).__name__,
            f"a dense SwiGLU FFN in every layer (layer {i}'s is {adapter.ffn_kind(i)})",
        )
    width = adapter.ffn_weights(0).width
    keep = max(1, round(width * fraction))
    inputs = ffn_inputs(model, calibration, layers)
    shares = []
    for i in layers:
        w = adapter.ffn_weights(i)
        score = channel_importance(w, inputs.pop(i))
        index = score.topk(keep).indices.sort().values
        shares.append(float(score[index].sum() / score.sum()))
        adapter.set_ffn_weights(i, SwiGLUWeights(w.gate[index].clone(), w.up[index].clone(), w.down[:, index].clone()))
    adapter.set_config(ffn_size=keep)
    return model, NarrowReport(width, keep, shares)
