"""The one-call decoding step (kernels/decode_step.h through upcycle.infer.native) against the model's own
forward: its logits at every step, and the greedy tokens `generate` gives."""

from __future__ import annotations

import copy

import pytest
import torch

from upcycle import hub, kernels
from upcycle.eval.speed import without_ffns
from upcycle.infer.decode import GreedyDecoder
from upcycle.infer.native import NativeStep, Unsupported
from upcycle.infer.precision import to_precision
from upcycle.modules import BankSparsity, UpcycleSparseForCausalLM

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernel unavailable: {kernels.why_unavailable()}")


def _models(family: str, predictor: str = "shadow"):
    """A tiny dense model of `family` and its bank-sparse twin (both layers sparse)."""
    torch.manual_seed(0)
    dense = hub.tiny(family, layers=2, hidden=64, ffn=128)
    extra = {"group": 32} if predictor == "shadow" else {}
    sparsity = BankSparsity(32, 8, 16, predictor=predictor, **extra)
    sparse = UpcycleSparseForCausalLM.from_dense(copy.deepcopy(dense), sparsity, [0, 1]).eval()
    return dense.eval(), sparse


def _steps(model, decoder, prompt: int = 6, steps: int = 8):
    """(the step's logits, the model's forward's logits over the whole sequence so far) at each step after
    a prompt: the forward recomputes every position without the cache, an independent computation."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    out = []
    with torch.no_grad():
        decoder.cache.reset()
        seq = torch.cat([ids, decoder._forward_step(ids, torch.arange(prompt))], dim=1)
        decoder.native.bind(decoder.cache)
        for position in range(prompt, prompt + steps):
            token = decoder.native(int(seq[0, -1]), position)
            got = decoder.native.logits.clone()
            assert token == int(got.argmax())
            out.append((got, seq.clone()))
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("precision", ["fp32", "int4", "int4a"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_each_steps_logits_equal_the_models_forward(family, precision):
    """fp32 activations (int4's too): the step's logits are the forward's to fp32 rounding, dense and
    sparse; qwen2 has biased q, k and v, qwen3 per-head q and k norms."""
    for model in _models(family):
        to_precision(model, precision)
        decoder = GreedyDecoder(model, max_len=24)
        assert decoder.native is not None, decoder.native_refusal
        for got, seq in _steps(model, decoder):
            with torch.no_grad():
                want = model(seq).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bf16_activation_steps_are_as_close_to_fp32_as_the_models_own_forward(family, precision):
    """bf16 activations: the step rounds where the model's tensors are rounded, but sums inside an
    operation in fp32 where torch's bf16 kernels need not, so the two differ by bf16 noise. Against the
    same weights with fp32 activations (an independent reference), the step's error is at most twice the
    model's own bf16 forward's, plus 0.02 (measured: the two errors 0.016-0.039 and 0.016-0.034)."""
    model = _models(family)[0]
    to_precision(model, precision)
    reference = copy.deepcopy(model).float()  # the int8 codes stay; embedding, norms and scales fp32
    decoder = GreedyDecoder(model, max_len=24)
    assert decoder.native is not None, decoder.native_refusal
    for got, seq in _steps(model, decoder):
        with torch.no_grad():
            own, want = model(seq).logits[0, -1].float(), reference(seq).logits[0, -1]
        assert (got - want).abs().max() <= 2 * (own - want).abs().max() + 0.02


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4", "int4a"])
def test_the_native_decoder_generates_what_generate_does(precision):
    for model in _models("llama", "lowrank"):
        to_precision(model, precision)
        ids = torch.randint(0, model.config.vocab_size, (1, 7))
        decoder = GreedyDecoder(model, max_len=32)
        assert decoder.native is not None, decoder.native_refusal
        with torch.no_grad():
            want = model.generate(
                ids, max_new_tokens=12, do_sample=False, cache_implementation="static", pad_token_id=0
            )
        want = want[0, 7:]
        got = decoder.generate(ids, 12)
        assert len(want) >= 3 and torch.equal(got[: len(want)], want), (precision, type(model).__name__)
        assert torch.equal(decoder.generate(ids, 12), got)  # a second run over the reset cache


def test_models_the_step_does_not_read_fall_back_to_the_compiled_step():
    moe = hub.tiny("mixtral", layers=2, hidden=64, ffn=128).eval()
    with pytest.raises(Unsupported, match="Llama-shaped"):
        NativeStep(moe, 16)
    decoder = GreedyDecoder(moe, max_len=16)
    assert decoder.native is None and "Llama-shaped" in decoder.native_refusal
    plain = hub.tiny("llama", layers=2, hidden=64, ffn=128).eval()  # not converted: nn.Linear layers
    with pytest.raises(Unsupported, match="row dots|stacked"):
        NativeStep(plain, 16)
    with kernels.disabled():
        assert GreedyDecoder(to_precision(plain, "fp32"), max_len=16).native is None


def test_a_model_without_ffns_steps_natively_and_equals_its_forward():
    """eval.speed.without_ffns (the FFN-free ceiling of the decode benchmarks) runs through the C step too,
    so that a model and its ceiling are timed the same way."""
    model = without_ffns(to_precision(_models("llama")[0], "fp32"))
    decoder = GreedyDecoder(model, max_len=24)
    assert decoder.native is not None, decoder.native_refusal
    for got, seq in _steps(model, decoder):
        with torch.no_grad():
            torch.testing.assert_close(got, model(seq).logits[0, -1], rtol=1e-4, atol=1e-4)
