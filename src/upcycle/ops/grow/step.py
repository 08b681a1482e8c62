"""One growth step as data: one dataclass per operator, chosen by `op`. A plan is a list of these.

    GrowStep(op="moe", experts=8, top_k=2, mode="shared")   # a MoeStep: dense -> 8 experts top-2 + shared expert
    ExpertsStep(factor=2)                                    # -> 16 experts, top-k doubled
    GrowStep(op="depth", add=6)                              # a DepthStep: +6 identity layers

`GrowStep(op=..., ...)` builds that operator's own class, and an option the operator does not take is a
one-line error naming the options it does take — from Python, a YAML plan and the command line alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from upcycle.arch import moe_families
from upcycle.config import OperatorStep, option
from upcycle.errors import check

MOE_MODES = ("copy", "shared", "granular", "partition", "drop")


@dataclass(kw_only=True)
class GrowStep(OperatorStep):
    """A growth step; `op` names the operator (moe, experts, top_k, depth, ffn_width, hidden)."""

    OPERATORS: ClassVar[dict[str, type]] = {}
    KIND: ClassVar[str] = "growth step"
    op: str | None = option(None, "the growth operator")
    seed: int = option(0, "random draws of this step (router, neuron sets, noise)")
    save: bool = option(False, "save the model after this step in OUT/step-<n>")


@GrowStep.operator("moe", "dense → MoE")
@dataclass(kw_only=True)
class MoeStep(GrowStep):
    family: str = option(
        "auto",
        "the stock MoE family written: auto (the source family's first: Qwen2-MoE for "
        "Llama/Mistral/Qwen2, Qwen3-MoE for Qwen3) or an MoE family (qwen2_moe, qwen3_moe, mixtral)",
    )
    experts: int = option(8, "routed experts per layer")
    top_k: int = option(2, "experts each token is routed to")
    mode: str = option(
        "copy",
        "copy (experts = copies of the FFN, exact), shared (shared expert = the FFN, routed "
        "experts enter with zero output, exact; Qwen2-MoE), granular (copies split into `granularity` "
        "shards, exact with renormalised weights), partition (disjoint neuron sets, exact only when "
        "every expert is chosen), drop (copies with `drop_ratio` of the neurons re-drawn: diversity)",
        choices=MOE_MODES,
    )
    routed: str = option(
        "partition",
        "mode shared: how the routed experts start before their zero output: copy, "
        "partition (disjoint random neuron sets) or random (re-drawn)",
        choices=("copy", "partition", "random"),
    )
    active: bool = option(
        False,
        "mode shared: the routed experts enter with their neurons' own output instead of zero (their down "
        "projection kept, as the seed's reference code does): they carry weight from step 0, and the function "
        "changes (a changed step, measured)",
    )
    granularity: int = option(2, "mode granular: shards per copy of the FFN (experts must be a multiple)")
    expert_width: int | None = option(None, "mode shared: width of each routed expert (default FFN width / experts)")
    router: str = option(
        "kmeans",
        "router init: kmeans (centroids of the FFN's inputs on calibration text, so "
        "routing starts meaningful), random (small normal) or zero (uniform routing)",
        choices=("kmeans", "random", "zero"),
    )
    router_std: float = option(0.02, "random router: standard deviation")
    drop_ratio: float = option(0.5, "mode drop: fraction of each expert's neurons re-drawn")
    normalize: bool = option(
        True, "renormalise the top-k router weights to sum to one (needed for exact copy and granular modes)"
    )

    def validate(self) -> None:
        check(
            self.family == "auto" or self.family in moe_families(),
            "family",
            self.family,
            f"auto or an MoE family ({', '.join(moe_families())})",
        )
        check(self.experts >= 1, "experts", self.experts, "an integer >= 1")
        check(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        check(self.top_k <= self.experts, "top_k", self.top_k, f"at most experts={self.experts}")
        check(self.granularity >= 1, "granularity", self.granularity, "an integer >= 1")
        check(0.0 <= self.drop_ratio <= 1.0, "drop_ratio", self.drop_ratio, "a fraction in [0, 1]")
        check(self.router_std > 0.0, "router_std", self.router_std, "a number > 0")
        check(not self.active or self.mode == "shared", "active", self.active, "only with mode shared")
        if self.mode == "granular":
            check(
                self.experts % self.granularity == 0,
                "experts",
                self.experts,
                f"a multiple of granularity={self.granularity}",
            )

    def describe(self) -> str:
        extra = {
            "granular": f", {self.granularity} shards per copy",
            "drop": f", {self.drop_ratio:g} re-drawn",
            "shared": f", routed {self.routed}" + (" (active from step 0)" if self.active else ""),
        }.get(self.mode, "")
        return (
            f"dense → MoE ({self.family}): {self.experts} experts top-{self.top_k}, mode {self.mode}{extra}, "
            f"router {self.router}"
        )


@GrowStep.operator("experts", "clone each expert")
@dataclass(kw_only=True)
class ExpertsStep(GrowStep):
    factor: int = option(2, "copies of each expert (top-k is multiplied too)")
    noise: float = option(0.0, "relative noise added for diversity (0: exact)")
    redraw: float = option(0.0, "fraction of each clone's neurons re-drawn (Drop-Upcycling; 0: exact)")

    def validate(self) -> None:
        check(self.factor >= 1, "factor", self.factor, "an integer >= 1")
        check(self.noise >= 0.0, "noise", self.noise, "a number >= 0")
        check(0.0 <= self.redraw <= 1.0, "redraw", self.redraw, "a fraction in [0, 1]")

    def describe(self) -> str:
        extra = (f", noise {self.noise:g}" if self.noise else "") + (f", redraw {self.redraw:g}" if self.redraw else "")
        return f"experts ×{self.factor} (top-k ×{self.factor}){extra}"


@GrowStep.operator("top_k", "route to more experts")
@dataclass(kw_only=True)
class TopKStep(GrowStep):
    top_k: int = option(2, "experts each token is routed to")

    def validate(self) -> None:
        check(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")

    def describe(self) -> str:
        return f"top-k → {self.top_k}"


@GrowStep.operator("depth", "more layers")
@dataclass(kw_only=True)
class DepthStep(GrowStep):
    add: int = option(
        0,
        "identity layers to insert (attention output and FFN down projections zero), spread "
        "evenly unless `at` says where",
    )
    at: list[int] | None = option(None, "insert a new layer after each of these layer indices")
    layer_map: list[int] | None = option(
        None,
        "the new stack as source layer indices, e.g. [0,1,2,3,0,1,2,3] "
        "(duplicates trained layers: changes the function, measured)",
    )

    def validate(self) -> None:
        check(self.add >= 0, "add", self.add, "an integer >= 0")
        check(
            bool(self.add or self.at or self.layer_map) and not (self.layer_map and (self.add or self.at)),
            "depth",
            "",
            "give `add` (optionally with `at`), or `layer_map`",
        )
        if self.add and self.at:
            check(self.add == len(self.at), "add", self.add, f"the number of positions in at={self.at}")

    def describe(self) -> str:
        return (
            f"depth: layer map {self.layer_map}"
            if self.layer_map
            else f"depth: +{self.add or len(self.at)} identity layers"
        )


@GrowStep.operator("ffn_width", "wider FFN")
@dataclass(kw_only=True)
class FfnWidthStep(GrowStep):
    width: int | None = option(None, "the new FFN width (dense FFNs and routed experts)")
    noise: float = option(0.0, "relative noise added for diversity (0: exact)")

    def validate(self) -> None:
        check(self.width is not None and self.width >= 1, "width", self.width, "the new FFN width (an integer)")
        check(self.noise >= 0.0, "noise", self.noise, "a number >= 0")

    def describe(self) -> str:
        return f"FFN width → {self.width}" + (f", noise {self.noise:g}" if self.noise else "")


@GrowStep.operator("hidden", "wider hidden size")
@dataclass(kw_only=True)
class HiddenStep(GrowStep):
    factor: int = option(2, "how many times the hidden vector is repeated")
    noise: float = option(0.0, "relative noise added for diversity (0: exact)")

    def validate(self) -> None:
        check(self.factor >= 2, "factor", self.factor, "an integer >= 2 for hidden growth")
        check(self.noise >= 0.0, "noise", self.noise, "a number >= 0")

    def describe(self) -> str:
        return f"hidden size ×{self.factor}" + (f", noise {self.noise:g}" if self.noise else "")
