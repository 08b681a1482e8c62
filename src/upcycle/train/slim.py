"""Slimming inside the one trainer: cuts as a stage transform, so a schedule of cuts and recovery
training is a list of stages (progressive), and one-shot is every cut at the first stage.

    stages: [{name: depth, tokens: 6554, transform: slim, transform_options: {cuts: [{op: depth, layers: 8}]}},
             {name: width, tokens: 58982, transform: slim, transform_options: {cuts: [{op: hidden, hidden: 384}]}}]

Importance is measured on the model as it is when the stage starts (after the cuts and training before
it), on calibration text — unless `recompute: false`: then every cut reads the scores measured once on the
source (ops/slim/lineage.py). The transform returns the stage's cut reports (the trainer keeps them in
`stage_reports`); what one stage hands the next (the source's scores and the lineage) lives in the run's
`state`, never in this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.config import option
from upcycle.errors import ConfigError
from upcycle.ops.slim import CutReport, SlimStep, apply_cut, parse_step
from upcycle.ops.slim.lineage import Lineage, source_scores
from upcycle.train.mtp import attach_mtp, detach_mtp
from upcycle.train.registry import register_transform
from upcycle.train.stage_text import StageText


@dataclass
class SlimStageOptions(StageText):
    cuts: list[dict] = option(help="the cuts, in order (each a mapping: op and its options)", factory=list)
    mtp: bool = option(False, "give the result a multi-token-prediction head (for the mtp loss)")
    recompute: bool = option(True, "measure each cut's importance anew (false: once, on the source)")

    def validate(self) -> None:
        self.steps  # every cut parsed now: a bad cut fails when the run config loads

    @property
    def steps(self) -> list[SlimStep]:
        return [c if isinstance(c, SlimStep) else parse_step(c, f"cuts[{n}]") for n, c in enumerate(self.cuts)]


class SlimState:
    """What a slimming plan carries from cut to cut: the source's scores (None: measure every cut anew)
    and where each part of the current model came from."""

    def __init__(self, scores: dict | None = None, lineage: Lineage | None = None):
        self.scores, self.lineage = scores, lineage

    def cut(self, model, step: SlimStep, blocks, held) -> tuple[object, CutReport]:
        scores = self.lineage.read(self.scores, step) if self.lineage is not None else None
        model, report = apply_cut(model, step, blocks, held, scores=scores)
        if self.lineage is not None:
            self.lineage = self.lineage.after(step, report.removed)
        return model, report


@register_transform("slim", options=SlimStageOptions)
def slim_stage(model, tokenizer=None, state: dict | None = None, **options):
    """Apply the cuts in order, each chosen on calibration text (train split) and measured on held-out
    text (validation split); with `mtp`, the result gets a multi-token-prediction head of its (new)
    hidden size. Returns (model, the cuts' reports)."""
    if tokenizer is None:
        raise ConfigError("the slim stage transform needs the run's tokenizer")
    opts = SlimStageOptions(**options)
    blocks, held = opts.texts(tokenizer)
    state = {} if state is None else state
    if "slim" not in state:  # the plan's first stage: its model is the source
        source = detach_mtp(model)
        state["slim"] = (
            SlimState(source_scores(source, opts.steps, blocks), Lineage.of(source))
            if not opts.recompute
            else SlimState()
        )
    reports = []
    for step in opts.steps:
        model, report = state["slim"].cut(detach_mtp(model), step, blocks, held)
        reports.append(report)
    return (attach_mtp(model) if opts.mtp else model), reports
