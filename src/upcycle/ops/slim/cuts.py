"""The cuts: each takes a model, a SlimStep and calibration blocks, and returns a smaller copy (the
input is left alone) and what it removed. Stock shapes only: the result is the same family with a
smaller config.

Hidden width: the kept channels of every matrix on the hidden axis, every norm and the embeddings (one
sorted index for all). RMSNorm divides by the root mean square over *all* channels; over fewer
channels the same vector would be divided by a smaller number, so every norm's weight is multiplied
by sqrt(H / H') and ε by H / H': a cut of channels that are zero in the residual stream is then exact,
and otherwise each kept channel keeps its scale (missing only the removed channels' energy).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from upcycle.arch import SwiGLUWeights, adapter_for
from upcycle.errors import ConfigError
from upcycle.ops.calibrate import LayerStream, channel_importance
from upcycle.ops.grow.copying import copy_except
from upcycle.ops.slim import importance
from upcycle.ops.slim.step import SlimStep


def cut_depth(model, step: SlimStep, blocks: torch.Tensor, scores: torch.Tensor | None = None):
    adapter = adapter_for(model)
    n, drop = adapter.num_layers, step.layers
    if drop >= n:
        raise ConfigError(f"layers={drop} is not allowed: this model has {n} layers and must keep at least one")
    scores = None
    if step.rule == "last":
        removed = list(range(n - drop, n))
    elif step.rule == "block_influence":
        scores = importance.block_influence(model, blocks) if scores is None else scores
        removed = sorted(scores.argsort()[:drop].tolist())
    else:  # angular: always measured on the model as it is (see lineage.py)
        scores = importance.angular_distance(model, blocks, drop)
        start = int(scores.argmin())
        removed = list(range(start, start + drop))
    kept = [i for i in range(n) if i not in removed]
    slim = copy.deepcopy(model)
    target = adapter_for(slim)
    target.set_layers([target.layers[i] for i in kept], kept)
    return slim, {"removed_layers": removed, "scores": scores.tolist() if scores is not None else None}


@torch.no_grad()
def cut_hidden(model, step: SlimStep, blocks: torch.Tensor, scores: torch.Tensor | None = None):
    adapter = adapter_for(model)
    H, keep = adapter.hidden_size, step.hidden
    if keep >= H:
        raise ConfigError(f"hidden={keep} is not allowed: smaller than the model's hidden size {H}")
    heads = model.config.num_attention_heads
    if keep % heads:  # transformers' configs refuse a hidden size the attention heads cannot divide
        raise ConfigError(
            f"hidden={keep} is not allowed: a multiple of the {heads} attention heads "
            f"(e.g. {keep // heads * heads} or {(keep // heads + 1) * heads})"
        )
    scores = importance.hidden_importance(model, blocks) if scores is None else scores
    index = scores.topk(keep).indices.sort().values
    params = dict(model.named_parameters())
    new = {}
    for name, (axis, role) in adapter.hidden_parameters().items():
        sliced = params[name].detach().index_select(axis, index)
        if role == "norm":
            sliced = sliced * (H / keep) ** 0.5
        new[id(params[name])] = sliced
    state = {n: new.get(id(t), t) for n, t in model.state_dict(keep_vars=True).items()}
    config = copy.deepcopy(model.config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    slim = adapter.rebuilt(
        config,
        {"hidden_size": keep, "head_dim": head_dim, "norm_eps": adapter.get_config("norm_eps") * H / keep},
        state,
    )
    kept_share = float(scores[index].sum() / scores.sum())
    return slim, {"kept_channels": index.tolist(), "kept_importance": kept_share}


@torch.no_grad()
def cut_ffn_width(model, step: SlimStep, blocks: torch.Tensor, scores: list | None = None):
    adapter = adapter_for(model)
    kinds = {adapter.ffn_kind(i) for i in range(adapter.num_layers)}
    if kinds != {"dense"}:
        raise ConfigError(
            f"op ffn_width cuts dense FFNs; this model has {', '.join(sorted(kinds))} FFNs (use op experts for an MoE)"
        )
    width = adapter.ffn_weights(0).width
    if step.width >= width:
        raise ConfigError(f"width={step.width} is not allowed: smaller than the FFN width {width}")
    groups, params = adapter.parameter_groups(), dict(model.named_parameters())
    slim = copy_except(model, [params[n] for n in groups["ffn"]])
    target = adapter_for(slim)
    stream, shares, kept = (LayerStream(model, blocks) if scores is None else None), [], []
    for i in range(adapter.num_layers):
        w = adapter.ffn_weights(i)
        if stream is not None:
            score = channel_importance(w, stream.module_inputs(adapter.ffn(i)))
            stream.advance()
        else:
            score = scores[i]
        index = score.topk(step.width).indices.sort().values
        shares.append(float(score[index].sum() / score.sum()))
        kept.append(index.tolist())
        target.set_ffn_weights(i, SwiGLUWeights(w.gate[index].clone(), w.up[index].clone(), w.down[:, index].clone()))
    target.set_config(ffn_size=step.width)
    return slim, {"kept_importance_per_layer": shares, "kept_neurons": kept}


@torch.no_grad()
def cut_heads(model, step: SlimStep, blocks: torch.Tensor, scores: torch.Tensor | None = None):
    adapter = adapter_for(model)
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if step.heads >= heads or step.heads % kv:
        raise ConfigError(
            f"heads={step.heads} is not allowed: fewer than the {heads} query heads and a multiple of "
            f"the {kv} key/value heads (each key/value head keeps the same number of queries)"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scores = importance.head_importance(model, blocks) if scores is None else scores
    per_group, group = step.heads // kv, heads // kv
    slim = copy.deepcopy(model)
    target = adapter_for(slim)
    kept_all = []
    for i in range(adapter.num_layers):
        kept = []
        for g in range(kv):  # the best queries of each key/value head, so grouped attention still lines up
            members = torch.arange(g * group, (g + 1) * group)
            kept += members[scores[i, members].topk(per_group).indices.sort().values].tolist()
        kept_all.append(kept)
        rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
        attention = target.attention(i)
        _keep_rows(attention["q"], rows)
        _keep_columns(attention["o"], rows)
    target.set_config(head_dim=head_dim)
    target.set_query_heads(step.heads)
    return slim, {"kept_heads": kept_all}


def _keep_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.detach()[rows].clone())
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.detach()[rows].clone())
    linear.out_features = len(rows)


def _keep_columns(linear: torch.nn.Linear, columns: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.detach()[:, columns].clone())
    linear.in_features = len(columns)


@torch.no_grad()
def cut_experts(model, step: SlimStep, blocks: torch.Tensor):
    adapter = adapter_for(model)
    layers = [i for i in range(adapter.num_layers) if adapter.ffn_kind(i) == "moe"]
    if not layers:
        raise ConfigError(f"op experts needs a mixture-of-experts model; this {adapter.family} model has none")
    E = adapter.num_experts(layers[0])
    if step.experts >= E:
        raise ConfigError(f"experts={step.experts} is not allowed: fewer than the {E} experts per layer")
    top_k = step.top_k or min(adapter.top_k(layers[0]), step.experts)
    if top_k > step.experts:
        raise ConfigError(f"top_k={top_k} is more than the {step.experts} experts left")
    stats = importance.expert_importance(model, blocks)
    groups, params = adapter.parameter_groups(), dict(model.named_parameters())
    slim = copy_except(model, [params[n] for n in groups["router"] + groups["experts"]])
    target = adapter_for(slim)
    removed = {}
    for i in layers:
        s = stats[i]
        score = getattr(s, step.rule)
        order = score.argsort(descending=True, stable=True)
        experts, router = adapter.experts(i), adapter.router(i).weight.detach()
        merged = _plan_merge(step, order, _similarity(step, s, experts, router), s.frequency)
        new = []
        for keeper, members in merged:
            usage = s.frequency[members].double()
            w = (usage / usage.sum()).float() if usage.sum() > 0 else torch.full((len(members),), 1 / len(members))
            new.append(
                SwiGLUWeights(
                    *(
                        sum(w[j] * getattr(experts, n)[m].float() for j, m in enumerate(members)).to(router.dtype)
                        for n in ("gate", "up", "down")
                    )
                )
            )
        kept = [keeper for keeper, _ in merged]
        target.set_experts(
            i, SwiGLUWeights(*(torch.stack([getattr(e, n) for e in new]) for n in ("gate", "up", "down")))
        )
        target.set_router(i, router[kept].clone())
        removed[i] = {"kept": kept, "groups": [members for _, members in merged], "scores": score.tolist()}
    target.set_config(num_experts=step.experts, top_k=top_k)
    return slim, {"layers": removed, "top_k": top_k}


def _similarity(step: SlimStep, stats, experts: SwiGLUWeights, router: torch.Tensor) -> torch.Tensor:
    """(E, E) cosine similarity between experts by the chosen measure."""
    if step.similarity == "router_logits":
        vectors = stats.router_logits.T
    elif step.similarity == "router_weight":
        vectors = router.float()
    else:
        vectors = torch.cat([experts.gate.flatten(1), experts.up.flatten(1), experts.down.flatten(1)], 1).float()
    unit = F.normalize(vectors.float(), dim=1)
    return unit @ unit.T


def _plan_merge(step: SlimStep, order: torch.Tensor, similarity: torch.Tensor, usage: torch.Tensor):
    """[(kept expert, [its members, itself first]), …] in the kept experts' original order."""
    target = step.experts
    ranked = order.tolist()
    if step.mode == "prune":
        return [(e, [e]) for e in sorted(ranked[:target])]
    # an expert identical to one already kept is not kept beside it: it merges into it (a clone
    # merged back into its original is the exact inverse of grow's expert cloning)
    picked = []
    for e in ranked:
        if len(picked) < target and not any(float(similarity[e, p]) > 1 - 1e-6 for p in picked):
            picked.append(e)
    ranked = picked + [e for e in ranked if e not in picked]
    if step.mode == "merge":
        kept, bases = ranked[:target], ranked[:target]
    else:  # partial: the top half kept unchanged, the next ones are merge bases for the rest
        half = (target + 1) // 2
        kept, bases = ranked[:target], ranked[half:target]
    members = {e: [e] for e in kept}
    for d in ranked[target:]:
        if not bases:
            continue
        nearest = max(bases, key=lambda b: float(similarity[d, b]))
        members[nearest].append(d)
    return [(e, members[e]) for e in sorted(kept)]
