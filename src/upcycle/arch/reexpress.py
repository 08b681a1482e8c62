"""Exact re-expressions of one family as another (same function, another stock class)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from upcycle.errors import UnsupportedArchitecture

# config fields that mean the same thing in Llama and Qwen2
_SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                  "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "attention_dropout",
                  "bos_token_id", "eos_token_id", "pad_token_id")


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
    qwen_config = Qwen2Config(**{f: getattr(config, f) for f in _SHARED_FIELDS},
                              use_sliding_window=False, sliding_window=None)
    qwen_config.architectures = ["Qwen2ForCausalLM"]
    dtype = next(model.parameters()).dtype
    qwen = Qwen2ForCausalLM(qwen_config).to(dtype)
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    biases = {n for n in missing if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    if unexpected or set(missing) - biases - {"lm_head.weight"}:
        raise UnsupportedArchitecture(f"llama_as_qwen2: parameters do not map (missing {sorted(set(missing) - biases)[:3]}, "
                                      f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, param in qwen.named_parameters():
            if name in biases:
                param.zero_()
    qwen.tie_weights()
    return qwen.eval()
