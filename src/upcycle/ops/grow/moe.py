"""dense → MoE: every layer's SwiGLU FFN becomes a stock MoE block that (in the exact modes) computes
the same function at step 0.

Why each mode is or is not exact (y = FFN(x); w_e the router's top-k weights):
- copy: every expert is the FFN, so Σ_e w_e · FFN(x) = FFN(x) whenever Σ w_e = 1 (renormalised top-k),
  for any router.
- shared: the shared expert is the FFN; Qwen2-MoE multiplies it by sigmoid(g·x): g = 0 gives exactly
  ½, so its down projection is doubled; the routed experts' down projections are zero.
- granular: E/G copies, each cut into G shards of F/G neurons (the shards of a copy sum to the FFN);
  the shards of a copy share one router row, so top-(K·G) picks whole copies and, renormalised, the
  shard weights of the chosen copies sum to 1/G each: down projections × G make it exact (when top-k
  is a multiple of G). Megatron's (E·G/K)^(1/3) scale is for weights that are not renormalised.
- partition (LLaMA-MoE): disjoint neuron sets; the sum over *all* experts is the FFN, so only top-k =
  E with a uniform router (and down × E) is exact; otherwise the deviation is measured.
- drop (Drop-Upcycling): copies with a fraction of each expert's neurons re-drawn: a diversity mode.
"""

from __future__ import annotations

import math

import torch

from upcycle.arch import FAMILIES, SwiGLUWeights, adapter_for
from upcycle.arch.reexpress import moe_shell
from upcycle.errors import ConfigError, UnsupportedArchitecture
from upcycle.ops.grow.copying import neurons, redraw, stack
from upcycle.ops.grow.step import GrowStep

KMEANS_LOGIT = 4.0  # a k-means router gives a token at the mean input norm a logit of 4·cos(token, centroid)


def target_family(model, step: GrowStep) -> str:
    source = model.config.model_type
    if source not in FAMILIES or not FAMILIES[source].moe_targets:
        raise UnsupportedArchitecture(
            f"op moe needs a dense model; this one is {source} (use op experts or top_k to grow an MoE)"
        )
    return FAMILIES[source].moe_targets[0] if step.family == "auto" else step.family


def to_moe(model, step: GrowStep, routers: dict[int, torch.Tensor] | None = None):
    """(MoE model, facts) from a dense model; `routers` (layer -> k-means router rows, see
    kmeans_rows and distinct_routes) are needed for router kmeans.
    facts: {"kind": "exact" | "diversity" | "changed", "why": ..., "family": ..., "router": ...}."""
    source = adapter_for(model)
    family, expert_width, shared_width = moe_widths(model, step)
    if step.router == "kmeans" and routers is None:
        raise ConfigError("router kmeans needs calibration text (the FFN inputs); pass it, or router random")
    grown = moe_shell(
        model,
        family,
        experts=step.experts,
        top_k=step.top_k,
        expert_width=expert_width,
        shared_width=shared_width,
        normalize=step.normalize,
    )
    target = adapter_for(grown)
    generator = torch.Generator().manual_seed(step.seed)
    for i in range(source.num_layers):
        moe_layer(source, target, i, step, routers.get(i) if routers else None, generator)
    if not all(torch.isfinite(p).all() for p in grown.parameters()):
        raise RuntimeError("dense → MoE left a weight unwritten")  # a bug, not the user's input
    kind, why = moe_kind(step, family)
    return grown, {
        "kind": kind,
        "why": why,
        "family": family,
        "router": step.router,
        "expert_width": expert_width,
        "shared_width": shared_width if FAMILIES[family].has_shared_expert else None,
    }


