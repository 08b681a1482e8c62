"""The predictor family: the shadow predictor against hand-worked and independent computations,
its fast path against the reference, saving, densify, and that it follows the FFN as it trains."""

import pytest
import torch
import torch.nn.functional as F

import upcycle
from upcycle import hub, kernels
from upcycle.eval.selection import predictor_recall
from upcycle.eval.speed import ffn_limit, weight_bytes
from upcycle.modules import BankSparseFFN, BankSparsity, UpcycleSparseForCausalLM
from upcycle.modules.bank_sparse import ShadowPredictor, dequantize_groups, quantize_groups

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernel unavailable: {kernels.why_unavailable()}")


def test_quantization_of_a_hand_worked_row():
    w = torch.tensor([[0.7, -0.35, 0.1, 0.0]])
    codes, scale = quantize_groups(w, bits=3, group=2)  # Q = 3: codes in [-3, 3]
    assert scale[0].tolist() == pytest.approx([0.7 / 3, 0.1 / 3])
    assert codes.tolist() == [[3, -2, 3, 0]]  # -0.35 / (0.7/3) = -1.5 rounds to even: -2
    assert dequantize_groups(codes, scale, 2)[0].tolist() == pytest.approx([0.7, -0.7 * 2 / 3, 0.1, 0.0])
    zero_codes, zero_scale = quantize_groups(torch.zeros(1, 4), bits=4, group=4)
    assert zero_codes.abs().sum() == 0 and zero_scale.item() == 1.0


@pytest.mark.parametrize("bits, group", [(2, 8), (4, 16), (8, 32)])
def test_quantization_against_an_element_by_element_loop(bits, group):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 64, generator=g)
    codes, scale = quantize_groups(w, bits, group)
    q = 2 ** (bits - 1) - 1
    for r in range(6):
        for start in range(0, 64, group):
            s = max(abs(float(v)) for v in w[r, start:start + group]) / q
            assert scale[r, start // group].item() == pytest.approx(s, rel=1e-6)
            for c in range(start, start + group):
                want = max(-q, min(q, round(float(w[r, c]) / s)))
                assert abs(int(codes[r, c]) - want) <= (1 if abs(abs(float(w[r, c]) / s) % 1 - 0.5) < 1e-5 else 0)
    error = (dequantize_groups(codes, scale, group) - w).abs()
    assert (error <= scale.repeat_interleave(group, 1) / 2 + 1e-6).all()  # at most half a step


def _shadow_ffn(hidden=64, width=128, bank=32, keep=8, bits=4, group=16, gate="hard", seed=0):
    torch.manual_seed(seed)
    ffn = BankSparseFFN(hidden, width, BankSparsity(bank, keep, gate=gate, predictor="shadow", bits=bits, group=group))
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return ffn.eval()


def shadow_logits(ffn, x):
    """|silu(x̂ Ĝ^T) * (x̂ Û^T)| written out from the quantized copies and the input rounded to 8 bits
    per group (an element-by-element loop for the input)."""
    s = ffn.sparsity
    g = dequantize_groups(*quantize_groups(ffn.gate_proj.weight, s.bits, s.group), s.group)
    u = dequantize_groups(*quantize_groups(ffn.up_proj.weight, s.bits, s.group), s.group)
    xhat = torch.empty_like(x)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1], s.group):
            scale = float(x[r, start:start + s.group].abs().max()) / 127 or 1.0
            for c in range(start, start + s.group):
                xhat[r, c] = max(-127, min(127, round(float(x[r, c]) / scale))) * scale
    return (F.silu(xhat @ g.T) * (xhat @ u.T)).abs()


def test_shadow_logits_and_its_selection_against_an_independent_computation():
    ffn = _shadow_ffn()
    x = torch.randn(5, 64)
    with torch.no_grad(), kernels.disabled():
        torch.testing.assert_close(ffn.logits(x), shadow_logits(ffn, x))
        mask = torch.zeros(5, 4, 32).scatter(-1, shadow_logits(ffn, x).reshape(5, 4, 32).topk(8, -1).indices, 1.0)
        h = F.silu(ffn.gate_proj(x)) * ffn.up_proj(x)
        torch.testing.assert_close(ffn(x), ffn.down_proj(h * mask.reshape(5, 128)))
    assert not list(ffn.predictor.parameters()) and not any("predictor" in k for k in ffn.state_dict())


def test_the_shadow_follows_the_weights_when_they_change_in_place():
    ffn = _shadow_ffn()
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = ffn.logits(x).clone()
        ffn.gate_proj.weight.mul_(-1)
        torch.testing.assert_close(ffn.logits(x), shadow_logits(ffn, x))
    assert not torch.allclose(before, ffn.logits(x))


def test_more_bits_recall_more_of_the_oracle():
    ffn = _shadow_ffn(hidden=64, width=256, bank=64, keep=16, group=16)
    x = torch.randn(512, 64)
    recalls = []
    for bits in (2, 4, 8):
        ffn.predictor = ShadowPredictor(bits, 16, ffn.act_fn)
        recalls.append(predictor_recall(ffn, x))
    assert recalls[0] < recalls[1] < recalls[2] and recalls[2] > 0.97


@pytest.mark.skipif(not kernels.available(), reason="kernel unavailable")
@pytest.mark.parametrize("shape", [(64, 128, 32, 8, 32), (48, 192, 64, 16, 16), (576, 1536, 64, 16, 64),
                                   (64, 128, 32, 8, 8),
                                   (48, 96, 24, 6, 4), (64, 128, 8, 2, 16)])  # the kernel cannot read these two
