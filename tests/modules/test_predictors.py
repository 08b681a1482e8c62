"""The predictor family: the shadow predictor against hand-worked and independent computations,
its fast path against the reference, saving, densify, and that it follows the FFN as it trains."""

import copy

import pytest
import torch
import torch.nn.functional as F

import upcycle
from upcycle import hub, kernels
from upcycle.eval.selection import predictor_recall
from upcycle.eval.speed import ffn_limit, weight_bytes
from upcycle.kernels.quant import quantize_activations, quantize_gptq, quantize_rtn
from upcycle.modules import BankSparseFFN, BankSparsity, UpcycleSparseForCausalLM
from upcycle.modules.bank_sparse import ShadowPredictor, dequantize_groups

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernel unavailable: {kernels.why_unavailable()}")


def test_quantization_of_a_hand_worked_row():
    # a group on the 2-bit midrise grid of step 0.5 (levels ±0.25, ±0.75): represented exactly
    w = torch.tensor([[0.75, 0.25, -0.25, -0.75, 0.0, 0.0, 0.0, 0.0]])
    codes, scale = quantize_rtn(w, bits=2, group=4)
    assert codes.tolist() == [[3, 1, -1, -3, 1, 1, 1, 1]]  # doubled level indices: odd
    assert scale.tolist() == [[0.25, 0.0]]  # step / 2; an all-zero group: step 0, so it stays zero
    assert dequantize_groups(codes, scale, 4).tolist() == w.tolist()


