"""Wider: FFN neurons duplicated (Net2Net) and the hidden vector repeated (HyperCloning), both exact.

FFN width: a duplicated neuron computes the same activation as its original, so splitting the
original's down-projection column between the copies (d/2 + ε, d/2 − ε) keeps the sum; ε ≠ 0 breaks
the copies' symmetry (they receive different gradients) without changing the function.

Hidden size ×m: the model runs on [h, h, …] (m copies) instead of h. RMSNorm of a repeated vector is
the repeated RMSNorm (its mean square is unchanged), so norms tile their weights; a matrix reading a
normed vector tiles its columns divided by m (the m copies sum back to W·x); a matrix writing to the
residual stream tiles its rows. Tied embeddings also serve as the LM head, which reads: then the whole
stream is carried at 1/m ([h, h]/m, embeddings and writers × 1/m) and the norms' ε divided by m², so
every norm still sees the same ratio; Qwen3's q/k norms share that ε (they see unscaled vectors), a
relative change of ε that is measured. Noise (ε summing to zero over the copies of a reading matrix)
breaks the symmetry exactly as above.
"""

from __future__ import annotations

import copy

import torch

from upcycle.arch import SwiGLUWeights, adapter_for
from upcycle.errors import ConfigError
from upcycle.ops.grow.copying import copy_except
from upcycle.ops.grow.step import GrowStep


def widen_ffn(model, step: GrowStep):
    source = adapter_for(model)
    groups, params = source.parameter_groups(), dict(model.named_parameters())
    kinds = {source.ffn_kind(i) for i in range(source.num_layers)}
    if not kinds <= {"dense", "moe"}:
        raise ConfigError(f"ffn_width needs dense or MoE FFNs, found {', '.join(sorted(kinds))}")
    heavy = groups["experts"] if "moe" in kinds else groups["ffn"]
    grown = copy_except(model, [params[n] for n in heavy])
    target = adapter_for(grown)
    generator = torch.Generator().manual_seed(step.seed)
    for i in range(source.num_layers):
        widen_ffn_layer(source, target, i, step, generator)
    target.set_config(**({"expert_ffn_size": step.width} if "moe" in kinds else {"ffn_size": step.width}))
    return grown, {"kind": "exact", "why": "duplicated neurons split their down-projection columns"}


def widen_ffn_layer(source, target, i: int, step: GrowStep, generator) -> None:
    """Layer i's FFN (or each routed expert) of `source` widened into layer i of `target` (the same adapter
    for a change in place, as a streamed grow makes it). The config is the caller's."""
    if source.ffn_kind(i) == "dense":
        target.set_ffn_weights(i, _duplicate(source.ffn_weights(i), step, generator))
        return
    old = source.experts(i)
    wider = [
        _duplicate(SwiGLUWeights(old.gate[e], old.up[e], old.down[e]), step, generator)
        for e in range(old.gate.shape[0])
    ]
    target.set_experts(i, SwiGLUWeights(*(torch.stack([getattr(w, n) for w in wider]) for n in ("gate", "up", "down"))))


def _duplicate(ffn: SwiGLUWeights, step: GrowStep, generator) -> SwiGLUWeights:
    width = ffn.width
    if step.width < width:
        raise ConfigError(f"width={step.width} is narrower than the FFN's {width}: use slim to cut neurons")
    source = torch.arange(step.width) % width  # new neuron j copies neuron j mod F
    copies = torch.bincount(source, minlength=width).to(ffn.down.dtype)
    down = ffn.down.detach()[:, source] / copies[source]
    if step.noise:
        down = down + _zero_sum_noise(down, source, step.noise, generator)
    return SwiGLUWeights(ffn.gate.detach()[source].clone(), ffn.up.detach()[source].clone(), down)


def _zero_sum_noise(down: torch.Tensor, source: torch.Tensor, scale: float, generator) -> torch.Tensor:
    """Noise on the columns of `down` that sums to zero over the copies of each neuron."""
    noise = torch.randn(down.shape, generator=generator) * scale * down.std()
    mean = torch.zeros(down.shape[0], int(source.max()) + 1).index_add_(1, source, noise)
    mean /= torch.bincount(source).to(noise.dtype)
    return (noise - mean[:, source]).to(down.dtype)


def widen_hidden(model, step: GrowStep):
    source = adapter_for(model)
    m = step.factor
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    scale = hidden_scale(model.config, m)
    generator = torch.Generator().manual_seed(step.seed)
    roles = source.hidden_parameters()
    params = dict(model.named_parameters())
    new: dict[int, torch.Tensor] = {}
    for name, (axis, role) in roles.items():
        new[id(params[name])] = tile(params[name].detach(), axis, role, step, scale, generator)
    state = {n: new.get(id(t), t) for n, t in model.state_dict(keep_vars=True).items()}
    config = copy.deepcopy(model.config)
    grown = source.rebuilt(config, hidden_config_changes(source, m), state)
    q_k_norms = any(n.endswith(("q_norm.weight", "k_norm.weight")) for n in params)
    why = "the hidden vector repeated; norms see the same ratio"
    if tied and q_k_norms:
        why += " (q/k norms share the scaled ε: measured, not exact by construction)"
    return grown, {"kind": "exact", "why": why}


def hidden_scale(config, m: int) -> float:
    """The residual stream's scale after hidden growth ×m: 1/m with tied embeddings (see the module doc)."""
    return 1.0 / m if getattr(config, "tie_word_embeddings", False) else 1.0


def hidden_config_changes(adapter, m: int) -> dict:
    """The config after hidden growth ×m (canonical names): the hidden size, the head size kept, and with
    tied embeddings the norms' ε scaled with the stream."""
    config = adapter.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    changes = {"hidden_size": config.hidden_size * m, "head_dim": head_dim}
    if getattr(config, "tie_word_embeddings", False):
        changes["norm_eps"] = adapter.get_config("norm_eps") * hidden_scale(config, m) ** 2
    return changes


def tile(p: torch.Tensor, axis: int, role: str, step: GrowStep, scale: float, generator) -> torch.Tensor:
    """One parameter of hidden growth ×step.factor: repeated along its hidden axis, then scaled by its role
    (an embedding or a writer with the stream's scale, a reader divided by the copies, plus zero-sum noise)."""
    m = step.factor
    tiled = torch.cat([p] * m, dim=axis)  # in-place from here: no second temporary of the big ones
    if role in ("embedding", "writes") and scale != 1.0:
        tiled.mul_(scale)
    elif role == "reads":
        tiled.div_(m)
        if step.noise:
            tiled.add_(_copies_noise(p, axis, m, step.noise, generator))
    return tiled


def _copies_noise(p: torch.Tensor, axis: int, m: int, scale: float, generator) -> torch.Tensor:
    """Noise for the m tiled copies of p along `axis` that sums to zero over the copies, so the
    repeated input still gives p's output exactly."""
    noise = [torch.randn(p.shape, generator=generator) * scale * p.float().std() / m for _ in range(m)]
    mean = sum(noise) / m
    return torch.cat([n - mean for n in noise], dim=axis).to(p.dtype)
