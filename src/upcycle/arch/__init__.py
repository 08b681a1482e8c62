"""Architecture adapters: the only code in upcycle that knows Hugging Face module paths.

    adapter = upcycle.arch.adapter_for(model)
    w = adapter.ffn_weights(3)          # SwiGLUWeights(gate, up, down)
    adapter.set_ffn(3, MyFFN(...))      # replace a layer's FFN

A new family is one adapter class and one registry line (`@register`; see families.py).
"""

from __future__ import annotations

from upcycle.arch import reexpress
from upcycle.arch.base import PARAMETER_GROUPS, Adapter, LayerShape, SwiGLUWeights
from upcycle.arch.families import DENSE_FAMILIES, FAMILIES, MOE_FAMILIES, dense_families, moe_families, register
from upcycle.errors import UnsupportedArchitecture

__all__ = [
    "PARAMETER_GROUPS",
    "Adapter",
    "LayerShape",
    "SwiGLUWeights",
    "FAMILIES",
    "DENSE_FAMILIES",
    "MOE_FAMILIES",
    "adapter_for",
    "family_of",
    "register",
    "dense_families",
    "moe_families",
    "reexpress",
]


def family_of(config) -> str:
    """The supported family of a transformers config, or UnsupportedArchitecture."""
    # upcycle's registered sparse type keeps its base family's modules and config fields
    model_type = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        raise UnsupportedArchitecture(
            f"{arch} (model_type {model_type!r}) is not supported; supported families: {', '.join(FAMILIES)}"
        )
    return model_type


def adapter_for(model) -> Adapter:
    """The adapter for a loaded model; UnsupportedArchitecture names the class and the supported families."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(getattr(model, "model", None), "layers"):
        raise UnsupportedArchitecture(
            f"{type(model).__name__} is not supported; supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[family_of(config)](model)
