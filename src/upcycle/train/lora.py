"""LoRA (peft) as a stage transform of the one trainer — the baseline sparse fine-tuning is measured
against. peft is an optional dependency: `pip install 'upcycle[lora]'`.

    stage transform `lora`   LoRA adapters of rank r on every linear of the decoder layers (in place: the
                             model keeps its class; only `lora_` parameters should train)
    merge_lora(model)        each adapted linear becomes the stock nn.Linear W + (α/r)·B·A — dense again
"""

from __future__ import annotations

from torch import nn

from upcycle.errors import ConfigError, check
from upcycle.ops.prune import prunable_linears
from upcycle.train.registry import register_transform


def _peft():
    try:  # an optional dependency (the `lora` extra): imported only when a LoRA run asks for it
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'upcycle[lora]' (or pip install peft)") from None
    return peft


@register_transform("lora")
def attach_lora(model, rank: int = 16, alpha: float | None = None, dropout: float = 0.0):
    check(rank >= 1, "lora rank", rank, ">= 1")
    peft = _peft()
    targets = sorted({name.split(".")[-1] for name in prunable_linears(model)})
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout, target_modules=targets
    )
    model.requires_grad_(False)
    return peft.inject_adapter_in_model(config, model)


def merge_lora(model) -> nn.Module:
    peft = _peft()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, peft.tuners.lora.LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return model


def lora_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
