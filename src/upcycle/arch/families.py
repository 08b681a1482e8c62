"""The supported model families: each states only how it differs from the base adapter."""

from __future__ import annotations

from upcycle.arch.base import Adapter

_DENSE_KEYS = dict(Adapter.config_keys)


class DenseSwiGLU(Adapter):
    """Llama, Mistral, Qwen2, Qwen3: pre-norm decoder layers with a dense SwiGLU FFN."""

    family = "dense"


class Llama(DenseSwiGLU):
    family, model_types = "llama", ("llama",)


class Mistral(DenseSwiGLU):
    family, model_types = "mistral", ("mistral",)


class Qwen2(DenseSwiGLU):
    family, model_types = "qwen2", ("qwen2",)


class Qwen3(DenseSwiGLU):
    family, model_types = "qwen3", ("qwen3",)


class Qwen2Moe(Adapter):
    """Routed experts plus a sigmoid-gated shared expert; some layers may stay dense (mlp_only_layers)."""

    family, model_types = "qwen2_moe", ("qwen2_moe",)
    config_keys = {**_DENSE_KEYS, "num_experts": "num_experts", "top_k": "num_experts_per_tok",
                   "expert_ffn_size": "moe_intermediate_size",
                   "shared_expert_ffn_size": "shared_expert_intermediate_size"}


class Qwen3Moe(Adapter):
    family, model_types = "qwen3_moe", ("qwen3_moe",)
    config_keys = {**_DENSE_KEYS, "num_experts": "num_experts", "top_k": "num_experts_per_tok",
                   "expert_ffn_size": "moe_intermediate_size"}


class Mixtral(Adapter):
    """Every layer is MoE; `intermediate_size` is each expert's width."""

    family, model_types = "mixtral", ("mixtral",)
    config_keys = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "vocab_size": "vocab_size",
                   "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "num_experts": "num_local_experts", "top_k": "num_experts_per_tok",
                   "expert_ffn_size": "intermediate_size"}


FAMILIES: dict[str, type[Adapter]] = {
    cls.model_types[0]: cls for cls in (Llama, Mistral, Qwen2, Qwen3, Qwen2Moe, Qwen3Moe, Mixtral)
}
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")
