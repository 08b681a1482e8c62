"""Slimming inside the one trainer: cuts as a stage transform, so a schedule of cuts and recovery
training is a list of stages (progressive), and one-shot is every cut at the first stage.

    stages: [{name: depth, tokens: 6554, transform: slim, transform_options: {cuts: [{op: depth, layers: 8}]}},
             {name: width, tokens: 58982, transform: slim, transform_options: {cuts: [{op: hidden, hidden: 384}]}}]

Importance is measured on the model as it is when the stage starts (after the cuts and training before
it), on calibration text — unless `recompute: false`: then every cut reads the scores measured once on the
source (ops/slim/lineage.py). Each cut's report is kept in REPORTS (the slim command writes them out).
"""

from __future__ import annotations

from upcycle import data
from upcycle.ops.slim import CutReport, SlimStep, apply_cut
from upcycle.ops.slim.lineage import Lineage, source_scores
from upcycle.train.mtp import attach_mtp, detach_mtp
from upcycle.train.trainer import register_transform

REPORTS: list[CutReport] = []  # the cuts the slim transform made in this process, in order
# recompute false: the source's scores and where each part of the current model came from
STATE: dict = {"scores": None, "lineage": None}


def reset(scores: dict | None = None, lineage: Lineage | None = None) -> None:
    """A new plan: no reports yet; the source's scores (None: measure every cut anew) and lineage."""
    REPORTS.clear()
    STATE.update(scores=scores, lineage=lineage)


def cut(model, step: SlimStep, blocks, held):
    """One cut, with the source's scores where the plan keeps them; its report recorded."""
    lineage = STATE["lineage"]
    scores = lineage.read(STATE["scores"], step) if lineage is not None else None
    model, report = apply_cut(model, step, blocks, held, scores=scores)
    if lineage is not None:
        STATE["lineage"] = lineage.after(step, report.removed)
    REPORTS.append(report)
    return model, report


@register_transform("slim")
def slim_stage(model, tokenizer=None, cuts: list | None = None, calibration: str = "shakespeare+pystdlib",
               calibration_tokens: int = 8192, seq_len: int = 256, held_tokens: int = 4096, mtp: bool = False,
               recompute: bool = True):
    """Apply `cuts` (SlimStep mappings) in order, each chosen on calibration text (train split) and
    measured on held-out text (validation split); with `mtp`, the result gets a multi-token-prediction
    head of its (new) hidden size for the `mtp` loss."""
    if tokenizer is None:
        raise ValueError("the slim stage transform needs the run's tokenizer")
    blocks = data.blocks(calibration, tokenizer, "train", seq_len, max_blocks=max(1, calibration_tokens // seq_len))
    held = data.blocks(calibration, tokenizer, "validation", seq_len, max_blocks=max(1, held_tokens // seq_len))
    steps = [o if isinstance(o, SlimStep) else SlimStep.from_dict(o, f"cuts[{n}]") for n, o in enumerate(cuts or [])]
    if not recompute and STATE["lineage"] is None:  # first stage of a plan run outside `upcycle slim`: its model is the source
        reset(source_scores(detach_mtp(model), steps, blocks), Lineage.of(detach_mtp(model)))
    for step in steps:
        model, _ = cut(detach_mtp(model), step, blocks, held)
    return attach_mtp(model) if mtp else model
