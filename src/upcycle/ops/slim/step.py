"""One cut as data: what to remove, by which criterion. A slimming plan is a list of these.

    SlimStep(op="depth", layers=8, criterion="block_influence")   # drop the 8 least influential layers
    SlimStep(op="hidden", hidden=384)                             # keep 384 hidden channels
    SlimStep(op="experts", experts=4, criterion="reap", mode="partial")
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.config import Config, option
from upcycle.errors import check

OPS = ("depth", "hidden", "ffn_width", "heads", "experts")
CRITERIA = {"depth": ("last", "block_influence", "angular"), "hidden": ("rmsnorm",), "ffn_width": ("activation",),
            "heads": ("output_norm",), "experts": ("frequency", "soft", "reap")}


@dataclass
class SlimStep(Config):
    op: str | None = option(None, "the cut: depth (drop layers), hidden (hidden channels), ffn_width (FFN neurons "
                            "of dense FFNs), heads (query heads), experts (routed experts)", choices=OPS)
    criterion: str = option("auto", "how importance is measured — depth: last (SlimQwen), block_influence (ShortGPT) "
                            "or angular (Gromov et al.); hidden: rmsnorm; ffn_width: activation; heads: "
                            "output_norm; experts: frequency, soft or reap (auto: the first of each)")
    layers: int = option(0, "depth: how many layers to drop")
    hidden: int | None = option(None, "hidden: the hidden size to keep")
    width: int | None = option(None, "ffn_width: the FFN width to keep")
    heads: int | None = option(None, "heads: query heads to keep per layer (a multiple of the key/value heads)")
    experts: int | None = option(None, "experts: routed experts to keep per layer")
    top_k: int | None = option(None, "experts: the new top-k (default: the old one, at most the experts left)")
    mode: str = option("prune", "experts: prune (drop), merge (each dropped expert joins its most similar kept one, "
                       "usage-weighted) or partial (SlimQwen: the top half kept, the next become merge bases)",
                       choices=("prune", "merge", "partial"))
    similarity: str = option("router_logits", "experts merge/partial: router_logits (cosine of their logits on "
                             "calibration text), router_weight (of their router rows) or parameters",
                             choices=("router_logits", "router_weight", "parameters"))

    def validate(self) -> None:
        if self.op is not None:
            allowed = CRITERIA[self.op]
            check(self.criterion == "auto" or self.criterion in allowed, "criterion", self.criterion,
                  f"for op {self.op} one of {', '.join(allowed)}")
        check(self.layers >= 0, "layers", self.layers, "an integer >= 0")
        for name in ("hidden", "width", "heads", "experts", "top_k"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, value, "an integer >= 1")
        needed = {"depth": "layers", "hidden": "hidden", "ffn_width": "width", "heads": "heads", "experts": "experts"}
        if self.op is not None:
            field = needed[self.op]
            check(bool(getattr(self, field)), field, getattr(self, field), f"the amount to cut for op {self.op}")
        if self.top_k is not None and self.experts is not None:
            check(self.top_k <= self.experts, "top_k", self.top_k, f"at most experts={self.experts}")

    @property
    def rule(self) -> str:
        """The criterion in force (auto resolved)."""
        return CRITERIA[self.op][0] if self.criterion == "auto" else self.criterion

    def describe(self) -> str:
        amount = {"depth": f"-{self.layers} layers", "hidden": f"hidden → {self.hidden}", "ffn_width": f"FFN width → "
                  f"{self.width}", "heads": f"query heads → {self.heads}", "experts": f"experts → {self.experts} "
                  f"({self.mode}{', ' + self.similarity if self.mode != 'prune' else ''})"}[self.op]
        return f"{amount} by {self.rule}"
