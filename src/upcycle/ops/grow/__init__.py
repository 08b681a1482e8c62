"""grow: a model made larger — dense → MoE, more experts, deeper, wider — step by step, each step
verified against the model it came from.

    grown, report = apply_step(model, GrowStep(op="moe", experts=8, top_k=2, mode="shared"), blocks)

Operators: moe.py (dense → MoE), experts.py (clone experts, raise top-k), depth.py (identity layers,
layer maps), width.py (FFN neurons, hidden size); verify.py judges each step by its kind (exact,
diversity, changed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from upcycle.arch import adapter_for
from upcycle.ops.calibrate import LayerStream
from upcycle.ops.grow.depth import add_layers
from upcycle.ops.grow.experts import clone_experts, raise_top_k
from upcycle.ops.grow.moe import distinct_routes, kmeans_rows, to_moe
from upcycle.ops.grow.step import GrowStep
from upcycle.ops.grow.verify import GrowChecks, GrowthNotPreserved, Preservation, preservation
from upcycle.ops.grow.width import widen_ffn, widen_hidden
from upcycle.summary import parameter_count

__all__ = ["GrowStep", "GrowChecks", "GrowthNotPreserved", "Preservation", "StepReport", "apply_step"]

KMEANS_ROWS = 8192  # calibration rows per layer a k-means router is fitted on


@dataclass
class StepReport:
    step: str  # what the step did, one line
    kind: str  # exact | diversity | changed
    why: str
    model_type: str  # the family after the step
    params_before: int
    params_after: int
    seconds: float
    preservation: Preservation | None = None
    facts: dict | None = None

    def line(self) -> str:
        p = self.preservation
        return (
            f"{self.step}: {self.params_before / 1e6:.1f}M → {self.params_after / 1e6:.1f}M parameters "
            f"({self.model_type}), {self.seconds:.1f} s" + (f"; {p.line()}" if p else "")
        )

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("preservation", "facts")}
        out["preservation"] = self.preservation.as_dict() if self.preservation else None
        out["facts"] = {k: v for k, v in (self.facts or {}).items() if k not in ("origin",)}
        return out


def apply_step(
    model,
    step: GrowStep,
    blocks: torch.Tensor | None = None,
    checks: GrowChecks | None = None,
    *,
    calibration: torch.Tensor | None = None,
):
    """(grown model, StepReport): the step applied to `model` (left unchanged), verified on `blocks`
    (token ids, held-out text) when given. A k-means router is fitted on `calibration` blocks
    (default: `blocks`). A step that fails its check raises GrowthNotPreserved."""
    start = time.perf_counter()
    if step.op == "moe":
        text = calibration if calibration is not None else blocks
        routers = kmeans_routers(model, step, text) if step.router == "kmeans" and text is not None else None
        grown, facts = to_moe(model, step, routers)
    else:
        operator = {
            "experts": clone_experts,
            "top_k": raise_top_k,
            "depth": add_layers,
            "ffn_width": widen_ffn,
            "hidden": widen_hidden,
        }[step.op]
        grown, facts = operator(model, step)
    seconds = time.perf_counter() - start
    report = StepReport(
        step.describe(),
        facts["kind"],
        facts["why"],
        grown.config.model_type,
        parameter_count(model),
        parameter_count(grown),
        seconds,
        facts=facts,
    )
    if blocks is not None:
        report.preservation = preservation(
            model,
            grown,
            blocks,
            facts["kind"],
            checks or GrowChecks(),
            facts.get("origin") if step.op == "experts" else None,
        )
        if not report.preservation.passed:
            raise GrowthNotPreserved(f"{report.step}: {report.preservation.line()}")
    return grown, report


def kmeans_routers(model, step: GrowStep, blocks: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each layer's k-means router rows from its FFN inputs on `blocks`, one layer at a time (only one
    layer's inputs are ever in memory)."""
    adapter = adapter_for(model)
    stream = LayerStream(model, blocks)
    generator = torch.Generator().manual_seed(step.seed)
    routers = {}
    for i in range(adapter.num_layers):
        routers[i] = kmeans_rows(stream.module_inputs(adapter.ffn(i))[:KMEANS_ROWS], distinct_routes(step), generator)
        stream.advance()
    return routers
