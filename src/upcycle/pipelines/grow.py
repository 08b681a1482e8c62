"""grow: a model made larger — dense → MoE, more experts, deeper, wider — step by step, each step
verified against the model before it, then the grown model against the source.

    grown, report = upcycle.grow(model, tokenizer, GrowConfig(steps=[GrowStep(op="moe", experts=8)]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upcycle import data
from upcycle.config import Config, option, read_plan
from upcycle.errors import ConfigError, check
from upcycle.eval import compare
from upcycle.ops.grow import GrowChecks, GrowStep, GrowthNotPreserved, StepReport, apply_step
from upcycle.pipelines import Result, configured

__all__ = ["GrowConfig", "GrowReport", "GrowStep", "GrowChecks", "run"]


@dataclass
class GrowConfig(Config):
    plan: str | None = option(
        None,
        "a growth plan: a YAML file with `steps:`, a list of steps (each: op and its "
        "options), applied in order and each verified",
    )
    steps: list[GrowStep] | None = option(None, "the plan's steps given inline (a --config recipe's form)")
    checks: GrowChecks = option(help="what each step's verification allows", factory=GrowChecks, cli=False)
    calibration: str = option(
        "shakespeare+pystdlib", "text for k-means routers (train split) and for verifying each step (validation split)"
    )
    calibration_tokens: int = option(8192, "tokens of text for k-means and for the verification each")
    seq_len: int = option(256, "length of the text blocks")

    def validate(self) -> None:
        check(
            self.calibration_tokens >= self.seq_len,
            "calibration_tokens",
            self.calibration_tokens,
            f"at least seq_len={self.seq_len}",
        )
        check(self.plan is None or self.steps is None, "plan", self.plan, "a plan file or inline steps, not both")

    def plan_steps(self) -> list[GrowStep]:
        """The steps to apply: the plan file's or the inline list."""
        if self.plan is not None:
            return read_plan(self.plan, "steps", GrowStep, "steps")
        if self.steps:
            return list(self.steps)
        raise ConfigError("nothing to grow: give --op (e.g. --op moe --experts 8 --top-k 2) or --plan FILE")


@dataclass
class GrowReport:
    steps: list[GrowStep]
    reports: list[StepReport]  # one per step, each against the model before it
    equivalence: dict  # the grown model against the source, on held-out text
    loss_change: float
    exact: bool  # every step exact
    saved: list = field(default_factory=list, repr=False)  # the model after each step marked `save` (else None)

    def as_dict(self) -> dict:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "reports": [r.as_dict() for r in self.reports],
            "overall": {"equivalence": self.equivalence, "loss_change": self.loss_change, "exact": self.exact},
        }


def run(
    model, tokenizer, config: GrowConfig | None = None, *, progress: bool = True, **overrides
) -> Result[GrowReport]:
    """Apply every step of the plan in order, each verified against the model before it (a step that
    fails its check raises GrowthNotPreserved); then the grown model against the source."""
    cfg = configured(GrowConfig, config, overrides)
    steps = cfg.plan_steps()
    n_blocks = max(1, cfg.calibration_tokens // cfg.seq_len)
    held = data.blocks(cfg.calibration, tokenizer, "validation", cfg.seq_len, max_blocks=n_blocks)
    calibration = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=n_blocks)
    current, reports, saved = model, [], []
    for step in steps:
        current, report = apply_step(current, step, held, cfg.checks, calibration=calibration)
        reports.append(report)
        saved.append(current if step.save else None)
    overall = compare(model, current, held)
    exact = all(r.kind == "exact" for r in reports)
    eq = overall.as_dict()
    if exact and eq["max_abs_logit"] > cfg.checks.tolerance:
        raise GrowthNotPreserved(
            f"every step is exact but the grown model drifted from the source: max |Δlogit| "
            f"{eq['max_abs_logit']:.3g} > tolerance {cfg.checks.tolerance:g}"
        )
    return Result(current, GrowReport(steps, reports, eq, overall.loss_change, exact, saved))
