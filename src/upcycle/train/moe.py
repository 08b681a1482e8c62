"""Training a grown mixture of experts: the auxiliary router losses and a top-k warm start, as
registered terms and stage transforms of the one trainer.

    losses: [{name: lm}, {name: balance, weight: 0.01}, {name: router_z, weight: 0.001}]
    stages: [{name: k2, ..., transform: top_k, transform_options: {k: 2}}, {name: k4, ..., transform: top_k, ...}]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upcycle.arch import adapter_for
from upcycle.errors import ConfigError
from upcycle.train.losses import LossInputs, register_loss
from upcycle.train.registry import register_transform


def _router_logits(inputs: LossInputs, name: str) -> tuple[torch.Tensor, ...]:
    if not inputs.router_logits:
        raise ConfigError(f"the {name} loss needs a mixture-of-experts model (its routers' logits)")
    return inputs.router_logits


def _top_k(model) -> int:
    adapter = adapter_for(model)
    return next(adapter.top_k(i) for i in range(adapter.num_layers) if adapter.ffn_kind(i) == "moe")


@register_loss("balance")
def balance_loss(inputs: LossInputs) -> torch.Tensor:
    """Switch-Transformer load balancing, mean over MoE layers: E · Σ_e f_e · P_e, with f_e the share of
    top-k assignments that go to expert e and P_e its mean router probability. 1.0 when balanced."""
    k = _top_k(inputs.model)
    values = []
    for logits in _router_logits(inputs, "balance"):
        probs = F.softmax(logits.float(), dim=-1)
        experts = probs.shape[-1]
        chosen = F.one_hot(probs.topk(k, dim=-1).indices, experts).sum(1).float()  # (tokens, E)
        share = chosen.mean(0) / k
        values.append(experts * (share * probs.mean(0)).sum())
    return torch.stack(values).mean()


balance_loss.needs_router_logits = True


@register_loss("router_z")
def router_z_loss(inputs: LossInputs) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens and MoE layers of logsumexp(router logits)², which keeps
    the logits small (and the softmax numerically calm) without changing which experts win."""
    return torch.stack(
        [torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in _router_logits(inputs, "router_z")]
    ).mean()


router_z_loss.needs_router_logits = True


@register_transform("top_k")
def set_top_k(model, k: int):
    """A stage that routes every token to k experts from now on (a top-k warm start: 2 → 4 → 8)."""
    adapter = adapter_for(model)
    moe = [i for i in range(adapter.num_layers) if adapter.ffn_kind(i) == "moe"]
    if not moe:
        raise ConfigError("the top_k stage transform needs a mixture-of-experts model")
    experts = adapter.num_experts(moe[0])
    if not 1 <= k <= experts:
        raise ConfigError(f"top_k k={k} is not allowed: between 1 and the {experts} experts")
    adapter.set_config(top_k=k)
    return model
