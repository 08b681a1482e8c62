"""Did a growth step keep the function? Measured on held-out text, judged by the step's kind.

- exact: max |Δlogit| within `tolerance` (float error only), or the step fails;
- diversity: a deliberate perturbation held to the seed's stricter plan unless relaxed — loss change
  below 3 %, mean logit cosine above 0.995, router KL below 0.02;
- changed (top-k raised, a layer map, a non-exact partition): the user asked for a different
  function; measured and reported, never failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from upcycle.arch import adapter_for
from upcycle.config import Config, option
from upcycle.errors import UpcycleError, check
from upcycle.eval import compare
from upcycle.ops.calibrate import hooked, run_blocks


class GrowthNotPreserved(UpcycleError):
    """A growth step that claims to preserve the function (or to stay within thresholds) did not."""


@dataclass
class GrowChecks(Config):
    tolerance: float = option(1e-3, "exact steps: the largest |Δlogit| allowed (float error)")
    max_loss_change: float = option(0.03, "diversity steps: the largest relative rise of the next-token loss")
    min_logit_cosine: float = option(0.995, "diversity steps: the smallest mean cosine of the logit vectors")
    max_router_kl: float = option(0.02, "diversity steps: the largest mean KL of the routing distribution")

    def validate(self) -> None:
        check(self.tolerance > 0, "tolerance", self.tolerance, "a number > 0")


@dataclass
class Preservation:
    kind: str
    max_dlogit: float
    kl: float
    top1: float
    logit_cosine: float
    loss_before: float
    loss_after: float
    loss_change: float
    router_kl: float | None
    tokens: int
    passed: bool

    def line(self) -> str:
        router = f", router KL {self.router_kl:.3g}" if self.router_kl is not None else ""
        verdict = {"exact": "exact", "diversity": "within thresholds", "changed": "changed (reported)"}[self.kind]
        return (
            f"max |Δlogit| {self.max_dlogit:.3g}, mean KL {self.kl:.3g}, top-1 {self.top1:.4f}, logit cosine "
            f"{self.logit_cosine:.6f}, loss {self.loss_before:.4f} → {self.loss_after:.4f} "
            f"({100 * self.loss_change:+.2f} %){router} — {verdict if self.passed else 'FAILED'}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def preservation(
    source, grown, blocks: torch.Tensor, kind: str, checks: GrowChecks, origin: dict[int, list[int]] | None = None
) -> Preservation:
    """Compare `grown` with `source` on `blocks`; `origin[layer][e]` is the source expert that grown
    expert e came from (for the router KL of expert operators)."""
    eq = compare(source, grown, blocks)
    return judge(eq, kind, checks, router_kl(source, grown, blocks, origin) if origin else None)


def judge(eq, kind: str, checks: GrowChecks, router: float | None = None) -> Preservation:
    """The verdict on an Equivalence of grown against source (and a router KL, for expert operators) by
    the step's kind: what `preservation` measures, and a streamed grow gets from its passes."""
    if kind == "exact":
        passed = eq.max_abs_logit <= checks.tolerance
    elif kind == "diversity":
        passed = (
            eq.loss_change < checks.max_loss_change
            and eq.logit_cosine > checks.min_logit_cosine
            and (router is None or router < checks.max_router_kl)
        )
    else:
        passed = True
    return Preservation(
        kind,
        eq.max_abs_logit,
        eq.mean_kl,
        eq.top1_agreement,
        eq.logit_cosine,
        eq.loss_reference,
        eq.loss_candidate,
        eq.loss_change,
        router,
        eq.tokens,
        passed,
    )


@torch.no_grad()
def router_kl(source, grown, blocks: torch.Tensor, origin: dict[int, list[int]]) -> float:
    """Mean over tokens and layers of KL(source routing || grown routing with each grown expert's
    probability added to the source expert it came from)."""
    logits: dict = {}

    def keep(key, module, args, out):
        logits.setdefault(key, []).append(out[0].float())

    for name, model in (("source", source), ("grown", grown)):
        adapter = adapter_for(model)
        with hooked({(name, i): adapter.router(i) for i in origin}, post=keep):
            run_blocks(model, blocks)
    values = []
    for i, parents in origin.items():
        p = F.softmax(torch.cat(logits[("source", i)]), dim=-1)
        q = F.softmax(torch.cat(logits[("grown", i)]), dim=-1)
        q = torch.zeros_like(p).index_add_(1, torch.tensor(parents), q)
        values.append((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1).mean())
    return float(torch.stack(values).mean().clamp_min(0.0))
