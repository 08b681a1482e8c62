"""One growth step as data: the operator, its mode and options. A plan is a list of these.

    GrowStep(op="moe", experts=8, top_k=2, mode="shared")   # dense -> 8 experts top-2 + shared expert
    GrowStep(op="experts", factor=2)                         # -> 16 experts, top-k doubled
    GrowStep(op="depth", add=6)                              # +6 identity layers

Each field says which operator reads it; the others ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.config import Config, option
from upcycle.errors import check

OPS = ("moe", "experts", "top_k", "depth", "ffn_width", "hidden")
MOE_MODES = ("copy", "shared", "granular", "partition", "drop")


@dataclass
class GrowStep(Config):
    op: str | None = option(None, "the growth operator: moe (dense → MoE), experts (clone each expert), top_k "
                            "(route to more experts), depth (more layers), ffn_width (wider FFN), hidden (wider "
                            "hidden size)", choices=OPS)
    # ---- moe ----
    family: str = option("auto", "moe: the stock MoE family written (auto: Qwen2-MoE for Llama/Mistral/Qwen2, "
                         "Qwen3-MoE for Qwen3)", choices=("auto", "qwen2_moe", "qwen3_moe", "mixtral"))
    experts: int = option(8, "moe: routed experts per layer")
    top_k: int = option(2, "moe, top_k: experts each token is routed to")
    mode: str = option("copy", "moe: copy (experts = copies of the FFN, exact), shared (shared expert = the FFN, "
                       "routed experts enter with zero output, exact; Qwen2-MoE), granular (copies split into "
                       "`granularity` shards, exact with renormalised weights), partition (disjoint neuron sets, "
                       "exact only when every expert is chosen), drop (copies with `drop_ratio` of the neurons "
                       "re-drawn: diversity)", choices=MOE_MODES)
    routed: str = option("partition", "moe shared: how the routed experts start before their zero output: copy, "
                         "partition (disjoint random neuron sets) or random (re-drawn)",
                         choices=("copy", "partition", "random"))
    granularity: int = option(2, "moe granular: shards per copy of the FFN (experts must be a multiple)")
    expert_width: int | None = option(None, "moe shared: width of each routed expert (default FFN width / experts)")
    router: str = option("kmeans", "moe: router init: kmeans (centroids of the FFN's inputs on calibration text, "
                         "so routing starts meaningful), random (small normal) or zero (uniform routing)",
                         choices=("kmeans", "random", "zero"))
    router_std: float = option(0.02, "moe random router: standard deviation")
    drop_ratio: float = option(0.5, "moe drop, experts redraw: fraction of each expert's neurons re-drawn")
    normalize: bool = option(True, "moe: renormalise the top-k router weights to sum to one (needed for exact "
                             "copy and granular modes)")
    # ---- experts ----
    factor: int = option(2, "experts: copies of each expert (top-k is multiplied too); hidden: how many times "
                         "the hidden vector is repeated")
    noise: float = option(0.0, "experts, ffn_width, hidden: relative noise added for diversity (0: exact)")
    redraw: float = option(0.0, "experts: fraction of each clone's neurons re-drawn (Drop-Upcycling; 0: exact)")
    # ---- depth ----
    add: int = option(0, "depth: identity layers to insert (attention output and FFN down projections zero), "
                      "spread evenly unless `at` says where")
    at: list[int] | None = option(None, "depth: insert a new layer after each of these layer indices")
    layer_map: list[int] | None = option(None, "depth: the new stack as source layer indices, e.g. [0,1,2,3,0,1,2,3] "
                                         "(duplicates trained layers: changes the function, measured)")
    # ---- ffn_width ----
    width: int | None = option(None, "ffn_width: the new FFN width (dense FFNs and routed experts)")
    seed: int = option(0, "random draws of this step (router, neuron sets, noise)")
    save: bool = option(False, "save the model after this step in OUT/step-<n>")

    def validate(self) -> None:
        check(self.experts >= 1, "experts", self.experts, "an integer >= 1")
        check(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        check(self.granularity >= 1, "granularity", self.granularity, "an integer >= 1")
        check(self.factor >= 1, "factor", self.factor, "an integer >= 1")
        check(0.0 <= self.drop_ratio <= 1.0, "drop_ratio", self.drop_ratio, "a fraction in [0, 1]")
        check(0.0 <= self.redraw <= 1.0, "redraw", self.redraw, "a fraction in [0, 1]")
        check(self.noise >= 0.0, "noise", self.noise, "a number >= 0")
        check(self.router_std > 0.0, "router_std", self.router_std, "a number > 0")
        check(self.add >= 0, "add", self.add, "an integer >= 0")
        if self.op == "moe":
            check(self.top_k <= self.experts, "top_k", self.top_k, f"at most experts={self.experts}")
            if self.mode == "granular":
                check(self.experts % self.granularity == 0, "experts", self.experts,
                      f"a multiple of granularity={self.granularity}")
        if self.op == "depth":
            check(bool(self.add or self.at or self.layer_map) and not (self.layer_map and (self.add or self.at)),
                  "depth", "", "give `add` (optionally with `at`), or `layer_map`")
            if self.add and self.at:
                check(self.add == len(self.at), "add", self.add, f"the number of positions in at={self.at}")
        if self.op == "ffn_width":
            check(self.width is not None and self.width >= 1, "width", self.width, "the new FFN width (an integer)")
        if self.op == "hidden":
            check(self.factor >= 2, "factor", self.factor, "an integer >= 2 for hidden growth")

    def describe(self) -> str:
        """One line a person reads in a report: what this step does."""
        if self.op == "moe":
            extra = {"granular": f", {self.granularity} shards per copy", "drop": f", {self.drop_ratio:g} re-drawn",
                     "shared": f", routed {self.routed}"}.get(self.mode, "")
            return (f"dense → MoE ({self.family}): {self.experts} experts top-{self.top_k}, mode {self.mode}{extra}, "
                    f"router {self.router}")
        if self.op == "experts":
            extra = (f", noise {self.noise:g}" if self.noise else "") + (f", redraw {self.redraw:g}" if self.redraw else "")
            return f"experts ×{self.factor} (top-k ×{self.factor}){extra}"
        if self.op == "top_k":
            return f"top-k → {self.top_k}"
        if self.op == "depth":
            return f"depth: layer map {self.layer_map}" if self.layer_map else f"depth: +{self.add or len(self.at)} identity layers"
        if self.op == "ffn_width":
            return f"FFN width → {self.width}" + (f", noise {self.noise:g}" if self.noise else "")
        return f"hidden size ×{self.factor}" + (f", noise {self.noise:g}" if self.noise else "")
