"""Growth inside the one trainer: growth steps as a stage transform, so a lineage — dense → MoE, train, more
experts, train — is a list of stages, each growth verified against the model the stage before trained.

    stages: [{name: moe, tokens: 65536, transform: grow,
              transform_options: {steps: [{op: moe, mode: shared, experts: 8, top_k: 2}]}},
             {name: more, tokens: 65536, transform: grow, transform_options: {steps: [{op: experts, factor: 2}]}}]

Each step is `ops.grow.apply_step`: k-means routers fitted on calibration text (train split), the grown
model compared with the model it came from on held-out text (validation split) and judged by its kind
(exact, diversity, changed) — a step that fails its check stops the run before the stage trains. The
transform returns the steps' reports, which the trainer keeps in `stage_reports`.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.config import option
from upcycle.errors import ConfigError
from upcycle.ops.grow import GrowChecks, GrowStep, apply_step
from upcycle.train.registry import register_transform
from upcycle.train.stage_text import StageText


@dataclass
class GrowStageOptions(StageText):
    steps: list[dict] = option(help="the growth steps, in order (each a mapping: op and its options)", factory=list)
    checks: GrowChecks = option(help="what each step's kind must keep (grow's own checks)", factory=GrowChecks)

    def validate(self) -> None:
        if not self.steps:
            raise ConfigError("the grow stage transform needs steps: a list of growth steps (op and its options)")
        self.grow_steps  # every step parsed now: a bad step fails when the run config loads

    @property
    def grow_steps(self) -> list[GrowStep]:
        return [
            s if isinstance(s, GrowStep) else GrowStep.from_dict(s, f"steps[{n}]") for n, s in enumerate(self.steps)
        ]


@register_transform("grow", options=GrowStageOptions)
def grow_stage(model, tokenizer=None, **options):
    """Apply the growth steps in order, each verified on held-out text. Returns (model, the steps' reports)."""
    if tokenizer is None:
        raise ConfigError("the grow stage transform needs the run's tokenizer")
    opts = GrowStageOptions(**options)
    calibration, held = opts.texts(tokenizer)  # k-means routers' text; each step's check
    reports = []
    for step in opts.grow_steps:
        model, report = apply_step(model, step, held, opts.checks, calibration=calibration)
        reports.append(report)
    return model, reports