def moe_widths(model, step: GrowStep) -> tuple[str, int, int]:
    """(target family, routed expert width, shared expert width) of `step` on a dense model, its options
    checked against the model's shapes (meta tensors are enough)."""
    source = adapter_for(model)
    family = target_family(model, step)
    width = source.ffn_weights(0).width
    if step.mode == "shared" and not FAMILIES[family].has_shared_expert:
        with_shared = [f for f, cls in FAMILIES.items() if cls.has_shared_expert]
        raise ConfigError(f"mode shared needs a family with a shared expert ({', '.join(with_shared)}), not {family}")
    if step.mode == "granular" and width % step.granularity:
        raise ConfigError(f"granularity={step.granularity} does not divide the FFN width {width}")
    if step.mode == "partition" and width % step.experts:
        raise ConfigError(f"experts={step.experts} does not divide the FFN width {width} (mode partition)")
    if any(source.ffn_weights(i).width != width for i in range(source.num_layers)):
        raise UnsupportedArchitecture("dense → MoE needs one FFN width in every layer")
    return (family, *_widths(step, width))


def moe_layer(
    source, target, i: int, step: GrowStep, kmeans: torch.Tensor | None, generator, *, share: bool = False
) -> None:
    """Layer i's MoE block in `target` written from the dense FFN of layer i in `source`: its experts, its
    router (k-means rows `kmeans` where the step's router is kmeans) and its shared expert. `share`: the
    shared expert holds the dense FFN's own tensors instead of copies — for a streamed pass, which frees the
    dense layer once the MoE layer is written (at 7.45B a copy is 0.3 GB); never for a model kept."""
    experts, shared = _experts(step, source.ffn_weights(i), generator)
    dtype = experts.gate.dtype
    target.set_experts(i, experts)
    del experts  # copied into the layer's fused tensors
    rows = _router_rows(step, kmeans, target.hidden_size, generator)
    target.set_router(i, rows.to(dtype))
    live = target.shared_expert(i)
    if live is not None:
        with torch.no_grad():
            for param, value in zip((live.gate, live.up, live.down), (shared.gate, shared.up, shared.down)):
                if share and (param.shape, param.dtype, param.device) == (value.shape, value.dtype, value.device):
                    param.data = value  # its empty storage was never written: nothing is copied or kept
                else:
                    param.copy_(value)
            target.shared_expert_gate(i).weight.zero_()  # sigmoid(0) = 1/2: see shared mode's ×2


