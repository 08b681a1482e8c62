"""The supported model families: one class each, registered with one line (`@register`). A class states
how its family differs from the base adapter: its config keys, the MoE families its dense layers can
be written into, the config fields of an MoE model of its own, and those of a tiny test model.

    @register
    class MyFamily(DenseSwiGLU):
        family, model_types = "my_family", ("my_family",)
        moe_targets = ("mixtral",)
"""

from __future__ import annotations

from upcycle.arch.base import Adapter
from upcycle.errors import UnsupportedArchitecture

FAMILIES: dict[str, type[Adapter]] = {}  # model_type -> adapter class


def register(cls: type[Adapter]) -> type[Adapter]:
    """Make a family known to every verb (its adapter is found by the model's config.model_type)."""
    for model_type in cls.model_types:
        FAMILIES[model_type] = cls
    return cls


def dense_families() -> tuple[str, ...]:
    return tuple(f for f, cls in FAMILIES.items() if not cls.is_moe)


def moe_families() -> tuple[str, ...]:
    return tuple(f for f, cls in FAMILIES.items() if cls.is_moe)


_DENSE_KEYS = dict(Adapter.config_keys)


class DenseSwiGLU(Adapter):
    """Llama, Mistral, Qwen2, Qwen3: pre-norm decoder layers with a dense SwiGLU FFN."""

    family = "dense"
    llama_shaped = True


# the MoE families a dense family's layers can be written into with the same attention (the first is
# the default): Qwen2-MoE has q/k/v biases (zero when the source has none) and no output bias; Mixtral
# has no attention biases; Qwen3's q/k norms exist only in Qwen3-MoE


@register
class Llama(DenseSwiGLU):
    family, model_types, moe_targets = "llama", ("llama",), ("qwen2_moe", "mixtral")


@register
class Mistral(DenseSwiGLU):
    family, model_types, moe_targets = "mistral", ("mistral",), ("qwen2_moe", "mixtral")


@register
class Qwen2(DenseSwiGLU):
    family, model_types, moe_targets = "qwen2", ("qwen2",), ("qwen2_moe",)


@register
class Qwen3(DenseSwiGLU):
    family, model_types, moe_targets = "qwen3", ("qwen3",), ("qwen3_moe",)

    def head_norms(self, i: int):
        attention = self.layer(i).self_attn
        return attention.q_norm, attention.k_norm


@register
class Qwen2Moe(Adapter):
    """Routed experts plus a sigmoid-gated shared expert; some layers may stay dense (mlp_only_layers)."""

    family, model_types, is_moe, has_shared_expert = "qwen2_moe", ("qwen2_moe",), True, True
    config_keys = {
        **_DENSE_KEYS,
        "num_experts": "num_experts",
        "top_k": "num_experts_per_tok",
        "expert_ffn_size": "moe_intermediate_size",
        "shared_expert_ffn_size": "shared_expert_intermediate_size",
    }

    @classmethod
    def moe_fields(cls, *, experts, expert_width, shared_width, normalize, attention_bias):
        if attention_bias == "output":
            raise UnsupportedArchitecture("Qwen2-MoE has no attention output bias: this model's would be lost")
        return dict(
            num_experts=experts,
            moe_intermediate_size=expert_width,
            intermediate_size=expert_width,
            shared_expert_intermediate_size=shared_width or expert_width,
            norm_topk_prob=normalize,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=attention_bias is not None,
            use_sliding_window=False,
        )

    @classmethod
    def tiny_fields(cls, *, experts, top_k, ffn):
        return dict(
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=ffn // 2,
            shared_expert_intermediate_size=ffn,
            norm_topk_prob=False,
        )


@register
class Qwen3Moe(Adapter):
    family, model_types, is_moe = "qwen3_moe", ("qwen3_moe",), True
    config_keys = {
        **_DENSE_KEYS,
        "num_experts": "num_experts",
        "top_k": "num_experts_per_tok",
        "expert_ffn_size": "moe_intermediate_size",
    }

    @classmethod
    def moe_fields(cls, *, experts, expert_width, shared_width, normalize, attention_bias):
        return dict(
            num_experts=experts,
            moe_intermediate_size=expert_width,
            intermediate_size=expert_width,
            norm_topk_prob=normalize,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=attention_bias is not None,
            use_sliding_window=False,
        )

    @classmethod
    def tiny_fields(cls, *, experts, top_k, ffn):
        return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn // 2, norm_topk_prob=True)


@register
class Mixtral(Adapter):
    """Every layer is MoE; `intermediate_size` is each expert's width."""

    family, model_types, is_moe = "mixtral", ("mixtral",), True
    checkpoint_ffn, checkpoint_experts = "block_sparse_moe", ("w1", "w3", "w2")  # the original Mixtral names
    config_keys = {
        "hidden_size": "hidden_size",
        "num_layers": "num_hidden_layers",
        "vocab_size": "vocab_size",
        "head_dim": "head_dim",
        "norm_eps": "rms_norm_eps",
        "num_experts": "num_local_experts",
        "top_k": "num_experts_per_tok",
        "expert_ffn_size": "intermediate_size",
    }

    @classmethod
    def moe_fields(cls, *, experts, expert_width, shared_width, normalize, attention_bias):
        if attention_bias is not None:
            raise UnsupportedArchitecture("Mixtral has no attention biases: this model's would be lost")
        if not normalize:
            raise UnsupportedArchitecture("Mixtral always renormalises its top-k router weights")
        return dict(num_local_experts=experts, intermediate_size=expert_width, sliding_window=None)

    @classmethod
    def tiny_fields(cls, *, experts, top_k, ffn):
        return dict(num_local_experts=experts, num_experts_per_tok=top_k)


# the families upcycle ships (tests run over these; a family registered later joins FAMILIES)
DENSE_FAMILIES = dense_families()
MOE_FAMILIES = moe_families()
