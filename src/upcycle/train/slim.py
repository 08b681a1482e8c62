"""Slimming inside the one trainer: cuts as a stage transform, so a schedule of cuts and recovery
training is a list of stages (progressive), and one-shot is every cut at the first stage.

    stages: [{name: depth, tokens: 6554, transform: slim, transform_options: {cuts: [{op: depth, layers: 8}]}},
             {name: width, tokens: 58982, transform: slim, transform_options: {cuts: [{op: hidden, hidden: 384}]}}]

Importance is measured on the model as it is when the stage starts (after the cuts and training before
it), on calibration text. Each cut's report is kept in REPORTS (the slim command writes them out).
"""

from __future__ import annotations

from upcycle import data
from upcycle.ops.slim import CutReport, SlimStep, apply_cut
from upcycle.train.mtp import attach_mtp, detach_mtp
from upcycle.train.trainer import register_transform

REPORTS: list[CutReport] = []  # the cuts the slim transform made in this process, in order


@register_transform("slim")
def slim_stage(model, tokenizer=None, cuts: list | None = None, calibration: str = "shakespeare+pystdlib",
               calibration_tokens: int = 8192, seq_len: int = 256, held_tokens: int = 4096, mtp: bool = False):
    """Apply `cuts` (SlimStep mappings) in order, each chosen on calibration text (train split) and
    measured on held-out text (validation split); with `mtp`, the result gets a multi-token-prediction
    head of its (new) hidden size for the `mtp` loss."""
    if tokenizer is None:
        raise ValueError("the slim stage transform needs the run's tokenizer")
    blocks = data.blocks(calibration, tokenizer, "train", seq_len, max_blocks=max(1, calibration_tokens // seq_len))
    held = data.blocks(calibration, tokenizer, "validation", seq_len, max_blocks=max(1, held_tokens // seq_len))
    for n, options in enumerate(cuts or []):
        step = options if isinstance(options, SlimStep) else SlimStep.from_dict(options, f"cuts[{n}]")
        model, report = apply_cut(detach_mtp(model), step, blocks, held)
        REPORTS.append(report)
    return attach_mtp(model) if mtp else model
