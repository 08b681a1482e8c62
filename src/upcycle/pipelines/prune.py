"""prune: zero most of a model's weights, one-shot — magnitude, Wanda or SparseGPT; unstructured or N:M —
layer by layer on the already-pruned layers' outputs, then the one-shot cost on held-out text.

    pruned, report = upcycle.prune(model, tokenizer, PruneConfig(spec=PruneSpec(method="wanda", sparsity=0.5)))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from upcycle import data
from upcycle.config import Config, RunOptions, option
from upcycle.errors import ConfigError, check
from upcycle.ops.prune import PruneReport, PruneSpec, check_pattern, prune, prune_layer, pruning_record
from upcycle.pipelines import Result, configured
from upcycle.pipelines.streaming import LayerPass, StreamReport, open_source, shard_bytes

__all__ = ["PruneConfig", "PruneSpec", "PruneReport", "run"]


@dataclass
class PruneConfig(Config):
    spec: PruneSpec = option(help="what to prune and how", factory=PruneSpec, cli=False)
    calibration: str = option(
        "shakespeare+pystdlib",
        "text for Wanda's and SparseGPT's statistics (train split) and for the one-shot measurement (validation split)",
    )
    calibration_tokens: int = option(
        32768, "tokens of calibration text (the papers use 128 × 2048; the held-out measurement reads 8192)"
    )
    seq_len: int = option(256, "length of the text blocks")
    held_tokens: int = option(
        8192,
        "tokens of held-out text (validation split) the one-shot cost is measured on (0: not measured — "
        "for a large model scored apart, it saves two forwards of the text through the whole model)",
    )
    inplace: bool = option(
        False,
        "prune the model given (one model in memory, as a large model needs; the one-shot "
        "cost is then perplexity before/after) instead of a copy (adds KL against the source)",
        cli=False,
    )

    def validate(self) -> None:
        check(
            self.calibration_tokens >= self.seq_len,
            "calibration_tokens",
            self.calibration_tokens,
            f"at least seq_len={self.seq_len}",
        )
        check(self.held_tokens >= 0, "held_tokens", self.held_tokens, "0 (not measured) or more")


def text(cfg: PruneConfig, tokenizer):
    """(calibration blocks, or None for magnitude; held-out blocks for the one-shot cost)."""
    calibration = None
    if cfg.spec.method != "magnitude":
        n_blocks = max(1, cfg.calibration_tokens // cfg.seq_len)
        calibration = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=n_blocks)
    if not cfg.held_tokens:
        return calibration, None
    held = data.blocks(
        cfg.calibration, tokenizer, "validation", cfg.seq_len, max_blocks=max(1, cfg.held_tokens // cfg.seq_len)
    )
    return calibration, held


def run(
    model, tokenizer, config: PruneConfig | None = None, *, progress: bool = True, **overrides
) -> Result[PruneReport]:
    """The pruned model (a copy unless config.inplace) and its PruneReport (every matrix's zeros)."""
    cfg = configured(PruneConfig, config, overrides)
    calibration, held = text(cfg, tokenizer)
    pruned, report = prune(model, cfg.spec, calibration, held, progress=progress, inplace=cfg.inplace)
    return Result(pruned, report)


def run_streamed(
    source, out, config: PruneConfig | None = None, *, options: RunOptions = RunOptions(), report_files=None
) -> tuple[Path, PruneReport, StreamReport]:
    """Prune a checkpoint on disk layer by layer into OUT (shards), never holding more than one layer: the
    same statistics, masks and reconstruction as `run` (each layer's from the inputs the pruned layers
    below give it), and the one-shot cost measured on the way (source and pruned model both streamed).
    `report_files(folder)` writes the run's report into OUT before it is renamed into place."""
    cfg = configured(PruneConfig, config, {})
    lazy, tokenizer = open_source(source, options)
    if tokenizer is None:
        raise ConfigError(f"{source}: the folder has no tokenizer, which the calibration text needs")
    check_pattern(lazy.adapter, cfg.spec)
    calibration, held = text(cfg, tokenizer)
    report = PruneReport(cfg.spec.describe(), 0.0)
    held_ = {"held": held} if held is not None else {}
    output = held_ | ({"calibration": calibration} if calibration is not None else {})
    pass_ = LayerPass(
        lazy,
        source=held_,
        output=output,
        out=out,
        shard_bytes=shard_bytes(options),
        tokenizer=tokenizer,
        progress=options.progress,
        desc=f"prune ({cfg.spec.method})",
    )
    with pass_ as p:
        start = time.perf_counter()
        for i in p.layers():
            prune_layer(lazy.adapter, i, cfg.spec, p.output.get("calibration"), report)
        report.seconds = time.perf_counter() - start
        if held is not None:
            eq = p.equivalence("held")
            report.ppl_before, report.ppl_after = math.exp(eq.loss_reference), math.exp(eq.loss_candidate)
            report.kl, report.top1 = eq.mean_kl, eq.top1_agreement
        p.config_changes["upcycle_pruning"] = pruning_record(cfg.spec, report)
        folder = p.finish(report=None if report_files is None else lambda tmp: report_files(tmp, report, p.report))
    return folder, report, p.report
