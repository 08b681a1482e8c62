"""upcycle.kernels: the fast inference path against an independent computation, its fallback, and
that training never takes it."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import upcycle
from upcycle import hub, kernels
from upcycle.kernels import build
from upcycle.modules import BankSparseFFN, BankSparsity, UpcycleSparseForCausalLM

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernel unavailable: {kernels.why_unavailable()}")


@pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler: the fallback is the intended path")
def test_the_kernel_builds_wherever_a_compiler_is_found():
    # every kernel test below skips when the build fails, so a source that does not compile on this CPU
    # (AVX2 without AVX-512 once lacked a header) would otherwise pass the suite silently on the fallback
    assert kernels.available(), kernels.why_unavailable()


def _ffn(hidden=48, width=192, bank=32, keep=8, rank=12, gate="hard", seed=1):
    torch.manual_seed(seed)
    ffn = BankSparseFFN(hidden, width, BankSparsity(bank, keep, rank, gate, predictor="lowrank"))
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return ffn.eval()


def expected(ffn, x):
    """The bank-sparse FFN written out independently: logits, per-bank top-k, gate values, SwiGLU."""
    bank, keep, mode = ffn.sparsity.bank, ffn.keep, ffn.sparsity.gate
    p = ffn.predictor
    z = (x @ p.down.weight.T) @ p.up.weight.T + p.up.bias
    zb = z.reshape(*z.shape[:-1], -1, bank)
    top = zb.topk(keep, dim=-1)
    if mode == "hard":
        values = torch.ones_like(top.values)
    elif mode == "sigmoid":
        values = torch.sigmoid(top.values)
    else:
        values = keep * torch.softmax(top.values, dim=-1)
    gate = torch.zeros_like(zb).scatter(-1, top.indices, values).reshape(z.shape)
    h = F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)
    return (h * gate) @ ffn.down_proj.weight.T


@needs_kernel
@pytest.mark.parametrize("gate", ["hard", "sigmoid", "softmax"])
# (48, 192, 32, 7): a thread's kept channels are not a multiple of the 8 a token streams at once
@pytest.mark.parametrize("shape", [(48, 192, 32, 8), (48, 192, 32, 7), (40, 128, 64, 16), (576, 1536, 64, 16)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_kernel_equals_an_independent_computation(gate, shape, rows):
    hidden, width, bank, keep = shape
    ffn = _ffn(hidden, width, bank, keep, gate=gate)
    x = torch.randn(rows, hidden)
    with torch.no_grad():
        want = expected(ffn, x)
        for z in (None, ffn.predictor(x)):  # logits computed in the kernel, or passed in
            got = kernels.run_kernel(ffn, x, z)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("keep", [1, 32])
def test_kernel_extremes_one_channel_per_bank_and_all_of_them(keep):
    ffn = _ffn(bank=32, keep=keep)
    x = torch.randn(5, 48)
    with torch.no_grad():
        got = kernels.run_kernel(ffn, x)
        torch.testing.assert_close(got, expected(ffn, x), rtol=1e-4, atol=1e-5)
        if keep == 32:  # k = b: the dense SwiGLU FFN
            dense = ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
            torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bank", [24, 64, 512])  # a partial sort; the vector ranking; a partial sort again
def test_tied_logits_keep_exactly_k_per_bank_lower_index_first(bank):
    keep = bank // 4
    ffn = _ffn(40, 2 * bank, bank, keep)
    x = torch.randn(3, 40)
    z = torch.randint(0, 3, (3, 2 * bank)).float()  # three distinct values: ties everywhere
    with torch.no_grad():
        got = kernels.run_kernel(ffn, x, z)
        first = torch.sort(-z.reshape(3, 2, bank), dim=-1, stable=True).indices[..., :keep]  # stable: index order
        gate = torch.zeros(3, 2, bank).scatter(-1, first, 1.0).reshape(3, -1)
        assert torch.equal(gate.reshape(3, 2, bank).sum(-1), torch.full((3, 2), float(keep)))
        h = F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)
        torch.testing.assert_close(got, (h * gate) @ ffn.down_proj.weight.T, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_eval_forward_takes_the_fast_path_for_any_leading_shape(monkeypatch):
    # several rows take the kernel where it measured faster than the reference: a timing, not what this
    # test is about (under load it may lose), so the measurement is taken as a win here
    monkeypatch.setattr(kernels, "_kernel_wins", lambda module, x2d, plan: True)
    ffn = _ffn()
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        assert kernels.sparse_ffn_forward(ffn, x) is not None
        torch.testing.assert_close(ffn(x), expected(ffn, x), rtol=1e-4, atol=1e-5)
        assert kernels.sparse_ffn_forward(ffn, torch.randn(1, 1, 48)) is not None  # batch 1: no measuring
        big = torch.randn(1, kernels.MAX_TOKENS + 1, 48)  # prefill: the reference
        assert kernels.sparse_ffn_forward(ffn, big) is None


@needs_kernel
def test_weights_changed_in_place_are_seen():
    ffn = _ffn()
    x = torch.randn(1, 48)
    with torch.no_grad():
        before = ffn(x)
        ffn.down_proj.weight.mul_(2)
        ffn.predictor.up.bias.add_(1)
        after = ffn(x)
        torch.testing.assert_close(after, expected(ffn, x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(before, after)
        kernels.release(ffn)
        assert "_kernel_plan" not in ffn.__dict__


def test_training_and_gradients_never_take_the_fast_path():
    ffn = _ffn().train()
    x = torch.randn(4, 48, requires_grad=True)
    assert kernels.sparse_ffn_forward(ffn, x) is None
    out = ffn(x)
    assert torch.equal(out, ffn.reference_forward(x))  # bit for bit: the training numerics
    out.square().sum().backward()
    grads = [p.grad.clone() for p in ffn.parameters()]
    ffn.zero_grad()
    with kernels.disabled():
        ffn(x).square().sum().backward()
    assert all(torch.equal(a, b.grad) for a, b in zip(grads, ffn.parameters()))
    ffn.eval()  # eval mode but a gradient wanted: still the reference
    assert kernels.sparse_ffn_forward(ffn, x) is None
    with torch.no_grad():  # no gradient in train mode (e.g. a validation pass that forgot eval()): reference
        ffn.train()
        assert kernels.sparse_ffn_forward(ffn, x) is None


def test_paths_the_kernel_does_not_cover_fall_back():
    x = torch.randn(1, 48)
    with torch.no_grad():
        assert kernels.sparse_ffn_forward(_ffn().to(torch.float16), x.half()) is None  # fp32 and bf16 only
        oracle = _ffn()
        oracle.sparsity.selection = "oracle"
        assert kernels.sparse_ffn_forward(oracle, x) is None
        gelu = _ffn()
        gelu.act_fn = torch.nn.GELU()
        assert kernels.sparse_ffn_forward(gelu, x) is None
        with kernels.disabled():
            assert kernels.sparse_ffn_forward(_ffn(), x) is None


def test_without_the_extension_the_reference_runs_and_is_correct(monkeypatch):
    monkeypatch.setattr(build, "_library", None)
    monkeypatch.setattr(build, "_failure", "simulated: no compiler")
    assert not kernels.available() and kernels.why_unavailable() == "simulated: no compiler"
    ffn = _ffn()
    x = torch.randn(1, 48)
    with torch.no_grad():
        assert kernels.sparse_ffn_forward(ffn, x) is None
        torch.testing.assert_close(ffn(x), expected(ffn, x), rtol=1e-5, atol=1e-6)


def test_a_failed_build_is_reported_and_the_model_still_runs(tmp_path):
    """A fresh process with a broken compiler and an empty cache: no extension, the reference path."""
    script = (
        "import torch, upcycle\n"
        "from upcycle import kernels\n"
        "from upcycle.modules import BankSparseFFN, BankSparsity\n"
        "ffn = BankSparseFFN(32, 64, BankSparsity(16, 4, 8, predictor='lowrank')).eval()\n"
        "with torch.no_grad(): out = ffn(torch.randn(1, 32))\n"
        "print(kernels.available(), kernels.why_unavailable(), tuple(out.shape))\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "UPCYCLE_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("False kernel build failed: /bin/false failed") and "(1, 32)" in run.stdout
    assert not list(tmp_path.glob("kernels/*/*.so"))  # nothing half-built left behind


def _tiny_sparse_model():
    """Two bank-sparse layers whose predictors (std 0.5) pick channels that matter to the output."""
    model = hub.tiny("llama", layers=2, hidden=64, ffn=128)
    sparse = UpcycleSparseForCausalLM.from_dense(model, BankSparsity(32, 8, 16, predictor="lowrank"), [0, 1]).eval()
    for ffn in (sparse.model.layers[i].mlp for i in range(2)):
        for p in ffn.predictor.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return sparse


@needs_kernel
def test_generate_with_the_kernel_matches_the_reference():
    sparse = _tiny_sparse_model()
    ids = torch.randint(0, sparse.config.vocab_size, (1, 12))
    with torch.no_grad():
        fast = sparse.generate(ids, max_new_tokens=16, do_sample=False)
        fast_logits = sparse(ids).logits
        with kernels.disabled():
            slow = sparse.generate(ids, max_new_tokens=16, do_sample=False)
            slow_logits = sparse(ids).logits
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast, slow)
    assert upcycle.kernels is kernels


@needs_kernel
def test_torch_compile_traces_the_kernel_as_one_operator_and_matches_the_reference():
    sparse = _tiny_sparse_model()
    ids = torch.randint(0, sparse.config.vocab_size, (1, 1))  # one row per FFN call: a decoding step
    graphs = []

    def record(gm, example_inputs):  # a backend that keeps the traced graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        sparse(ids)  # an eager call prepares the kernel plans that the traced graph reads
        compiled = torch.compile(sparse, backend=record, fullgraph=True)  # fullgraph: a break would raise
        got = compiled(ids).logits
        with kernels.disabled():
            want = sparse(ids).logits
    op = torch.ops.upcycle.bank_sparse_ffn
    assert sum(node.target in (op, op.default) for gm in graphs for node in gm.graph.nodes) == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_inductor_compiles_a_sparse_ffn_with_the_kernel_inside():
    ffn = _ffn(576, 1536, 64, 16)
    x = torch.randn(1, 1, 576)
    with torch.no_grad():
        ffn(x)
        got = torch.compile(ffn)(x)
    torch.testing.assert_close(got, expected(ffn, x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_the_compiled_operator_is_the_cpp_one_and_agrees_with_the_python_fallback():
    ffn = _ffn(96, 256, 32, 8)
    x = torch.randn(3, 96)
    with torch.no_grad():
        plan = kernels.plan_for(ffn)
        assert kernels.operator_kind() == "C++", kernels.why_no_operator()
        args = (plan.packed, plan.row_scales, *plan.predictor, 32, 8, kernels.GATE_CODES["hard"])
        got = torch.ops.upcycle.bank_sparse_ffn(x, *args)
        torch.testing.assert_close(got, expected(ffn, x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kernels._python_operator(x, *args), got, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="x must be"):
            torch.ops.upcycle.bank_sparse_ffn(x[:, :50], *args)


@needs_kernel
def test_without_the_cpp_operator_a_python_one_of_the_same_name_is_compiled_in():
    """A fresh process whose operator source is missing: the Python operator, same name, same result."""
    script = (
        "import torch\n"
        "from upcycle.kernels import build\n"
        "build.OPERATOR_SOURCE = build.OPERATOR_SOURCE.with_name('missing.cpp')\n"
        "from upcycle import kernels\n"
        "from upcycle.modules import BankSparseFFN, BankSparsity\n"
        "torch.manual_seed(0)\n"
        "ffn = BankSparseFFN(96, 256, BankSparsity(32, 8, 16, predictor='lowrank')).eval()\n"
        "for p in ffn.parameters(): torch.nn.init.normal_(p, std=0.3)\n"
        "x = torch.randn(1, 96)\n"
        "graphs = []\n"
        "def record(gm, inputs):\n"
        "    graphs.append(gm)\n"
        "    return gm.forward\n"
        "with torch.no_grad():\n"
        "    ffn(x)\n"
        "    got = torch.compile(ffn, backend=record, fullgraph=True)(x)\n"
        "    with kernels.disabled(): want = ffn(x)\n"
        "op = torch.ops.upcycle.bank_sparse_ffn\n"
        "calls = sum(n.target in (op, op.default) for g in graphs for n in g.graph.nodes)\n"
        "print(kernels.operator_kind(), calls, (got - want).abs().max().item() < 1e-4, kernels.why_no_operator())\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Python 1 True operator build failed"), run.stdout


def test_packed_copies_are_exact_contiguous_and_huge_page_aligned():
    from upcycle.kernels.memory import HUGE_PAGE, _libc_madvise, huge_page_copy

    big = torch.randn(1536, 3, 576)  # 10.6 MB: a smollm2 layer's pack
    copy = huge_page_copy(big)
    assert torch.equal(copy, big) and copy.is_contiguous() and copy.data_ptr() != big.data_ptr()
    if _libc_madvise():
        assert copy.data_ptr() % HUGE_PAGE == 0
    small = torch.arange(6.0).reshape(2, 3).t()  # not contiguous, under a page: an ordinary copy
    copy = huge_page_copy(small)
    assert torch.equal(copy, small) and copy.is_contiguous() and copy.data_ptr() != small.data_ptr()


def test_byte_limits_match_a_hand_count():
    from upcycle.eval.speed import ffn_limit, weight_bytes

    # 576 x 1536, 16 of 64, rank 64: 3*576*1536 = 2654208 weights dense; kept 663552; predictor
    # 576*64 + 64*1536 + 1536 = 136704
    assert ffn_limit(576, 1536, BankSparsity(64, 16, 64, predictor="lowrank")) == pytest.approx(
        2654208 / (663552 + 136704)
    )
    model = hub.tiny("llama", layers=2, hidden=64, ffn=128)  # untied head: vocab x 64
    sparse = UpcycleSparseForCausalLM.from_dense(
        model, BankSparsity(32, 8, 16, predictor="lowrank"), [0]
    )  # layer 1 stays dense
    parts = weight_bytes(sparse)
    assert parts["ffn"] == 4 * (3 * 64 * 128 / 4 + 3 * 64 * 128)  # layer 0: a quarter; layer 1: all
    assert parts["predictor"] == 4 * (64 * 16 + 16 * 128 + 128)
    assert parts["lm_head"] == 4 * model.config.vocab_size * 64
    attention = sum(p.numel() for n, p in sparse.named_parameters() if ".self_attn." in n or "norm" in n)
    assert parts["attention_and_norms"] == 4 * attention


def test_the_no_ffn_ceiling_model_is_the_model_with_every_ffn_output_zeroed():
    from upcycle.eval.speed import without_ffns

    model = hub.tiny("llama", layers=2, hidden=64, ffn=128).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        got = without_ffns(model)(ids).logits
        handles = [
            layer.mlp.register_forward_hook(lambda m, args, out: torch.zeros_like(out)) for layer in model.model.layers
        ]
        want = model(ids).logits
        for h in handles:
            h.remove()
        assert not torch.allclose(model(ids).logits, want)  # the original keeps its FFNs
    torch.testing.assert_close(got, want)


def test_bench_cli_on_a_sparse_folder(tmp_path, capsys):
    from upcycle.cli import main

    model = hub.tiny("llama", layers=2, hidden=64, ffn=128)
    sparse = UpcycleSparseForCausalLM.from_dense(model, BankSparsity(32, 8, 16, predictor="lowrank"), [0, 1])
    hub.save(sparse, hub.byte_tokenizer(), tmp_path / "sparse")
    out = tmp_path / "bench"
    argv = [
        "bench",
        str(tmp_path / "sparse"),
        "--shapes",
        "model",
        "--batches",
        "1,4",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = __import__("json").loads((out / "bench.json").read_text())
    assert set(result["ffn"]) == {"model_b1", "model_b4"} and result["ffn"]["model_b1"]["shape"] == [64, 128]
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in result["ffn"].values())
    decode = result["decode"]
    assert decode["new_tokens"] == 4 and decode["dense_tokens_per_s"] > 0 and decode["sparse_tokens_per_s"] > 0
    assert decode["ceiling"] == pytest.approx(decode["no_ffn_tokens_per_s"] / decode["dense_tokens_per_s"])
    assert decode["bytes_per_token"]["sparse"]["ffn"] == 4 * 2 * 3 * 64 * 128 / 4
    assert "Greedy decoding" in printed and (out / "bench.md").exists()
    assert main(["bench", str(tmp_path / "sparse"), "--batches", "one"]) == 2
    assert main(["bench", str(tmp_path / "sparse"), "--shapes", "gpt5"]) == 2
    assert "error" in capsys.readouterr().err


@needs_kernel
def test_bench_through_the_lean_decoder_at_bf16(tmp_path):
    """Both models through the lean decoder, converted alike; the tokens/s are real, the tokens are the
    ones the dense and sparse models themselves produce (an eager greedy loop on bf16 copies)."""
    from upcycle.cli import main
    from upcycle.infer.decode import GreedyDecoder
    from upcycle.infer.precision import to_precision

    model = hub.tiny("llama", layers=2, hidden=64, ffn=128)
    sparse = UpcycleSparseForCausalLM.from_dense(model, BankSparsity(32, 8, 16, predictor="shadow", group=32), [0, 1])
    hub.save(sparse, hub.byte_tokenizer(), tmp_path / "sparse")
    out = tmp_path / "bench"
    argv = [
        "bench",
        str(tmp_path / "sparse"),
        "--shapes",
        "model",
        "--batches",
        "1",
        "--new-tokens",
        "6",
        "--repeats",
        "1",
        "--lean",
        "--precision",
        "bf16",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    decode = __import__("json").loads((out / "bench.json").read_text())["decode"]
    assert decode["decoder"] == "lean" and decode["compiled"] and decode["precision"] == "bf16"
    assert decode["dense_tokens_per_s"] > 0 and decode["sparse_tokens_per_s"] > 0 and decode["no_ffn_tokens_per_s"] > 0
    tok = hub.byte_tokenizer()
    ids = tok("The king said to the queen:", return_tensors="pt").input_ids
    loaded, _ = hub.load(str(tmp_path / "sparse"))
    eager = GreedyDecoder(to_precision(loaded, "bf16"), ids.shape[1] + 8, compiled=False).generate(ids, 6)
    assert decode["sample"]["sparse"] == tok.decode(eager)


@needs_kernel
def test_a_model_with_a_plan_deep_copies_and_the_copy_builds_its_own():
    import copy

    ffn = _ffn()
    x = torch.randn(1, 48)
    with torch.no_grad():
        ffn(x)
        assert ffn.__dict__.get("_kernel_plan") is not None
        twin = copy.deepcopy(ffn)
        twin.down_proj.weight.mul_(3)  # its own weights: its own plan
        torch.testing.assert_close(twin(x), expected(twin, x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ffn(x), expected(ffn, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("predictor", ["lowrank", "shadow"])
def test_both_sides_of_a_decode_comparison_from_a_dense_or_a_sparse_model(predictor):
    from upcycle.commands.bench import sparse_and_dense

    model, tok = hub.load("tiny-llama")
    sparsity = BankSparsity(32, 8, 4, predictor=predictor, group=16)
    dense, sparse = sparse_and_dense(model, tok, sparsity, warmup_steps=2)
    assert dense is model and all(isinstance(sparse.model.layers[i].mlp, BankSparseFFN) for i in range(2))
    assert sparse.model.layers[0].mlp.sparsity.predictor == predictor
    back, again = sparse_and_dense(sparse, tok, sparsity)
    assert again is sparse and back.config.model_type == "llama"
