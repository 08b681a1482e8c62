"""prune: zero most of a model's weights, one-shot — magnitude, Wanda or SparseGPT; unstructured or N:M —
layer by layer on the already-pruned layers' outputs, then the one-shot cost on held-out text.

    pruned, report = upcycle.prune(model, tokenizer, PruneConfig(spec=PruneSpec(method="wanda", sparsity=0.5)))
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle import data
from upcycle.config import Config, option
from upcycle.errors import check
from upcycle.ops.prune import PruneReport, PruneSpec, prune
from upcycle.pipelines import Result, configured

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


def run(
    model, tokenizer, config: PruneConfig | None = None, *, progress: bool = True, **overrides
) -> Result[PruneReport]:
    """The pruned model (a copy unless config.inplace) and its PruneReport (every matrix's zeros)."""
    cfg = configured(PruneConfig, config, overrides)
    calibration = None
    if cfg.spec.method != "magnitude":
        n_blocks = max(1, cfg.calibration_tokens // cfg.seq_len)
        calibration = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=n_blocks)
    held = data.blocks(cfg.calibration, tokenizer, "validation", cfg.seq_len, max_blocks=max(1, 8192 // cfg.seq_len))
    pruned, report = prune(model, cfg.spec, calibration, held, progress=progress, inplace=cfg.inplace)
    return Result(pruned, report)
