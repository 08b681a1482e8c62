"""Hugging Face → GGUF: the names, layouts and metadata llama.cpp reads, per family.

    arch = gguf_arch(config)                        # "llama", "qwen2", "qwen2moe", ...
    for name, tensor in outer_tensors(state, config) + layer_tensors(3, layer_state, config): ...
    write_metadata(writer, config); write_tokenizer(writer, tokenizer, config)

The mappings work on meta tensors too (shapes only), so a writer can lay out every tensor's header
before it reads any weight. What llama.cpp computes differently from transformers is refused here in one
line (rope scaling, sliding windows, MoE layers mixed with dense ones, top-k weights llama.cpp does not
renormalise the way the checkpoint does), never written as a file that loads and answers otherwise.
"""

from __future__ import annotations

import json

import torch

from upcycle.arch import family_of
from upcycle.errors import ConfigError

# family -> llama.cpp's architecture name (a Mixtral is llama.cpp's llama with experts)
GGUF_ARCH = {
    "llama": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}
# llama.cpp's llama rotates adjacent pairs (rope "norm"); transformers rotates halves: the query and key
# rows of those families are permuted so that both compute the same attention. Qwen's rope is llama.cpp's
# "neox", the halves transformers uses.
INTERLEAVED_ROPE = ("llama",)
# whether llama.cpp renormalises the top-k routing weights, per architecture (its graph's `norm_w`)
RENORMALISES_TOP_K = {"llama": True, "qwen2moe": False, "qwen3moe": True}

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # the router
    "mlp.experts.down_proj": "ffn_down_exps.weight",  # (experts, hidden, ffn): llama.cpp's layout already
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
OUTER_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}  # fmt: skip
# tensors kept in f32 whatever the file's type: norms, and routers (llama.cpp reads them as f32)
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def gguf_arch(config) -> str:
    family = family_of(config)
    if family not in GGUF_ARCH:
        raise ConfigError(f"GGUF export does not cover {family}; it covers {', '.join(GGUF_ARCH)}")
    return GGUF_ARCH[family]


def check_exportable(config) -> None:
    """Refuse, in one line, what llama.cpp would compute differently from transformers."""
    arch, family = gguf_arch(config), family_of(config)
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not carried over yet")
    if getattr(config, "use_sliding_window", False) or (
        family == "mixtral" and getattr(config, "sliding_window", None)
    ):
        raise ConfigError("GGUF export: a sliding attention window is not carried over yet")
    if family in ("qwen2_moe", "qwen3_moe"):
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise ConfigError("GGUF export: MoE layers mixed with dense ones (mlp_only_layers, decoder_sparse_step)")
        renormalised = bool(getattr(config, "norm_topk_prob", False))
        if renormalised != RENORMALISES_TOP_K[arch]:
            raise ConfigError(
                f"GGUF export: this {family} model {'renormalises' if renormalised else 'does not renormalise'} "
                f"its top-k routing weights (norm_topk_prob={renormalised}) and llama.cpp's {arch} "
                f"{'does' if RENORMALISES_TOP_K[arch] else 'does not'}: its logits would differ"
                + (" (grow a Qwen2-MoE with --no-normalize, or into qwen3_moe or mixtral, for llama.cpp)"
                   if arch == "qwen2moe" else "")
            )  # fmt: skip


def rope_dims(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from halves (x0..x_{d/2-1}, x_{d/2}..) to adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def layer_tensors(index: int, state: dict[str, torch.Tensor], config) -> list[tuple[str, torch.Tensor]]:
    """Layer `index`'s tensors (its module's state_dict) under llama.cpp's names and in its layouts."""
    arch = gguf_arch(config)
    out = []
    for name, tensor in state.items():
        if name == "mlp.experts.gate_up_proj":  # fused (experts, 2 ffn, hidden): gate rows first, then up
            half = tensor.shape[1] // 2
            out += [("ffn_gate_exps.weight", tensor[:, :half]), ("ffn_up_exps.weight", tensor[:, half:])]
            continue
        if name not in LAYER_NAMES:
            raise ConfigError(f"GGUF export: layer tensor {name!r} of {family_of(config)} has no llama.cpp name")
        if arch in INTERLEAVED_ROPE and name.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            tensor = _interleave(tensor, heads)
        if name == "mlp.shared_expert_gate.weight":
            tensor = tensor.reshape(-1)  # llama.cpp's shared-expert gate is a vector
        out.append((LAYER_NAMES[name], tensor))
    return [(f"blk.{index}.{name}", tensor) for name, tensor in out]


def outer_tensors(state: dict[str, torch.Tensor], config) -> list[tuple[str, torch.Tensor]]:
    """The embeddings, final norm and (untied) head under llama.cpp's names; a tied head is not written
    (llama.cpp reads the embeddings in its place)."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for name, tensor in state.items():
        if name == "lm_head.weight" and tied:
            continue
        if name not in OUTER_NAMES:
            raise ConfigError(f"GGUF export: tensor {name!r} has no llama.cpp name")
        out.append((OUTER_NAMES[name], tensor))
    return out


def keeps_f32(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 1 or name.endswith(KEEP_F32)


def write_metadata(writer, config, *, name: str) -> None:
    """The hyperparameters llama.cpp reads for the architecture."""
    family = family_of(config)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    head_dim = rope_dims(config)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if family in ("qwen2_moe", "qwen3_moe"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if family == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def write_tokenizer(writer, tokenizer, config) -> None:
    """A byte-level BPE tokenizer (llama.cpp's "gpt2" model): every token by id (ids the tokenizer lacks
    padded as unused), their types, the merges, the special ids and the chat template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ConfigError(f"GGUF export covers byte-level BPE tokenizers; this one is {spec['model']['type']}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            special = added.get(i, {}).get("special")
            types.append(
                gguf.TokenType.NORMAL
                if i not in added
                else gguf.TokenType.CONTROL
                if special
                else gguf.TokenType.USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(config, tokens))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # llama.cpp's gpt2 vocabulary needs the key; a byte vocabulary merges nothing
        writer.add_array(gguf.Keys.Tokenizer.MERGES, [""])
    for key, token_id in (
        ("bos", tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id),
        ("eos", tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id),
        ("pad", tokenizer.pad_token_id),
        ("unk", tokenizer.unk_token_id),
    ):
        if isinstance(token_id, int):
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(config, tokens: list[str]) -> str:
    """llama.cpp's name for how text is split before BPE: Qwen's for the Qwen families, SmolLM's for its
    vocabulary, the default otherwise (token ids, logits and generation do not depend on it; only how
    llama.cpp itself turns text into ids does)."""
    if family_of(config).startswith("qwen"):
        return "qwen2"
    if tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and config.vocab_size == 49152:
        return "smollm"
    return "default"
