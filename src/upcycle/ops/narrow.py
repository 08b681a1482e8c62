"""Narrow every dense FFN to a fraction of its width, keeping the most important channels.

The "dense-4x" baseline of sparsify: a dense model with the same number of active FFN parameters per
token as a 16-of-64 bank-sparse one. It is slim's FFN-width cut (ops/slim/cuts.py: importance of each
channel on calibration text, the kept channels in their original order) given as a fraction; the
result is a stock model of the same family with a smaller intermediate_size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from upcycle.arch import adapter_for
from upcycle.errors import check
from upcycle.ops.slim.cuts import cut_ffn_width
from upcycle.ops.slim.step import FfnWidthCut


@dataclass
class NarrowReport:
    width_before: int
    width_after: int
    kept_importance: list[float]  # per layer: share of the total channel importance that was kept


@torch.no_grad()
def narrow_ffn(model, calibration: torch.Tensor, fraction: float = 0.25) -> tuple[object, NarrowReport]:
    """A copy of `model` whose FFNs keep the top `fraction` of channels by importance on `calibration`
    blocks (token ids)."""
    check(0 < fraction <= 1, "fraction", fraction, "a number in (0, 1]")
    adapter = adapter_for(model)
    width = adapter.ffn_weights(0).width
    keep = max(1, round(width * fraction))
    if keep == width:  # nothing to cut (the cut itself refuses a width that is not smaller)
        return copy.deepcopy(model), NarrowReport(width, width, [1.0] * adapter.num_layers)
    narrow, removed = cut_ffn_width(model, FfnWidthCut(width=keep), calibration)
    return narrow, NarrowReport(width, keep, removed["kept_importance_per_layer"])