def midrise_reference(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The dequantized copy written out element by element: per group, each clipping ratio's step, each
    value to its nearest level (an argmin over the list of levels), the step of least squared error."""
    levels = 2**bits
    ratios = [0.4 + 0.05 * i for i in range(13)]
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            values = [float(v) for v in w[r, start : start + group]]
            top, best = max(abs(v) for v in values), None
            for ratio in ratios:
                step = ratio * top / (levels / 2 - 0.5)
                grid = [(c - (levels - 1) / 2) * step for c in range(levels)]
                rounded = [min(grid, key=lambda q: abs(q - v)) for v in values]
                error = sum((q - v) ** 2 for q, v in zip(rounded, values))
                if best is None or error < best[0] - 1e-9:
                    best = (error, rounded)
            out[r, start : start + group] = torch.tensor(best[1])
    return out


@pytest.mark.parametrize("bits, group", [(2, 8), (3, 16), (4, 16)])
def test_quantization_against_an_element_by_element_loop(bits, group):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 64, generator=g)
    codes, scale = quantize_rtn(w, bits, group)
    assert (codes % 2 != 0).all() and codes.abs().max() <= 2**bits - 1
    torch.testing.assert_close(
        dequantize_groups(codes, scale, group), midrise_reference(w, bits, group), rtol=0, atol=1e-5
    )


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4):
        got, want = quantize_gptq(w, 3.0 * torch.eye(32), bits, 16), quantize_rtn(w, bits, 16)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gptq_of_two_correlated_inputs_by_hand():
    # H = [[1, rho], [rho, 1]] (+ 1 % damping on the diagonal): the second input absorbs rho / 1.01 of the
    # first one's rounding error before it is rounded (OBQ's update for two inputs), on the step chosen
    # from the group as it was
    rho, w = 0.6, torch.tensor([[0.37, -0.21], [0.05, 0.9]])
    codes, scale = quantize_gptq(w, torch.tensor([[1.0, rho], [rho, 1.0]]), 2, 2)
    for r in range(2):
        step = 2 * float(quantize_rtn(w[r : r + 1], 2, 2)[1])
        grid = [(c - 1.5) * step for c in range(4)]
        q0 = min(grid, key=lambda q: abs(q - float(w[r, 0])))
        q1 = min(grid, key=lambda q: abs(q - (float(w[r, 1]) + (float(w[r, 0]) - q0) * rho / 1.01)))
        assert dequantize_groups(codes[r : r + 1], scale[r : r + 1], 2)[0].tolist() == pytest.approx([q0, q1])


def test_gptq_lowers_the_output_error_the_shadow_sees():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(96, 64, generator=g)
    errors = {}
    for name, (codes, scale) in {"rtn": quantize_rtn(w, 2, 16), "gptq": quantize_gptq(w, x.T @ x, 2, 16)}.items():
        errors[name] = float((x @ (dequantize_groups(codes, scale, 16) - w).T).pow(2).mean())
    assert errors["gptq"] < 0.7 * errors["rtn"]


def _shadow_ffn(hidden=64, width=128, bank=32, keep=8, bits=4, group=16, gate="hard", seed=0):
    torch.manual_seed(seed)
    ffn = BankSparseFFN(
        hidden, width, BankSparsity(bank, keep, gate=gate, predictor="shadow", bits=bits, group=group, quantizer="rtn")
    )
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return ffn.eval()


def shadow_logits(ffn, x):
    """|silu(x̂ Ĝ^T) * (x̂ Û^T)| written out from the quantized copies and the input rounded to 8 bits
    per group (an element-by-element loop for the input)."""
    s = ffn.sparsity
    g, u = (midrise_reference(w.detach(), s.bits, s.group) for w in (ffn.gate_proj.weight, ffn.up_proj.weight))
    xhat = torch.empty_like(x)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1], s.group):
            scale = float(x[r, start : start + s.group].abs().max()) / 127 or 1.0
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
@pytest.mark.parametrize(
    "shape",
    [
        (64, 128, 32, 8, 32),
        (48, 192, 64, 16, 16),
        (576, 1536, 64, 16, 64),
        (64, 128, 32, 8, 8),
        (48, 96, 24, 6, 4),
        (64, 128, 8, 2, 16),
    ],
)  # the kernel cannot read these two
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


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_a_shadow_model_saves_reloads_identically_and_densifies(tmp_path, quantizer):
    sparsity = BankSparsity(32, 8, predictor="shadow", bits=3, group=16, quantizer=quantizer)
    sparse = UpcycleSparseForCausalLM.from_dense(hub.tiny("llama"), sparsity, [0, 1]).eval()
    if quantizer == "gptq":  # the input moment is the one thing of a shadow that is saved
        for i, layer in enumerate(sparse.model.layers):
            layer.mlp.predictor.set_input_moment(torch.randn(256, 64, generator=torch.Generator().manual_seed(i)))
    upcycle.save(sparse, hub.byte_tokenizer(), tmp_path / "m")
    reloaded, _ = upcycle.load(tmp_path / "m")
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(sparse(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert reloaded.config.sparsity["predictor"] == "shadow" and reloaded.config.sparsity["bits"] == 3
    assert reloaded.config.sparsity["quantizer"] == quantizer
    if quantizer == "gptq":
        assert torch.equal(
            reloaded.model.layers[1].mlp.predictor.input_moment, sparse.model.layers[1].mlp.predictor.input_moment
        )
    dense = upcycle.densify(reloaded)
    assert dense.config.model_type == "llama" and not any("predictor" in k for k in dense.state_dict())


def _calibrated_gptq_shadow() -> tuple[BankSparseFFN, torch.Tensor]:
    """A small FFN with a 2-bit GPTQ shadow, its input moment set from the returned inputs."""
    torch.manual_seed(0)
    ffn = BankSparseFFN(64, 128, BankSparsity(32, 8, predictor="shadow", bits=2, group=16, quantizer="gptq"))
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(512, 64) @ torch.randn(64, 64)
    ffn.predictor.set_input_moment(x)
    return ffn, x


def test_a_gptq_shadow_follows_training_cheaply_and_is_gptq_again_for_inference():
    ffn, x = _calibrated_gptq_shadow()
    torch.testing.assert_close(ffn.predictor.input_moment, x.T @ x / 512)
    shadow = ffn.predictor

    def gptq(w):
        return dequantize_groups(*quantize_gptq(w.detach(), x.T @ x / 512, 2, 16), 16)

    with torch.no_grad():
        ffn.eval().logits(x[:4])
        w0 = ffn.gate_proj.weight.clone()
        torch.testing.assert_close(shadow.weights[0], gptq(w0), rtol=0, atol=0)
        delta = 0.01 * torch.randn_like(w0)
        ffn.gate_proj.weight.add_(delta)
        ffn.train().logits(x[:4])  # training: the last pass's copy plus the weights' change, no new pass
        torch.testing.assert_close(shadow.weights[0], gptq(w0) + delta)
        ffn.eval().logits(x[:4])  # inference: GPTQ of the weights as they are now
        torch.testing.assert_close(shadow.weights[0], gptq(w0 + delta), rtol=0, atol=0)
    assert not torch.equal(gptq(w0 + delta), gptq(w0) + delta)


def test_a_shadow_for_inference_keeps_only_its_codes_and_scores_as_before():
    ffn, x = _calibrated_gptq_shadow()
    lean = copy.deepcopy(ffn).eval()
    lean.predictor.for_inference()
    with torch.no_grad():
        expected = ffn.eval().logits(x[:4])
        w = [
            dequantize_groups(*quantize_gptq(m.weight, x.T @ x / 512, 2, 16), 16) for m in (ffn.gate_proj, ffn.up_proj)
        ]
        xq = quantize_activations(x[:4], 16)
        torch.testing.assert_close(expected, (torch.nn.functional.silu(xq @ w[0].T) * (xq @ w[1].T)).abs())
        torch.testing.assert_close(lean.logits(x[:4]), expected, rtol=0, atol=0)
    shadow = lean.predictor
    assert shadow.weights is None and shadow.full_weights is None and shadow.quantized_from is None
    assert shadow.codes is not None


def test_the_shadow_bytes_are_counted():
    hidden, width = 576, 1536
    sparsity = BankSparsity(64, 16, predictor="shadow", bits=4, group=64)
    per_layer = 2 * width * (hidden // 2 + 4 * hidden // 64)  # two packed copies + fp32 scales
    assert per_layer == 995_328
    dense, kept = 3 * hidden * width * 4, 3 * hidden * width * 4 / 4
    assert ffn_limit(hidden, width, sparsity) == pytest.approx(dense / (kept + per_layer))
    two_bit = BankSparsity(64, 16, predictor="shadow", bits=2, group=64)
    assert ffn_limit(hidden, width, two_bit) == pytest.approx(
        dense / (kept + 2 * width * (hidden // 4 + 4 * hidden // 64))
    )
    sparse = UpcycleSparseForCausalLM.from_dense(
        hub.tiny("llama", ffn=128), BankSparsity(32, 8, predictor="shadow", group=16), [0, 1]
    )
    assert weight_bytes(sparse)["predictor"] == 2 * 2 * 128 * (64 // 2 + 4 * 64 // 16)


def test_nibble_packing_against_a_hand_worked_block():
    from upcycle.kernels import pack_shadow, pack_shadow_scales

    # doubled midrise codes (odd), stored as level indices (code + 2^B - 1) / 2
    codes = torch.ones(16, 16, dtype=torch.int8)  # one block of 16 channels, two runs of 8 inputs
    codes[0, :8] = torch.tensor([-15, -1, 1, 15, 3, 5, -7, 7])  # levels 0, 7, 8, 15, 9, 10, 4, 11
    codes[1, 8:] = torch.tensor([1, 1, 1, 1, -3, -3, -3, -3])  # levels 8 and 6
    packed = pack_shadow(codes)
    assert packed.shape == (1, 2, 64)
    # run 0, channel 0: byte k = level[k] | level[k + 4] << 4
    assert packed[0, 0, :4].tolist() == [0 | 9 << 4, 7 | 10 << 4, 8 | 4 << 4, 15 | 11 << 4]
    # run 1, channel 1 (bytes 4..7): inputs 8..11 low, 12..15 high
    assert packed[0, 1, 4:8].tolist() == [8 | 6 << 4] * 4
    ones = 8 | 8 << 4  # every other byte holds two codes 1 (level 8)
    assert packed[0, 0, 4:].tolist() == [ones] * 60 and packed[0, 1, :4].tolist() == [ones] * 4
    # 2-bit codes, four to a byte: one run covers 16 inputs, field f of byte 4c + k holds input 4f + k
    two = torch.ones(16, 16, dtype=torch.int8)
    two[2] = torch.tensor([-3, -1, 1, 3] * 2 + [1, 1, -1, -1] * 2)  # levels 0 1 2 3 0 1 2 3 2 2 1 1 2 2 1 1
    packed2 = pack_shadow(two, bits=2)
    assert packed2.shape == (1, 1, 64)
    assert packed2[0, 0, 8:12].tolist() == [
        0 | 0 << 2 | 2 << 4 | 2 << 6,
        1 | 1 << 2 | 2 << 4 | 2 << 6,
        2 | 2 << 2 | 1 << 4 | 1 << 6,
        3 | 3 << 2 | 1 << 4 | 1 << 6,
    ]
    assert packed2[0, 0, :4].tolist() == [2 | 2 << 2 | 2 << 4 | 2 << 6] * 4  # channel 0: all codes 1 (level 2)
    scales = torch.arange(32.0).reshape(16, 2)  # channel c, group g -> 2c + g
    assert pack_shadow_scales(scales)[0, 1].tolist() == [2 * (2 * c + 1) for c in range(16)]  # steps: twice


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
