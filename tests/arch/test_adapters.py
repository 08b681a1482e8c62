import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ALL_FAMILIES, logits, tokens_for
from upcycle import arch, hub
from upcycle.errors import ConfigError, UnsupportedArchitecture


def _swiglu(x, w: arch.SwiGLUWeights):
    return F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)


def _ffn_tensors(adapter):
    """Every FFN / expert / shared-expert weight the adapter exposes, as (key, SwiGLUWeights)."""
    out = []
    for i in range(adapter.num_layers):
        if adapter.ffn_kind(i) == "dense":
            out.append(((i, "dense"), adapter.ffn_weights(i)))
        else:
            out += [((i, e), adapter.expert_weights(i, e)) for e in range(adapter.num_experts(i))]
            if adapter.shared_expert(i) is not None:
                out.append(((i, "shared"), adapter.shared_expert(i)))
    return out


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_read_scramble_write_back_restores_logits(family):
    model = hub.tiny(family)
    ids = tokens_for(model)
    reference = logits(hub.tiny(family), ids)  # an independent copy with the same seed
    adapter = arch.adapter_for(model)
    saved = {k: w.clone() for k, w in _ffn_tensors(adapter)}
    with torch.no_grad():
        for _, w in _ffn_tensors(adapter):
            for t in (w.gate, w.up, w.down):
                t.copy_(torch.randn_like(t))
    assert not torch.allclose(logits(model, ids), reference)  # the scramble reached the model
    for (i, which), w in saved.items():
        if which == "dense":
            adapter.set_ffn_weights(i, w)
        elif which == "shared":
            live = adapter.shared_expert(i)
            with torch.no_grad():
                live.gate.copy_(w.gate), live.up.copy_(w.up), live.down.copy_(w.down)
        else:
            adapter.set_expert_weights(i, which, w)
    assert torch.equal(logits(model, ids), reference)


@pytest.mark.parametrize("family", arch.DENSE_FAMILIES)
def test_dense_ffn_weights_compute_the_layer_ffn(family):
    model = hub.tiny(family)
    adapter = arch.adapter_for(model)
    x = torch.randn(2, 5, adapter.hidden_size)
    with torch.no_grad():
        assert torch.allclose(adapter.ffn(1)(x), _swiglu(x, adapter.ffn_weights(1)), atol=1e-6)


@pytest.mark.parametrize("family", arch.MOE_FAMILIES)
def test_expert_weights_and_router_compute_the_moe_block(family):
    """Recompute the MoE block by hand from what the adapter returns: softmax router, top-k,
    optional renormalisation, SwiGLU experts, sigmoid-gated shared expert."""
    model = hub.tiny(family)
    adapter = arch.adapter_for(model)
    block = adapter.ffn(0)
    x = torch.randn(7, adapter.hidden_size)
    probs = torch.softmax(x @ adapter.router(0).weight.T, dim=-1)
    top_p, top_i = probs.topk(adapter.top_k(0), dim=-1)
    if getattr(model.config, "norm_topk_prob", True):
        top_p = top_p / top_p.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        for p, e in zip(top_p[t], top_i[t]):
            expected[t] += p * _swiglu(x[t], adapter.expert_weights(0, int(e)))
    shared = adapter.shared_expert(0)
    if shared is not None:
        expected += torch.sigmoid(block.shared_expert_gate(x)) * _swiglu(x, shared)
    with torch.no_grad():
        assert torch.allclose(block(x[None])[0], expected, atol=1e-5)


class HandSwiGLU(nn.Module):
    """The same FFN written independently of transformers' module."""

    def __init__(self, w):
        super().__init__()
        self.w = w.clone()

    def forward(self, x):
        return _swiglu(x, self.w)


@pytest.mark.parametrize("family", arch.DENSE_FAMILIES)
def test_replacing_an_ffn_through_the_adapter(family):
    model = hub.tiny(family)
    ids = tokens_for(model)
    before = logits(model, ids)
    adapter = arch.adapter_for(model)
    old = adapter.set_ffn(1, HandSwiGLU(adapter.ffn_weights(1)))
    assert adapter.ffn_kind(1) == "HandSwiGLU" and adapter.ffn_kind(0) == "dense"
    assert torch.allclose(logits(model, ids), before, atol=1e-5)
    adapter.set_ffn(1, nn.Identity())
    assert not torch.allclose(logits(model, ids), before, atol=1e-3)
    adapter.set_ffn(1, old)
    assert torch.equal(logits(model, ids), before)


def test_set_ffn_weights_with_a_new_width_and_config():
    model = hub.tiny("llama")
    adapter = arch.adapter_for(model)
    for i in range(adapter.num_layers):  # keep the first 96 of 128 channels
        w = adapter.ffn_weights(i)
        adapter.set_ffn_weights(i, arch.SwiGLUWeights(w.gate[:96], w.up[:96], w.down[:, :96]))
    adapter.set_config(ffn_size=96)
    rebuilt = adapter.rebuild()
    ids = tokens_for(model)
    assert rebuilt.config.intermediate_size == 96
    assert torch.equal(logits(model, ids), logits(rebuilt, ids))


@pytest.mark.parametrize("family", arch.MOE_FAMILIES)
def test_set_config_top_k_reaches_the_live_modules(family):
    model = hub.tiny(family)
    adapter = arch.adapter_for(model)
    ids = tokens_for(model)
    before = logits(model, ids)
    adapter.set_config(top_k=3)
    assert adapter.top_k(0) == 3 and adapter.get_config("top_k") == 3
    after = logits(model, ids)
    assert not torch.allclose(before, after)  # routing really changed
    assert torch.allclose(after, logits(adapter.rebuild(), ids), atol=1e-6)  # and agrees with the config


def test_llama_as_qwen2_is_exact():
    llama = hub.tiny("llama")
    qwen = arch.reexpress.llama_as_qwen2(llama)
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    ids = tokens_for(llama)
    assert (logits(llama, ids) - logits(qwen, ids)).abs().max() < 1e-5


def test_unsupported_architecture_names_class_and_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitecture) as err:
        arch.adapter_for(model)
    message = str(err.value)
    assert "GPT2" in message and "llama" in message and "mixtral" in message and "\n" not in message


def test_out_of_range_and_wrong_kind_are_clear():
    adapter = arch.adapter_for(hub.tiny("llama"))
    with pytest.raises(ConfigError, match="out of range"):
        adapter.ffn(5)
    with pytest.raises(ConfigError, match="not a mixture of experts"):
        adapter.router(0)
    with pytest.raises(ConfigError, match="not known"):
        adapter.set_config(num_experts=8)