def _widths(step: GrowStep, width: int) -> tuple[int, int]:
    """(routed expert width, shared expert width) of the grown layers."""
    if step.mode in ("copy", "drop"):
        return width, width
    if step.mode == "granular":
        return width // step.granularity, width // step.granularity
    if step.mode == "partition":
        return width // step.experts, width // step.experts
    expert_width = step.expert_width or max(1, width // step.experts)  # shared
    if step.routed == "copy" and expert_width != width:
        raise ConfigError(f"routed copy needs expert_width = the FFN width ({width}), got {expert_width}")
    return expert_width, width


def _experts(step: GrowStep, ffn: SwiGLUWeights, generator) -> tuple[SwiGLUWeights, SwiGLUWeights]:
    """The stacked routed experts and the shared expert's weights (used where the family has one)."""
    E, F = step.experts, ffn.width
    if step.mode in ("copy", "drop"):
        experts = stack([ffn] * E)
        if step.mode == "drop":
            for e in range(E):
                n = round(step.drop_ratio * F)
                redraw(_expert(experts, e), torch.randperm(F, generator=generator)[:n], ffn, generator)
    elif step.mode == "granular":
        shards = [
            neurons(ffn, torch.arange(g * F // step.granularity, (g + 1) * F // step.granularity))
            for g in range(step.granularity)
        ]
        experts = stack([shards[g] for _ in range(E // step.granularity) for g in range(step.granularity)])
        experts.down.mul_(step.granularity)
    elif step.mode == "partition":
        order = torch.randperm(F, generator=generator)
        experts = stack([neurons(ffn, order[e * (F // E) : (e + 1) * (F // E)]) for e in range(E)])
        experts.down.mul_(E)  # unbiased for uniform routing; exact when every expert is chosen at weight 1/E
    else:  # shared: routed experts enter with zero output
        width = _widths(step, F)[0]
        if step.routed == "copy":
            experts = stack([ffn] * E)
        elif step.routed == "partition":
            order = torch.randperm(F, generator=generator)
            order = order.repeat(math.ceil(E * width / F))  # more neurons asked than the FFN has: sets reuse them
            experts = stack([neurons(ffn, order[e * width : (e + 1) * width]) for e in range(E)])
        else:
            experts = stack([neurons(ffn, torch.zeros(width, dtype=torch.long))] * E)
            for e in range(E):
                redraw(_expert(experts, e), torch.arange(width), ffn, generator)
        if not step.active:
            experts.down.zero_()
    if step.mode == "shared":  # read, not kept: only the scaled down projection is a new tensor
        shared = SwiGLUWeights(ffn.gate.detach(), ffn.up.detach(), ffn.down.detach() * 2.0)
        return experts, shared  # sigmoid(0) = 1/2 exactly, and ×2 is exact in floating point
    # a family with a shared expert (Qwen2-MoE) always has one: here it enters with zero output
    zero = ffn.clone() if step.mode in ("copy", "drop") else neurons(ffn, torch.arange(experts.gate.shape[1]))
    zero.down.zero_()
    return experts, zero


def _expert(experts: SwiGLUWeights, e: int) -> SwiGLUWeights:
    return SwiGLUWeights(experts.gate[e], experts.up[e], experts.down[e])


def distinct_routes(step: GrowStep) -> int:
    """How many different router rows a layer has: the granular shards of one copy share a row."""
    return step.experts // step.granularity if step.mode == "granular" else step.experts


def _router_rows(step: GrowStep, kmeans: torch.Tensor | None, hidden: int, generator) -> torch.Tensor:
    """(experts, hidden) router weights (see module doc for the granular rows)."""
    distinct = distinct_routes(step)
    if step.router == "zero":
        rows = torch.zeros(distinct, hidden)
    elif step.router == "random":
        rows = torch.randn(distinct, hidden, generator=generator) * step.router_std
    else:
        rows = kmeans
    return rows.repeat_interleave(step.granularity, dim=0) if step.mode == "granular" else rows


def kmeans_rows(x: torch.Tensor, k: int, generator, iterations: int = 25) -> torch.Tensor:
    """Spherical k-means of the rows of x (tokens, hidden): k unit centroids, scaled so a token at
    the mean norm gets logit KMEANS_LOGIT · cos. Seeded: the same rows and seed give the same router."""
    unit = torch.nn.functional.normalize(x, dim=1)
    if len(unit) < k:
        raise ConfigError(f"router kmeans needs at least {k} calibration tokens, got {len(unit)}")
    centroids = unit[torch.randperm(len(unit), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = (unit @ centroids.T).argmax(1)
        for c in range(k):
            members = unit[assign == c]
            # an empty cluster takes the token its centroid explains worst, so every expert gets a region
            centroids[c] = members.mean(0) if len(members) else unit[(unit @ centroids.T).max(1).values.argmin()]
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids * (KMEANS_LOGIT / x.norm(dim=1).mean())


def moe_kind(step: GrowStep, family: str) -> tuple[str, str]:
    if step.mode == "shared" and step.active:
        return "changed", "routed experts enter with their neurons' own output beside the shared expert (= the FFN)"
    if step.mode in ("copy", "shared"):
        if step.mode == "copy" and not step.normalize:
            return "changed", "copies with top-k weights that are not renormalised scale the FFN by their sum"
        return "exact", {
            "copy": "every expert is the FFN and the top-k weights sum to one",
            "shared": "shared expert = the FFN (gate ½, down ×2); routed experts output zero",
        }[step.mode]
    if step.mode == "granular":
        if step.normalize and step.top_k % step.granularity == 0:
            return (
                "exact",
                "whole copies are chosen (shared router rows) and shard outputs × granularity sum to the FFN",
            )
        return "changed", "granular is exact only with renormalised weights and top-k a multiple of the granularity"
    if step.mode == "partition":
        if step.top_k == step.experts and step.router == "zero" and step.normalize:
            return "exact", "every expert is chosen at weight 1/E and the partitions × E sum to the FFN"
        return "changed", "partition is exact only when every expert is chosen with a uniform router"
    return "diversity", f"{step.drop_ratio:g} of each expert's neurons re-drawn"