@pytest.mark.parametrize("rows", [1, 3, 6])  # 6: a block of four tokens, then two
@pytest.mark.parametrize("keep", ["k", 1, "bank"])
@pytest.mark.parametrize("bits", [2, 4, 6])  # 6 bits: the kernel takes the logits computed in PyTorch
def test_shadow_fast_path_equals_the_reference(shape, rows, keep, bits):
    hidden, width, bank, k, group = shape
    k = {"k": k, "bank": bank}.get(keep, keep)
    ffn = _shadow_ffn(hidden, width, bank, k, bits=bits, group=group)
    x = torch.randn(rows, hidden)
    with torch.no_grad():
        got = kernels.run_kernel(ffn, x)
        with kernels.disabled():
            want = ffn(x)
    readable = bits <= 4 and group % (16 if bits == 2 else 8) == 0 and bank % 16 == 0  # a run: 32 / stored bits
    assert (kernels.plan_for(ffn).shadow is not None) == readable
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_a_shadow_model_saves_reloads_identically_and_densifies(tmp_path):
    sparsity = BankSparsity(32, 8, predictor="shadow", bits=3, group=16)
    sparse = UpcycleSparseForCausalLM.from_dense(hub.tiny("llama"), sparsity, [0, 1]).eval()
    upcycle.save(sparse, hub.byte_tokenizer(), tmp_path / "m")
    reloaded, _ = upcycle.load(tmp_path / "m")
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(sparse(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert reloaded.config.sparsity["predictor"] == "shadow" and reloaded.config.sparsity["bits"] == 3
    dense = upcycle.densify(reloaded)
    assert dense.config.model_type == "llama"


def test_the_shadow_bytes_are_counted():
    hidden, width = 576, 1536
    sparsity = BankSparsity(64, 16, predictor="shadow", bits=4, group=64)
    per_layer = 2 * width * (hidden // 2 + 4 * hidden // 64)  # two packed copies + fp32 scales
    assert per_layer == 995_328
    dense, kept = 3 * hidden * width * 4, 3 * hidden * width * 4 / 4
    assert ffn_limit(hidden, width, sparsity) == pytest.approx(dense / (kept + per_layer))
    two_bit = BankSparsity(64, 16, predictor="shadow", bits=2, group=64)
    assert ffn_limit(hidden, width, two_bit) == pytest.approx(dense / (kept + 2 * width * (hidden // 4 + 4 * hidden // 64)))
    sparse = UpcycleSparseForCausalLM.from_dense(hub.tiny("llama", ffn=128), BankSparsity(32, 8, predictor="shadow",
                                                                                         group=16), [0, 1])
    assert weight_bytes(sparse)["predictor"] == 2 * 2 * 128 * (64 // 2 + 4 * 64 // 16)


def test_nibble_packing_against_a_hand_worked_block():
    from upcycle.kernels import pack_shadow, pack_shadow_scales

    codes = torch.zeros(16, 16, dtype=torch.int8)  # one block of 16 channels, two runs of 8 inputs
    codes[0, :8] = torch.tensor([-8, -1, 0, 7, 1, 2, -3, 3])
    codes[1, 8:] = torch.tensor([1, 1, 1, 1, -2, -2, -2, -2])
    packed = pack_shadow(codes)
    assert packed.shape == (1, 2, 64)
    # run 0, channel 0: byte k = (code[k] + 8) | (code[k + 4] + 8) << 4
    assert packed[0, 0, :4].tolist() == [0 | 9 << 4, 7 | 10 << 4, 8 | 5 << 4, 15 | 11 << 4]
    # run 1, channel 1 (bytes 4..7): inputs 8..11 low, 12..15 high
    assert packed[0, 1, 4:8].tolist() == [9 | 6 << 4] * 4
    zero = 8 | 8 << 4  # every other byte holds two zero codes
    assert packed[0, 0, 4:].tolist() == [zero] * 60 and packed[0, 1, :4].tolist() == [zero] * 4
    # 2-bit codes, four to a byte: one run covers 16 inputs, field f of byte 4c + k holds input 4f + k
    two = torch.zeros(16, 16, dtype=torch.int8)
    two[2] = torch.tensor([-1, 0, 1, 0] * 2 + [1, 1, -1, -1] * 2)
    packed2 = pack_shadow(two, bits=2)
    assert packed2.shape == (1, 1, 64)
    assert packed2[0, 0, 8:12].tolist() == [1 | 1 << 2 | 3 << 4 | 3 << 6, 2 | 2 << 2 | 3 << 4 | 3 << 6,
                                            3 | 3 << 2 | 1 << 4 | 1 << 6, 2 | 2 << 2 | 1 << 4 | 1 << 6]
    assert packed2[0, 0, :4].tolist() == [2 | 2 << 2 | 2 << 4 | 2 << 6] * 4  # channel 0: all zero codes
    scales = torch.arange(32.0).reshape(16, 2)  # channel c, group g -> 2c + g
    assert pack_shadow_scales(scales)[0, 1].tolist() == [2 * c + 1 for c in range(16)]


@needs_kernel
def test_a_compiled_shadow_ffn_calls_the_kernel_operator_and_matches_the_reference():
    ffn = _shadow_ffn(576, 1536, 64, 16, group=64)
    x = torch.randn(1, 1, 576)
    with torch.no_grad():
        eager = ffn(x)  # builds the plan the compiled graph uses
        graph = torch.compile(ffn, backend="aot_eager", fullgraph=True)
        compiled = graph(x)
        with kernels.disabled():
            want = ffn(x)
    torch.testing.assert_close(compiled, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(eager, compiled)
    plan = kernels.plan_for(ffn)
    got = torch.ops.upcycle.bank_sparse_ffn_shadow(x[0], plan.packed, plan.row_scales, *plan.shadow, 64, 16, 0)
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-5 * want.abs().max().item())
