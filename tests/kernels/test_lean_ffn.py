"""A converted bank-sparse FFN keeps its weights once, as the kernel's pack (upcycle.infer.lean_ffn): it
must compute what the FFN converted the old way (float weights on the grid beside the pack) computes."""

import copy

import pytest
import torch

from upcycle import hub, kernels
from upcycle.infer.lean_ffn import PackedRows
from upcycle.infer.precision import DTYPES, kernel_grid, to_precision
from upcycle.modules import BankSparseFFN, BankSparsity, UpcycleSparseForCausalLM

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernel unavailable: {kernels.why_unavailable()}")


def _sparse(hidden=64, ffn=128):
    torch.manual_seed(0)
    model = hub.tiny("llama", layers=2, hidden=hidden, ffn=ffn)
    sparsity = BankSparsity(32, 8, predictor="shadow", group=32)
    return UpcycleSparseForCausalLM.from_dense(model, sparsity, [0, 1]).eval()


def _converted_with_weights(ffn: BankSparseFFN, precision: str) -> BankSparseFFN:
    """The FFN as to_precision converted it before it was made lean: float weights on the kernel's grid,
    the kernel packing its own copy of them."""
    old = copy.deepcopy(ffn).to(DTYPES[precision])
    if precision in kernels.QUANTIZERS:
        kernel_grid(old, precision)
    old.predictor.for_inference()
    return old


@needs_kernel
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_a_lean_ffn_computes_what_the_ffn_with_weights_computes(precision):
    model = _sparse()
    old = _converted_with_weights(model.model.layers[0].mlp, precision)
    to_precision(model, precision)
    lean = model.model.layers[0].mlp
    assert all(isinstance(getattr(lean, n), PackedRows) for n in ("gate_proj", "up_proj", "down_proj"))
    assert not [n for n, _ in lean.named_parameters()]  # no float copy of the weights is left
    dtype = DTYPES[precision]
    with torch.no_grad():
        token = torch.randn(1, 1, 64).to(dtype)
        assert kernels.plan_for(lean).usable and kernels.plan_for(old).usable
        torch.testing.assert_close(lean(token), old(token), rtol=0, atol=0)  # the kernel: the same pack
        rows = torch.randn(1, kernels.MAX_TOKENS + 1, 64).to(dtype)  # the reference path
        want, got = old(rows).float(), lean(rows).float()
    if precision in ("fp32", "int4"):  # the pack holds the float weights exactly (int4: its grid re-derives itself)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # bf16's rounding of the grid: the old weights were bf16 grid values, the pack's are exact
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_lean_weights_are_the_packs_rows_and_converting_again_gives_them_back():
    model = _sparse()
    dense_gate = model.model.layers[1].mlp.gate_proj.weight.detach().clone()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    to_precision(model, "int4")
    ffn = model.model.layers[1].mlp
    codes, scales = ffn.kernel_pack.codes, ffn.kernel_pack.scales
    # by hand (Q4_0's block layout): 32 bytes per 64 inputs, the low nibbles the first 32, the high ones the
    # next; minus 8, times the fp16 step of every 32 inputs
    blocks = codes[:, 0].reshape(codes.shape[0], -1, 32)
    nibbles = torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(codes.shape[0], -1)
    steps = scales[:, 0].float().repeat_interleave(32, dim=-1)
    torch.testing.assert_close(ffn.gate_proj.weight, (nibbles.float() - 8) * steps, rtol=0, atol=0)
    # within half a step, or one where Q4_0's grid clips (it reaches -8 steps on one side, 7 on the other)
    assert ((ffn.gate_proj.weight - dense_gate).abs() <= steps.abs() + 1e-6).all()
    copied = copy.deepcopy(model)  # a copy holds a pack of its own and computes the same
    with torch.no_grad():
        torch.testing.assert_close(copied(ids).logits, model(ids).logits, rtol=0, atol=0)
        to_precision(model, "int8")  # from int4 back through plain weights to int8
        again = model.model.layers[1].mlp
        assert again.kernel_pack.precision == "int8" and again.kernel_pack.codes.dtype == torch.int8
        # fp32's pack holds the weights exactly: converting on from it is converting the model itself
        via_fp32 = to_precision(to_precision(_sparse(), "fp32"), "int8")
        fresh = to_precision(_sparse(), "int8")
        torch.testing.assert_close(via_fp32(ids).logits, fresh(ids).logits, rtol=0, atol=0)
