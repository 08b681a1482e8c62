"""Low-precision inference: the bf16 and int8 kernel variants against an independent fp32 computation on
the values they store, the row-dot linear layer (fp32, bf16, int8), whole-model precision conversion, and the lean greedy
decoder against Hugging Face's generate."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from upcycle import hub, kernels
from upcycle.errors import ConfigError
from upcycle.infer.decode import GreedyDecoder
from upcycle.infer.lean_ffn import PackedRows
from upcycle.infer.precision import to_precision
from upcycle.infer.rows import MAX_KERNEL_ROWS, MAX_ROWS, RowLinear, RowsOf, StackedRows
from upcycle.kernels.memory import HUGE_PAGE
from upcycle.modules import BankSparseFFN, BankSparsity, UpcycleSparseForCausalLM

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernel unavailable: {kernels.why_unavailable()}")


def _ffn(hidden, width, bank, keep, predictor="lowrank", seed=1):
    torch.manual_seed(seed)
    ffn = BankSparseFFN(hidden, width, BankSparsity(bank, keep, 12, predictor=predictor))
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return ffn.eval()


def int8_by_hand(w: torch.Tensor) -> torch.Tensor:
    """Each row rounded to 255 levels, symmetric, scale max|row| / 127: the dequantized values."""
    out = torch.empty_like(w, dtype=torch.float32)
    for j, row in enumerate(w.float()):
        scale = row.abs().max() / 127 if row.abs().max() > 0 else torch.tensor(1.0)
        out[j] = torch.clamp(torch.round(row / scale), -127, 127) * scale
    return out


def expected(gate_w, up_w, down_w, pred, x, bank, keep):
    """Hard top-k of the low-rank predictor per bank, then SwiGLU over the kept channels, all fp32."""
    z = (x @ pred.down.weight.float().T) @ pred.up.weight.float().T + pred.up.bias.float()
    zb = z.reshape(z.shape[0], -1, bank)
    mask = torch.zeros_like(zb).scatter(-1, zb.topk(keep, dim=-1).indices, 1.0).reshape(z.shape)
    h = F.silu(x @ gate_w.T) * (x @ up_w.T)
    return (h * mask) @ down_w.T


SHAPES = [(48, 192, 32, 8), (64, 256, 64, 1), (64, 256, 64, 64), (576, 1536, 64, 16)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rows", [1, 5])
def test_bf16_kernel_computes_in_fp32_on_the_bf16_weights(shape, rows):
    hidden, width, bank, keep = shape
    ffn = _ffn(hidden, width, bank, keep).to(torch.bfloat16)
    x = torch.randn(rows, hidden).to(torch.bfloat16)
    with torch.no_grad():
        plan = kernels.plan_for(ffn)
        assert plan.packed.dtype == torch.bfloat16
        w = [m.weight.float() for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)]
        want = expected(*w, ffn.predictor, x.float(), bank, keep)
        got32 = kernels._launch(plan.ref, x.float(), None, bank, keep, 0)  # the kernel's own fp32 output
        torch.testing.assert_close(got32, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        got = kernels.run_kernel(ffn, x)  # bf16 in, bf16 out: the fp32 result rounded once
        assert got.dtype == torch.bfloat16
        # within one bf16 step of the reference (the two fp32 sums may straddle a rounding boundary)
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5 * want.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_kernel_equals_fp32_arithmetic_on_the_rounded_weights(shape, rows):
    hidden, width, bank, keep = shape
    ffn = _ffn(hidden, width, bank, keep)
    ffn.kernel_precision = "int8"  # the kernel rounds its packed rows (per channel) to int8
    x = torch.randn(rows, hidden)
    with torch.no_grad():
        plan = kernels.plan_for(ffn)
        assert plan.packed.dtype == torch.int8 and plan.row_scales.shape == (width, 3)
        gate, up = int8_by_hand(ffn.gate_proj.weight), int8_by_hand(ffn.up_proj.weight)
        down = int8_by_hand(ffn.down_proj.weight.t()).t()  # W_down^T's rows: one scale per channel
        want = expected(gate, up, down, ffn.predictor, x, bank, keep)
        got = kernels.run_kernel(ffn, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_shadow_predictor_runs_in_bf16_and_int8_and_matches_its_reference():
    torch.manual_seed(0)
    ffn = _ffn(128, 512, 64, 16, predictor="shadow").to(torch.bfloat16)
    x = torch.randn(3, 128).to(torch.bfloat16)
    with torch.no_grad():
        got = ffn(x)
        with kernels.disabled():
            ref = BankSparseFFN.reference_forward(copy.deepcopy(ffn).float(), x.float())
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        to_precision_ffn = copy.deepcopy(ffn)
        from upcycle.infer.precision import kernel_grid

        kernel_grid(to_precision_ffn)
        assert kernels.plan_for(to_precision_ffn).packed.dtype == torch.int8
        got8 = to_precision_ffn(x)
        with kernels.disabled():
            ref8 = BankSparseFFN.reference_forward(copy.deepcopy(to_precision_ffn).float(), x.float())
        torch.testing.assert_close(got8.float(), ref8, rtol=2e-2, atol=2e-2 * ref8.abs().max().item())


def q8_by_hand(x: torch.Tensor) -> torch.Tensor:
    """Each run of 32 inputs rounded to 8 bits as Q8_0 rounds a token: step max|run| / 127, codes to nearest
    (ties to even)."""
    out = torch.empty_like(x, dtype=torch.float32)
    flat, runs = out.reshape(-1, 32), x.float().reshape(-1, 32)
    for i, run in enumerate(runs):
        step = run.abs().max() / 127 if run.abs().max() > 0 else torch.tensor(1.0)
        flat[i] = torch.clamp(torch.round(run / step), -127, 127) * step
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inputs", [96, 40])
def test_int8_linear_equals_a_linear_on_its_rounded_weight_and_tokens(dtype, inputs):
    """int8 rows: the product of the rounded weight with the token rounded to 8 bits per 32 inputs (Q8_0's,
    where the inputs are a multiple of 32: the kernel's integer dots), with the token as it is otherwise."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(inputs, 40, bias=True)
    q = RowLinear(copy.deepcopy(linear).to(dtype), "int8")
    for rows in (1, 3, 6, MAX_KERNEL_ROWS + 1):  # the kernel's row dots, then torch's int8 matmul
        x = torch.randn(2, rows, inputs) * torch.linspace(0.1, 3, inputs)  # groups of different ranges
        token = q8_by_hand(x.to(dtype)) if inputs % 32 == 0 else x.to(dtype).float()
        want = F.linear(token, int8_by_hand(linear.weight), linear.bias)
        with torch.no_grad():
            got = q(x.to(dtype))
        assert got.shape == (2, rows, 40) and q.codes.dtype == torch.int8 and got.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    if inputs % 32 == 0 and dtype == torch.float32:  # the rounding is there: the plain product differs
        plain = F.linear(x, int8_by_hand(linear.weight), linear.bias)
        assert (got.float() - plain).abs().max() > 1e-3


@needs_kernel
@pytest.mark.parametrize("shape", [(576, 192), (97, 31), (40, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_row_dots_equal_fp32_arithmetic_on_the_stored_weights(shape, rows):
    """fp32 and bf16 weights: the product in fp64 of the stored values (odd row counts, inputs that are
    not a multiple of a vector); the layer is the kernel's at these rows, a matmul beyond."""
    inputs, outputs = shape
    torch.manual_seed(rows)
    assert rows <= MAX_ROWS
    for dtype in (torch.float32, torch.bfloat16):
        linear = torch.nn.Linear(inputs, outputs, bias=False).to(dtype)
        layer = RowLinear(linear, "fp32" if dtype == torch.float32 else "bf16")
        assert layer.weight is linear.weight  # shared, not copied: a tied head stays tied
        x = torch.randn(rows, inputs).to(dtype)
        want = x.double() @ linear.weight.double().T
        with torch.no_grad():
            got = torch.ops.upcycle.row_dots(x.float(), linear.weight, kernels.NO_SCALES)
            via_layer = layer(x)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(via_layer, got.to(dtype))


def test_row_linear_trains_as_a_plain_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 8)
    layer = RowLinear(linear, "fp32")
    x = torch.randn(1, 24, requires_grad=True)
    layer(x).sum().backward()  # one row, but a gradient is wanted: the plain matmul, differentiable
    assert linear.weight.grad is not None and torch.allclose(x.grad, linear.weight.sum(0).detach())


def _tiny_sparse():
    model = hub.tiny("llama", layers=2, hidden=64, ffn=128)
    return model, UpcycleSparseForCausalLM.from_dense(
        copy.deepcopy(model), BankSparsity(32, 8, 16, predictor="shadow", group=32), [0, 1]
    ).eval()


def _converted(precision):
    """The tiny sparse model converted to `precision`, with its logits on 10 tokens before and after."""
    dense, sparse = _tiny_sparse()
    ids = torch.randint(0, dense.config.vocab_size, (1, 10))
    with torch.no_grad():
        want = sparse(ids).logits
        to_precision(sparse, precision)
        got = sparse(ids).logits.float()
    return dense, sparse, want, got


def test_to_precision_int8_quantizes_every_linear_and_keeps_the_model_close():
    dense, sparse, want, got = _converted("int8")
    layer = sparse.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, RowsOf) and layer.self_attn.q_proj.precision == "int8"
    assert isinstance(layer.self_attn.o_proj, RowLinear) and isinstance(sparse.lm_head, RowLinear)
    assert sparse.lm_head.precision == "int8"
    assert isinstance(layer.mlp.gate_proj, PackedRows) and layer.mlp.kernel_precision == "int8"
    assert not [n for n, _ in layer.mlp.named_parameters()]  # its weights are the kernel's pack alone
    assert sparse.model.embed_tokens.weight.dtype == torch.bfloat16
    plan = kernels.plan_for(layer.mlp)  # its int8 rows stand for the dense model's weights
    assert plan.packed.dtype == torch.int8 and plan.packed is layer.mlp.kernel_pack.codes
    grid = plan.packed[:, 0].float() * plan.row_scales[:, 0:1]
    source = dense.model.layers[0].mlp.gate_proj.weight.detach()
    bound = plan.row_scales[:, 0:1] / 2 + source.abs() * 2**-7  # half an int8 step, then bf16's rounding
    assert ((grid - source).abs() <= bound).all()
    torch.testing.assert_close(layer.mlp.gate_proj.weight.float(), grid, rtol=2**-8, atol=0)  # what it computes with
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    with pytest.raises(ConfigError, match="precision"):
        to_precision(dense, "fp8")


def test_stacked_rows_give_each_layer_its_own_product_and_undo_on_reconversion():
    """q, k, v (with Qwen2's biases) and a dense FFN's gate and up become slices of one stacked layer;
    each slice equals the plain product with that layer's original weight, at one row (the kernel) and at
    many (the matmul), a layer called with another input gets its own rows, and converting again (int8,
    then back to fp32) rebuilds the stacks from the weights they hold."""
    model = hub.tiny("qwen2", layers=1, hidden=64, ffn=128, vocab=512).eval()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    originals = {
        n: (getattr(attn, n).weight.detach().clone(), getattr(attn, n).bias.detach().clone())
        for n in ("q_proj", "k_proj", "v_proj")
    }
    originals.update({n: (getattr(mlp, n).weight.detach().clone(), None) for n in ("gate_proj", "up_proj")})
    to_precision(model, "fp32")
    stacks = [m for m in model.modules() if isinstance(m, StackedRows)]
    assert len(stacks) == 2 and all(isinstance(getattr(attn, n), RowsOf) for n in ("q_proj", "k_proj", "v_proj"))
    layers = {
        **{n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")},
        **{n: getattr(mlp, n) for n in ("gate_proj", "up_proj")},
    }
    with torch.no_grad():
        for rows in (1, 9):
            x = torch.randn(1, rows, 64)
            for name, layer in layers.items():  # each called on its own: every call computes afresh
                weight, bias = originals[name]
                torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
            x2 = torch.randn(1, rows, 64)
            q = attn.q_proj(x)
            torch.testing.assert_close(attn.k_proj(x2), F.linear(x2, *originals["k_proj"]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(q, F.linear(x, *originals["q_proj"]), rtol=1e-5, atol=1e-5)
        to_precision(model, "int8")
        to_precision(model, "fp32")
        assert len([m for m in model.modules() if isinstance(m, StackedRows)]) == 2  # rebuilt, not added to
        x = torch.randn(1, 1, 64)
        for name, layer in layers.items():
            layer = getattr(attn if name.endswith(("q_proj", "k_proj", "v_proj")) else mlp, name)
            weight, bias = originals[name]
            scale = weight.abs().amax(1, keepdim=True) / 127  # one int8 rounding per row, then back to fp32
            torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=0, atol=float(scale.max()) * 64)


@needs_kernel
def test_a_compiled_step_calls_the_row_dots_once_per_stack():
    """One token through a compiled 2-layer model: per layer one call for q, k and v, one for o, one for
    gate and up, one for down, then the head - 9 calls, one graph, and the eager model's logits."""
    model = to_precision(hub.tiny("llama", layers=2, hidden=64, ffn=128).eval(), "fp32")
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    calls = sum(
        n.target in (torch.ops.upcycle.row_dots, torch.ops.upcycle.row_dots.default)
        for g in graphs
        for n in g.graph.nodes
    )
    assert len(graphs) == 1 and calls == 9
    torch.testing.assert_close(got, want)
    assert all(m._input is None for m in model.modules() if isinstance(m, StackedRows))  # nothing held


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4", "int4a"])
def test_the_lean_decoder_generates_what_generate_does(precision):
    dense, sparse = _tiny_sparse()
    ids = torch.randint(0, dense.config.vocab_size, (1, 7))
    for model in (dense, sparse):
        to_precision(model, precision)
        decoder = GreedyDecoder(model, max_len=32, compiled=False)  # sets eager attention on the model
        assert model.config._attn_implementation == "eager"
        with torch.no_grad():
            # (no min_new_tokens: generate would forbid end-of-sequence, which a plain greedy loop may emit;
            # where generate stops there, the tokens up to it must agree)
            want = model.generate(
                ids, max_new_tokens=12, do_sample=False, cache_implementation="static", pad_token_id=0
            )[0, 7:]
        got = decoder.generate(ids, 12)
        assert len(want) >= 3 and torch.equal(got[: len(want)], want), (precision, type(model).__name__)


def test_the_prompt_through_sdpa_gives_generates_tokens_in_fp32_and_leaves_eager_attention():
    dense, sparse = _tiny_sparse()
    ids = torch.randint(0, dense.config.vocab_size, (1, 7))
    for model in (dense, sparse):
        exact = GreedyDecoder(model, max_len=32, compiled=False).generate(ids, 10)
        decoder = GreedyDecoder(model, max_len=32, compiled=False, prompt_attention="sdpa")
        seen = []
        hook = model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda module, args: seen.append(module.config._attn_implementation)
        )
        got = decoder.generate(ids, 10)
        hook.remove()
        assert torch.equal(got, exact) and seen[0] == "sdpa" and set(seen[1:]) == {"eager"}
        assert model.config._attn_implementation == "eager"


@needs_kernel
def test_the_compiled_lean_decoder_matches_the_eager_one_with_the_kernel_inside():
    _, sparse = _tiny_sparse()
    ids = torch.randint(0, sparse.config.vocab_size, (1, 5))
    eager = GreedyDecoder(sparse, max_len=24, compiled=False).generate(ids, 8)
    decoder = GreedyDecoder(sparse, max_len=24, compiled=True)
    assert torch.equal(eager, decoder.generate(ids, 8))
    assert torch.equal(eager, decoder.generate(ids, 8))  # warm: the compiled step without its guards
    with pytest.raises(ValueError, match="at most"):
        GreedyDecoder(sparse, max_len=10, compiled=False).generate(ids, 8)


def test_row_linear_leaves_fp16_weights_to_the_matmul():
    """The operator tells bf16 from fp32 and int8 by element size; fp16 must not be read as bf16."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8, bias=False).half()
    x = torch.randn(1, 32).half()
    with torch.no_grad():
        got = RowLinear(linear, "fp16")(x)
    torch.testing.assert_close(got.float(), x.float() @ linear.weight.float().T, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_to_precision_fp32_keeps_the_function(family):
    """fp32 conversion changes how one-row products are computed, not what: a prompt (matmuls) gives
    the same logits, one token (row dots) the same to fp32 rounding; qwen2 has biased q/k/v."""
    model = hub.tiny(family, layers=2, hidden=64, ffn=128)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        want_prompt, want_token = model(ids).logits, model(ids[:, :1]).logits
        to_precision(model, "fp32")
        got_prompt, got_token = model(ids).logits, model(ids[:, :1]).logits
    assert isinstance(model.model.layers[0].self_attn.q_proj, RowsOf)
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (family == "qwen2")
    torch.testing.assert_close(got_prompt, want_prompt)
    torch.testing.assert_close(got_token, want_token, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page advice is Linux only")
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_to_precision_streams_from_huge_pages_and_keeps_the_tied_head_tied(precision):
    """The weights the row dots read start on a 2 MiB boundary (those of 2 MiB and more: smaller ones are
    ordinary copies), hold the same values, and a tied head is still the embedding's tensor."""
    model = hub.tiny(
        "llama", layers=1, hidden=512, ffn=1024, vocab=4608
    )  # fp32: FFN 2 MiB a matrix; int8: head 2.25 MiB
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    to_precision(model, precision)
    stored = [m.stored for m in model.modules() if isinstance(m, RowLinear)]
    assert len(stored) == 5  # q, k, v stacked; o; gate, up stacked; down; the head
    big = [t for t in stored if t.numel() * t.element_size() >= HUGE_PAGE]
    assert len(big) >= (3 if precision == "fp32" else 1) and all(t.data_ptr() % HUGE_PAGE == 0 for t in big)
    head = model.get_output_embeddings()
    if precision == "fp32":
        assert head.weight is model.get_input_embeddings().weight
        for name, layer in model.named_modules():  # every linear computes with its own weight, unchanged
            if isinstance(layer, (RowLinear, RowsOf)) and not name.endswith(".rows") and layer is not head:
                assert torch.equal(layer.dequantized(), before[name + ".weight"]), name
    else:
        torch.testing.assert_close(head.dequantized(), before["model.embed_tokens.weight"], rtol=0, atol=1e-2)


# ---- int4 (group 32, Q4_0's grid) ------------------------------------------------------------------------


def int4_by_hand(w: torch.Tensor) -> torch.Tensor:
    """Q4_0 group by group: d = (the value of largest magnitude) / -8 in fp16, codes floor(w / d + 8.5)
    in [0, 15] standing for (c - 8) d; an all-zero group stays zero. The dequantized values."""
    out = torch.zeros_like(w, dtype=torch.float32)
    for r, row in enumerate(w.float()):
        for g in range(0, row.numel(), 32):
            group = row[g : g + 32]
            d = (group[group.abs().argmax()] / -8).half().float()
            if d != 0:
                out[r, g : g + 32] = (torch.clamp(torch.floor(group / d + 8.5), 0, 15) - 8) * d
    return out


def int4a_by_hand(w: torch.Tensor) -> torch.Tensor:
    """Q4_1's grid group by group: m = the smallest value, d = (the largest - m) / 15, both in fp16, codes
    round((w - m) / d) in [0, 15] standing for c d + m. The dequantized values."""
    out = torch.zeros_like(w, dtype=torch.float32)
    for r, row in enumerate(w.float()):
        for g in range(0, row.numel(), 32):
            group = row[g : g + 32]
            m = group.min().half().float()
            d = ((group.max() - group.min()) / 15).half().float()
            codes = torch.clamp(torch.round((group - m) / d), 0, 15) if d != 0 else torch.zeros(32)
            out[r, g : g + 32] = codes * d + m
    return out


BY_HAND = {"int4": lambda w: int4_by_hand(w), "int4a": lambda w: int4a_by_hand(w)}


def test_int4_rows_are_q4_0_in_the_kernels_byte_layout():
    """Codes and scales against Q4_0 by hand, and the bytes against the layout written out by hand: in
    each chunk of n = min(128, K - k0) weights byte b holds weight k0 + b low and k0 + n/2 + b high."""
    torch.manual_seed(0)
    w = torch.randn(3, 192)
    w[1, 32:64] = 0.0  # an all-zero group
    codes, scales = kernels.int4_rows(w)
    assert codes.shape == (3, 96) and codes.dtype == torch.uint8 and scales.shape == (3, 6)
    assert scales.dtype == torch.float16
    torch.testing.assert_close(kernels.dequantize_int4(codes, scales), int4_by_hand(w), rtol=0, atol=0)
    levels = (int4_by_hand(w) / scales.float().repeat_interleave(32, dim=1)).nan_to_num(0.0) + 8
    for r in range(3):
        for b in range(64):
            assert int(codes[r, b]) == int(levels[r, b]) | int(levels[r, 64 + b]) << 4
        for b in range(32):
            assert int(codes[r, 64 + b]) == int(levels[r, 128 + b]) | int(levels[r, 160 + b]) << 4
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.int4_rows(torch.randn(2, 96))


INT4_SHAPES = [(64, 256, 64, 1), (64, 256, 64, 64), (128, 512, 32, 8), (576, 1536, 64, 16)]


def _int4_expected(ffn, x, bank, keep, by_hand=int4_by_hand):
    """The low-rank predictor's hard top-k on x, the gate and up dots of the int4 weights with the token
    at 8 bits, the down rows int4, sums in fp32."""
    gate, up = by_hand(ffn.gate_proj.weight), by_hand(ffn.up_proj.weight)
    down = by_hand(ffn.down_proj.weight.t().contiguous()).t()
    pred = ffn.predictor
    z = (x @ pred.down.weight.T) @ pred.up.weight.T + pred.up.bias
    zb = z.reshape(z.shape[0], -1, bank)
    mask = torch.zeros_like(zb).scatter(-1, zb.topk(keep, dim=-1).indices, 1.0).reshape(z.shape)
    xq = q8_by_hand(x)
    return ((F.silu(xq @ gate.T) * (xq @ up.T)) * mask) @ down.T


@needs_kernel
@pytest.mark.parametrize("shape", INT4_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("precision", ["int4", "int4a"])
def test_int4_kernel_equals_its_reference(shape, rows, precision):
    """int4 (Q4_0's grid) and int4a (Q4_1's: a minimum per group, its scales twice as many)."""
    hidden, width, bank, keep = shape
    ffn = _ffn(hidden, width, bank, keep)
    ffn.kernel_precision = precision
    x = torch.randn(rows, hidden)
    with torch.no_grad():
        plan = kernels.plan_for(ffn)
        assert plan.packed.dtype == torch.uint8 and plan.packed.shape == (width, 3, hidden // 2)
        assert plan.row_scales.shape == (width, 3, hidden // (32 if precision == "int4" else 16))
        want = _int4_expected(ffn, x, bank, keep, BY_HAND[precision])
        got = kernels.run_kernel(ffn, x)
        via_operator = torch.ops.upcycle.bank_sparse_ffn(
            x, plan.packed, plan.row_scales, *plan.predictor, bank, keep, 0
        )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(via_operator, got)


INT4_ROWS = [(576, 192), (128, 31), (64, 40)]


@needs_kernel
@pytest.mark.parametrize("shape", INT4_ROWS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("precision", ["int4", "int4a"])
def test_int4_row_dots_equal_the_hand_computation(shape, rows, precision):
    """The operator (C++ and ctypes alike) and the layer: x at 8 bits per 32 against the Q4_0 (Q4_1)
    weight; the layer's paths beyond 4 rows (the kernel again, then the matmul) compute the same."""
    inputs, outputs = shape
    torch.manual_seed(rows)
    linear = torch.nn.Linear(inputs, outputs, bias=True)
    layer = RowLinear(linear, precision)
    x = torch.randn(rows, inputs)
    want = (q8_by_hand(x).double() @ BY_HAND[precision](linear.weight).double().T).float()
    with torch.no_grad():
        got = torch.ops.upcycle.row_dots(x, layer.codes, layer.scales)
        by_ctypes = kernels._python_row_dots(x, layer.codes, layer.scales)
        via_layer = layer(x)
        many = layer(torch.cat([x] * 3))  # more rows than the kernel takes in one pass
        most = layer(torch.cat([x] * 20))  # more than it takes at all: the matmul
    tol = 1e-5 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)
    torch.testing.assert_close(by_ctypes, got)
    torch.testing.assert_close(via_layer, got + linear.bias)
    torch.testing.assert_close(many, torch.cat([got + linear.bias] * 3), rtol=1e-5, atol=tol)
    torch.testing.assert_close(most, torch.cat([got + linear.bias] * 20), rtol=1e-5, atol=tol)


@needs_kernel
def test_the_scalar_fallback_computes_what_the_vector_code_does():
    """The kernels built without AVX-512 (a CPU without it gets the plain loops): int4 FFN and row dots,
    and the int8 ones beside them, against the same references."""
    from upcycle.kernels import build

    lib = build._bind(ctypes_library(build._built(build.compiler(), "libupcycle_scalar.so",
                                                  [build.SOURCE, build.Q4_SOURCE], ["-mno-avx512f", "-mno-f16c"])))  # fmt: skip
    torch.manual_seed(3)
    for precision in ("int4", "int4a", "int8"):
        ffn = _ffn(128, 512, 32, 8)
        ffn.kernel_precision = precision
        x = torch.randn(3, 128)
        with torch.no_grad():
            plan = kernels.plan_for(ffn)
            vector = kernels.run_kernel(ffn, x)
            out = torch.empty_like(x)
            assert lib.upcycle_bank_sparse_ffn_f32(plan.ref, x.data_ptr(), 3, None, 32, 8, 0, out.data_ptr()) == 0
        torch.testing.assert_close(out, vector, rtol=1e-4, atol=1e-5 * vector.abs().max().item())
    linear = torch.nn.Linear(576, 40, bias=False)
    for precision, weight_type in (("int4", 3), ("int4a", 4)):
        layer = RowLinear(linear, precision)
        x = torch.randn(2, 576)
        y = torch.empty(2, 40)
        code = lib.upcycle_row_dots(
            layer.codes.data_ptr(), weight_type, layer.scales.data_ptr(), x.data_ptr(), 2, 40, 576, y.data_ptr()
        )
        assert code == 0
        want = q8_by_hand(x) @ BY_HAND[precision](linear.weight).T
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def ctypes_library(path):
    import ctypes

    return ctypes.CDLL(str(path))


def test_to_precision_int4_quantizes_every_linear_it_can_and_keeps_the_model_close():
    """Attention and the FFNs (dense and bank-sparse) int4, the head int8 (as llama.cpp keeps its output
    matrix wider); a layer whose inputs are not a multiple of 64 stays int8; the logits stay close to the
    fp32 model's."""
    _, sparse, want, got = _converted("int4")
    layer = sparse.model.layers[0]
    assert layer.self_attn.q_proj.precision == "int4" and sparse.lm_head.precision == "int8"
    assert layer.mlp.kernel_precision == "int4" and kernels.plan_for(layer.mlp).packed.dtype == torch.uint8
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
    odd = to_precision(hub.tiny("llama", layers=1, hidden=96, ffn=128), "int4")
    assert odd.model.layers[0].self_attn.o_proj.precision == "int8"  # 96 inputs
    assert odd.model.layers[0].mlp.down_proj.precision == "int4"  # 128 inputs


def gptq_int4_by_hand(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """GPTQ in its textbook form, in float64, one input at a time: U the upper Cholesky factor of
    (H + 1 % of its mean diagonal)^-1; at each group's first input Q4_0's step from the weights as updated so
    far, the input that set it held at code 0; each input's error spread over the later inputs by U's row.
    The dequantized values."""
    h = h.double() + 0.01 * h.diagonal().double().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    weights, out = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for j in range(w.shape[1]):
        if j % 32 == 0:
            group = weights[:, j : j + 32]
            at = group.abs().argmax(1)
            d = (group.gather(1, at[:, None]).squeeze(1) / -8).half().double()
        codes = torch.clamp(torch.floor(weights[:, j] / torch.where(d != 0, d, 1) + 8.5), 0, 15)
        codes = torch.where(d == 0, 8.0, torch.where(at == j % 32, 0.0, codes))
        out[:, j] = (codes - 8) * d
        error = (weights[:, j] - out[:, j]) / u[j, j]
        weights[:, j + 1 :] -= error[:, None] * u[j, j + 1 :][None, :]
    return out.float()


def _correlated_inputs(k: int, n: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) / k**0.5


def test_gptq_int4_is_textbook_gptq_on_q4_0s_grid_and_beats_its_rounding():
    """int4_rows_gptq (blocked, fp32) against GPTQ by hand (float64, one input at a time): the same values
    but where fp32 and float64 round an input differently; with H = I it is Q4_0's rule exactly; its
    values give its codes back under Q4_0's rule (what packed copies re-derive); and on the inputs H came
    from, its products are closer to the fp32 layer's than Q4_0's rounding."""
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(256)
    h = x.T @ x
    codes, scales = kernels.quant.int4_rows_gptq(w, h)
    ours = kernels.dequantize_int4(codes, scales)
    hand = gptq_int4_by_hand(w, h)
    assert (ours == hand).float().mean() > 0.97
    assert torch.allclose(x @ ours.T, x @ hand.T, atol=0.05 * (x @ w.T).abs().max())
    same = kernels.quant.int4_rows_gptq(w, torch.eye(256))
    assert torch.equal(kernels.dequantize_int4(*same), int4_by_hand(w))
    again = kernels.int4_rows(ours)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scales)
    error = {name: (x @ (v - w).T).pow(2).mean() for name, v in (("gptq", ours), ("q4_0", int4_by_hand(w)))}
    assert error["gptq"] < 0.8 * error["q4_0"]


def test_to_precision_int4_with_calibration_stores_gptq_codes_from_the_layers_inputs():
    """The stacked q/k/v rows of a calibrated int4 model hold int4_rows_gptq of the three weights against
    H = X^T X of the attention's input, X captured here at the input norm's output; the FFN's down rows
    against its own input; without calibration, Q4_0's rule."""
    model = hub.tiny("llama", layers=2, hidden=64, ffn=128).eval()
    blocks = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[1]
    seen = {"attn": [], "down": []}
    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, i, o: seen["attn"].append(o.reshape(-1, 64))),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, i: seen["down"].append(i[0].reshape(-1, 128))),
    ]
    with torch.no_grad():
        for block in blocks:
            model(block[None])
    for hook in hooks:
        hook.remove()
    attn, down = torch.cat(seen["attn"]), torch.cat(seen["down"])
    qkv = torch.cat([getattr(layer.self_attn, f"{n}_proj").weight.detach() for n in "qkv"])
    plain_down = layer.mlp.down_proj.weight.detach().clone()
    want_qkv = kernels.quant.int4_rows_gptq(qkv, attn.T @ attn)
    want_down = kernels.quant.int4_rows_gptq(layer.mlp.down_proj.weight.detach(), down.T @ down)
    rtn = to_precision(copy.deepcopy(model), "int4").model.layers[1]
    to_precision(model, "int4", calibration=blocks)
    stack = layer.self_attn.stacked_q_proj_k_proj_v_proj.rows
    assert stack.precision == "int4" and (stack.codes == want_qkv[0]).float().mean() > 0.98
    assert torch.allclose(stack.scales.float(), want_qkv[1].float(), rtol=1e-2)
    assert (layer.mlp.down_proj.codes == want_down[0]).float().mean() > 0.98
    assert not torch.equal(layer.mlp.down_proj.codes, rtn.mlp.down_proj.codes)
    assert torch.equal(rtn.mlp.down_proj.codes, kernels.int4_rows(plain_down)[0])


def test_gptq_moments_taken_a_chunk_of_layers_at_a_time_give_the_same_codes():
    """A memory budget smaller than one layer's moments: the blocks run once per chunk, stopped after its
    last layer, and every layer's codes are those of the one-pass collection."""
    from upcycle.infer.calibrate import gptq_int4

    model = hub.tiny("llama", layers=3, hidden=64, ffn=128).eval()
    blocks = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    whole, chunked = gptq_int4(model, blocks), gptq_int4(model, blocks, budget_mb=0.01)
    assert set(whole) == set(chunked) and len(whole) == 3 * 7  # q, k, v, o, gate, up, down in each layer
    for key, (codes, scales) in whole.items():
        assert torch.equal(chunked[key][0], codes) and torch.equal(chunked[key][1], scales)


@needs_kernel
@pytest.mark.parametrize("precision, cast", [("int8", torch.bfloat16), ("int4", torch.float32)])
def test_casting_a_converted_model_to_its_own_dtype_changes_nothing(precision, cast):
    """`model.to(dtype)` casts every floating buffer: the row scales the kernel reads as fp32 (int8) or fp16
    (int4) must not follow, or the kernel reads them as what they are not."""
    model = to_precision(_tiny_sparse()[1], precision)
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.no_grad():
        want = model(ids).logits
        model.to(cast)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
