"""slim: a smaller model cut from the one you have — fewer layers, hidden channels, FFN neurons, query
heads or experts — each cut measured against the model it came from before any training.

    slim, report = apply_cut(model, SlimStep(op="depth", layers=8, criterion="block_influence"), calibration, held)

importance.py (the criteria), cuts.py (the cuts), step.py (a cut as data).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from upcycle.eval import Equivalence, compare
from upcycle.ops.slim.cuts import cut_depth, cut_experts, cut_ffn_width, cut_heads, cut_hidden
from upcycle.ops.slim.step import SlimStep
from upcycle.summary import parameter_count

parse_step = SlimStep.from_dict  # a cut from a mapping {op, ...options}

__all__ = ["SlimStep", "CutReport", "apply_cut", "parse_step"]

CUTS = {
    "depth": cut_depth,
    "hidden": cut_hidden,
    "ffn_width": cut_ffn_width,
    "heads": cut_heads,
    "experts": cut_experts,
}


@dataclass
class CutReport:
    step: str
    params_before: int
    params_after: int
    seconds: float
    removed: dict  # what the cut took away (layers, channels, experts and their groups), and the scores
    ppl_before: float | None = None  # on the held-out blocks, before any training
    ppl_after: float | None = None
    kl: float | None = None
    top1: float | None = None
    # the whole comparison with the model it was cut from (kept out of the report: its figures are above)
    equivalence: Equivalence | None = field(default=None, repr=False)

    def line(self) -> str:
        quality = (
            f"; one-shot ppl {self.ppl_before:.2f} → {self.ppl_after:.2f}, mean KL {self.kl:.3g}, top-1 {self.top1:.3f}"
            if self.ppl_after is not None
            else ""
        )
        return (
            f"{self.step}: {self.params_before / 1e6:.1f}M → {self.params_after / 1e6:.1f}M parameters "
            f"({100 * (1 - self.params_after / self.params_before):.0f} % fewer), {self.seconds:.1f} s{quality}"
        )

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "equivalence"}


def apply_cut(model, step: SlimStep, calibration: torch.Tensor, held: torch.Tensor | None = None, *, scores=None):
    """(smaller copy, CutReport): the cut chosen by importance on `calibration` blocks (or by `scores`
    measured before, in this model's indices: see lineage.py), measured on `held` blocks (perplexity
    before/after, KL, top-1) when given. The input model is left alone."""
    start = time.perf_counter()
    if scores is not None and step.op in ("depth", "hidden", "ffn_width", "heads"):
        slim, removed = CUTS[step.op](model, step, calibration, scores=scores)
    else:
        slim, removed = CUTS[step.op](model, step, calibration)
    removed["importance_from"] = "source" if scores is not None else "this model"

    report = CutReport(
        step.describe(), parameter_count(model), parameter_count(slim), time.perf_counter() - start, removed
    )
    if held is not None:
        eq = compare(model, slim, held)
        report.ppl_before, report.ppl_after = math.exp(eq.loss_reference), math.exp(eq.loss_candidate)
        report.kl, report.top1, report.equivalence = eq.mean_kl, eq.top1_agreement, eq
    return slim.eval(), report
