"""Every transform that claims to preserve the function, on every family it applies to, through one check.

The check is independent of the transforms' own reports: the logits of the two models on the same
random tokens, compared elementwise, and the argmax everywhere the same.
"""

import pytest
import torch

from conftest import ALL_FAMILIES, tokens_for
from upcycle import arch, hub
from upcycle.arch import DENSE_FAMILIES, MOE_FAMILIES
from upcycle.ops import SparsifyConfig, densify, to_bank_sparse
from upcycle.ops.calibrate import ffn_inputs
from upcycle.ops.grow import GrowStep, apply_step


def _sparse(model, **options):
    cfg = SparsifyConfig(**{"bank": 32, "keep": 32, "rank": 4, "warmup_steps": 0, **options})
    layers = list(range(arch.adapter_for(model).num_layers))
    inputs = ffn_inputs(model, tokens_for(model, n=4, length=32, seed=1), layers) if cfg.permute else None
    return to_bank_sparse(model, cfg, inputs)[0]


def permute(model, tmp_path):
    """co-activation channel permutation, exported back to the stock family (densify)"""
    return densify(_sparse(model, permute=True))


def pad(model, tmp_path):
    """zero channels up to a multiple of the bank (128 -> 144 at bank 48), every channel kept"""
    return _sparse(model, bank=48, keep=48, pad=True)


def keep_equals_bank(model, tmp_path):
    """a bank-sparse FFN that keeps every channel of every bank"""
    return _sparse(model)


def convert(model, tmp_path):
    """save as a Hugging Face folder (safetensors), reload"""
    hub.save(model, hub.byte_tokenizer(), tmp_path / "converted")
    return hub.load(tmp_path / "converted")[0]


def qwen2_reexpression(model, tmp_path):
    """Llama as Qwen2ForCausalLM (zero q/k/v biases)"""
    return arch.reexpress.llama_as_qwen2(model)


def grow_moe(model, tmp_path):
    """dense → MoE by copies (grow), random router"""
    return apply_step(model, GrowStep(op="moe", experts=4, top_k=2, router="random"))[0]


def grow_experts(model, tmp_path):
    """MoE → twice the experts and twice the top-k (grow)"""
    return apply_step(model, GrowStep(op="experts", factor=2))[0]


def grow_depth_and_width(model, tmp_path):
    """+1 identity layer, a wider FFN, a doubled hidden size (grow)"""
    for step in (GrowStep(op="depth", add=1), GrowStep(op="ffn_width", width=160), GrowStep(op="hidden", factor=2)):
        model = apply_step(model, step)[0]
    return model


# transform -> the families it applies to (the sparsify transforms need a dense SwiGLU FFN)
APPLIES = {
    permute: DENSE_FAMILIES,
    pad: DENSE_FAMILIES,
    keep_equals_bank: DENSE_FAMILIES,
    convert: ALL_FAMILIES,
    qwen2_reexpression: ("llama",),
    grow_moe: DENSE_FAMILIES,
    grow_experts: MOE_FAMILIES,
    grow_depth_and_width: ALL_FAMILIES,
}
CASES = [pytest.param(t, f, id=f"{t.__name__}-{f}") for t, families in APPLIES.items() for f in families]


def assert_preserves(reference, candidate, tol=1e-4):
    ids = tokens_for(reference, n=3, length=24, seed=7)
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, candidate(input_ids=ids).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("transform, family", CASES)
def test_function_preserving_transforms(transform, family, tmp_path):
    model = hub.tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidate = transform(model, tmp_path)
    assert_preserves(model, candidate)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is left alone


def test_the_shared_check_catches_a_change():
    model = hub.tiny("llama")
    changed = hub.tiny("llama")
    with torch.no_grad():
        arch.adapter_for(changed).ffn_weights(1).down.mul_(1.01)
    with pytest.raises(AssertionError):
        assert_preserves(model, changed)
