"""Exact re-expressions of one family as another (same function, another stock class)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.initialization import no_init_weights

from upcycle.arch.families import FAMILIES
from upcycle.errors import UnsupportedArchitecture

# config fields that mean the same thing in every dense and MoE family here
_COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# ... and in Llama and Qwen2 also the FFN width
_SHARED_FIELDS = _COMMON_FIELDS + ("intermediate_size",)


def llama_as_qwen2(model) -> Qwen2ForCausalLM:
    """A Llama model as Qwen2ForCausalLM: identical layer layout and parameter names; Qwen2 adds
    q/k/v biases, which are set to zero so the function is unchanged."""
    config = model.config
    if config.model_type != "llama":
        raise UnsupportedArchitecture(f"llama_as_qwen2 needs a Llama model, got model_type {config.model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UnsupportedArchitecture("llama_as_qwen2: a Llama with attention or MLP biases has no Qwen2 form")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise UnsupportedArchitecture("llama_as_qwen2: Qwen2 requires head_dim * heads == hidden_size")
    qwen_config = Qwen2Config(
        **{f: getattr(config, f) for f in _SHARED_FIELDS}, use_sliding_window=False, sliding_window=None
    )
    qwen_config.architectures = ["Qwen2ForCausalLM"]
    dtype = next(model.parameters()).dtype
    qwen = Qwen2ForCausalLM(qwen_config).to(dtype)
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    biases = {n for n in missing if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    if unexpected or set(missing) - biases - {"lm_head.weight"}:
        raise UnsupportedArchitecture(
            f"llama_as_qwen2: parameters do not map (missing {sorted(set(missing) - biases)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, param in qwen.named_parameters():
            if name in biases:
                param.zero_()
    qwen.tie_weights()
    return qwen.eval()


# ---- a dense model as a stock mixture of experts -----------------------------------------------------


def moe_shell(
    model,
    family: str,
    *,
    experts: int,
    top_k: int,
    expert_width: int,
    shared_width: int | None = None,
    normalize: bool = True,
):
    """A stock `family` MoE model with `model`'s embeddings, attention, norms and LM head, and every
    layer's FFN an MoE block of `experts` routed experts of `expert_width` (plus a shared expert of
    `shared_width` where the family has a shared expert) whose weights are left for the caller to write (uninitialised).
    `normalize`: the top-k router weights renormalised to sum to one (Mixtral always does)."""
    config = moe_config(model, family, experts=experts, top_k=top_k, expert_width=expert_width,
                        shared_width=shared_width, normalize=normalize)  # fmt: skip
    dtype = next(model.parameters()).dtype
    with no_init_weights():  # the caller writes every FFN weight; the rest is copied below
        target = AutoModelForCausalLM.from_config(config).to(dtype)
    own = dict(target.named_parameters())
    copy_into_moe(dict(model.named_parameters()), own)
    leftover = [n for n in own if ".mlp." not in n and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if leftover:
        raise UnsupportedArchitecture(f"{family}: {leftover[0]} has no source in the dense model")
    target.tie_weights()
    return target.eval()


def moe_config(
    model, family: str, *, experts: int, top_k: int, expert_width: int, shared_width: int | None, normalize: bool
):
    """The config of moe_shell's model (shapes only: `model` may be on the meta device)."""
    source = model.config
    allowed = FAMILIES[source.model_type].moe_targets if source.model_type in FAMILIES else ()
    if family not in allowed:
        raise UnsupportedArchitecture(
            f"a {source.model_type} model cannot become {family}: its attention has no exact form there"
            + (f"; choose from {', '.join(allowed)}" if allowed else " (dense → MoE needs a dense source)")
        )
    if getattr(source, "mlp_bias", False):
        raise UnsupportedArchitecture("an FFN with biases has no MoE form in the stock families")
    head_dim = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    attention_bias = _attention_bias(model)
    fields = {f: getattr(source, f) for f in _COMMON_FIELDS if hasattr(source, f)}
    fields.update(head_dim=head_dim, num_experts_per_tok=top_k)
    if _uses_sliding_window(source):
        raise UnsupportedArchitecture(
            "dense → MoE of a sliding-window model is not supported (its window would be lost)"
        )
    fields.update(
        FAMILIES[family].moe_fields(
            experts=experts,
            expert_width=expert_width,
            shared_width=shared_width,
            normalize=normalize,
            attention_bias=attention_bias,
        )
    )
    config = AutoConfig.for_model(family, **fields)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return config


def copy_into_moe(source: dict, target: dict) -> None:
    """A dense layer's (or model's) non-FFN parameters copied into the MoE one's of the same names; the q/k/v
    biases a Llama lacks and Qwen2-MoE has set to zero. `target` is consumed: what is left is the FFN."""
    with torch.no_grad():
        for name, param in source.items():
            if ".mlp." in name or name.startswith("mlp."):
                continue
            if name not in target or target[name].shape != param.shape:
                raise UnsupportedArchitecture(f"the source parameter {name} has no place in the MoE model")
            target.pop(name).copy_(param)
        for name in list(target):
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):  # Qwen2-MoE's biases a Llama lacks
                target.pop(name).zero_()


def _attention_bias(model) -> str | None:
    """None (no attention biases), 'qkv' (q/k/v only) or 'output' (the output projection too)."""
    names = [n for n, _ in model.named_parameters() if ".self_attn." in n and n.endswith(".bias")]
    if any(".o_proj." in n for n in names):
        return "output"
    return "qkv" if names else None


def _uses_sliding_window(config) -> bool:
    window = getattr(config, "sliding_window", None)
    if window is None or window >= config.max_position_embeddings:
        return False
    if config.model_type in ("qwen2", "qwen3"):
        return bool(getattr(config, "use_sliding_window", False))
    return True
