"""One cut as data: one dataclass per cut, chosen by `op`. A slimming plan is a list of these.

    SlimStep(op="depth", layers=8, criterion="block_influence")   # a DepthCut: drop the 8 least influential layers
    HiddenCut(hidden=384)                                         # keep 384 hidden channels
    SlimStep(op="experts", experts=4, criterion="reap", mode="partial")

`SlimStep(op=..., ...)` builds that cut's own class; an option the cut does not take is a one-line
error naming the options it does take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from upcycle.config import OperatorStep, option
from upcycle.errors import check


@dataclass(kw_only=True)
class SlimStep(OperatorStep):
    """A cut; `op` names it (depth, hidden, ffn_width, heads, experts). `criterion` auto: the cut's first."""

    OPERATORS: ClassVar[dict[str, type]] = {}
    KIND: ClassVar[str] = "cut"
    CRITERIA: ClassVar[tuple[str, ...]] = ()
    op: str | None = option(None, "the cut")
    criterion: str = option("auto", "how importance is measured (auto: the cut's first criterion)")

    def validate(self) -> None:
        check(
            self.criterion == "auto" or self.criterion in self.CRITERIA,
            "criterion",
            self.criterion,
            f"for op {self.op} one of auto, {', '.join(self.CRITERIA)}",
        )
        self.check_amount()

    def check_amount(self) -> None: ...

    @property
    def rule(self) -> str:
        """The criterion in force (auto resolved)."""
        return self.CRITERIA[0] if self.criterion == "auto" else self.criterion

    def describe(self) -> str:
        return f"{self.amount()} by {self.rule}"


def _at_least_one(name: str, value) -> None:
    check(value is not None and value >= 1, name, value, "an integer >= 1 (the amount to keep or cut)")


@SlimStep.operator("depth", "drop layers: last (SlimQwen), block_influence (ShortGPT) or angular (Gromov et al.)")
@dataclass(kw_only=True)
class DepthCut(SlimStep):
    CRITERIA: ClassVar[tuple[str, ...]] = ("last", "block_influence", "angular")
    layers: int = option(0, "how many layers to drop")

    def check_amount(self) -> None:
        _at_least_one("layers", self.layers)

    def amount(self) -> str:
        return f"-{self.layers} layers"


@SlimStep.operator("hidden", "hidden channels, by rmsnorm")
@dataclass(kw_only=True)
class HiddenCut(SlimStep):
    CRITERIA: ClassVar[tuple[str, ...]] = ("rmsnorm",)
    hidden: int | None = option(None, "the hidden size to keep")

    def check_amount(self) -> None:
        _at_least_one("hidden", self.hidden)

    def amount(self) -> str:
        return f"hidden → {self.hidden}"


@SlimStep.operator("ffn_width", "FFN neurons of dense FFNs, by activation")
@dataclass(kw_only=True)
class FfnWidthCut(SlimStep):
    CRITERIA: ClassVar[tuple[str, ...]] = ("activation",)
    width: int | None = option(None, "the FFN width to keep")

    def check_amount(self) -> None:
        _at_least_one("width", self.width)

    def amount(self) -> str:
        return f"FFN width → {self.width}"


@SlimStep.operator("heads", "query heads, by output_norm")
@dataclass(kw_only=True)
class HeadsCut(SlimStep):
    CRITERIA: ClassVar[tuple[str, ...]] = ("output_norm",)
    heads: int | None = option(None, "query heads to keep per layer (a multiple of the key/value heads)")

    def check_amount(self) -> None:
        _at_least_one("heads", self.heads)

    def amount(self) -> str:
        return f"query heads → {self.heads}"


@SlimStep.operator("experts", "routed experts: frequency, soft or reap")
@dataclass(kw_only=True)
class ExpertsCut(SlimStep):
    CRITERIA: ClassVar[tuple[str, ...]] = ("frequency", "soft", "reap")
    experts: int | None = option(None, "routed experts to keep per layer")
    top_k: int | None = option(None, "the new top-k (default: the old one, at most the experts left)")
    mode: str = option(
        "prune",
        "prune (drop), merge (each dropped expert joins its most similar kept one, "
        "usage-weighted) or partial (SlimQwen: the top half kept, the next become merge bases)",
        choices=("prune", "merge", "partial"),
    )
    similarity: str = option(
        "router_logits",
        "merge/partial: router_logits (cosine of their logits on calibration "
        "text), router_weight (of their router rows) or parameters",
        choices=("router_logits", "router_weight", "parameters"),
    )

    def check_amount(self) -> None:
        _at_least_one("experts", self.experts)
        check(self.top_k is None or self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        check(self.top_k is None or self.top_k <= self.experts, "top_k", self.top_k, f"at most experts={self.experts}")

    def amount(self) -> str:
        return f"experts → {self.experts} ({self.mode}{', ' + self.similarity if self.mode != 'prune' else ''})"
