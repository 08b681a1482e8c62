"""CWE generator and scorer, the long-context probe, localisation and single-layer repair."""

import collections

import pytest
import torch
import torch.nn.functional as F

from upcycle import hub
from upcycle.errors import ConfigError
from upcycle.eval.cwe import (
    EXAMPLE,
    CWEConfig,
    chance,
    cwe_sample,
    cwe_score,
    logprobs,
    long_context_probe,
    position_buckets,
)
from upcycle.eval.localise import localise, restored, sparse_ffns
from upcycle.modules import BankSparsity, UpcycleSparseForCausalLM
from upcycle.train.repair import repair_layer


@pytest.fixture(scope="module")
def tok():
    return hub.byte_tokenizer()


def test_cwe_generator_is_deterministic_and_fits_the_length(tok):
    a, b = cwe_sample(tok, 600, seed=3), cwe_sample(tok, 600, seed=3)
    assert a.prompt == b.prompt and a.common == b.common
    assert cwe_sample(tok, 600, seed=4).prompt != a.prompt
    assert a.length == len(tok(a.prompt).input_ids) <= 600
    assert a.length > 500  # the list fills the length (a few tokens of slack)
    longer = cwe_sample(tok, 1200, seed=3)
    assert len(longer.entries) > 1.8 * len(a.entries)


def test_cwe_common_words_are_the_most_frequent_entries(tok):
    config = CWEConfig(n_common=3, common_share=0.3)
    sample = cwe_sample(tok, 2000, seed=0, config=config)
    counts = collections.Counter(sample.entries)
    top = [w for w, _ in counts.most_common(3)]
    assert sorted(top) == sorted(sample.common)
    rest = max(c for w, c in counts.items() if w not in sample.common)
    assert min(counts[w] for w in sample.common) > 2 * rest
    assert "What are the 3 most common words" in sample.prompt
    for i, word in enumerate(sample.entries[:5], 1):
        assert f"\n{i}. {word}\n" in sample.prompt.split("\n\n", 1)[1]  # numbered, after the worked example


def test_cwe_scorer_on_hand_written_answers():
    common = ["apple", "river", "stone"]
    words = {"apple", "river", "stone", "lemon", "cloud"}  # the list's words
    assert cwe_score(" apple, river and stone.", common, words) == 1.0
    assert cwe_score("Apple, APPLE, apple", common, words) == pytest.approx(1 / 3)  # case-insensitive, once
    assert cwe_score("pineapple, riverside, stones", common, words) == 0.0  # whole words only
    assert cwe_score("1. stone 2. lemon", common, words) == pytest.approx(1 / 3)
    # only the first three list words named count: naming everything earns nothing
    assert cwe_score("lemon, cloud, apple, river, stone", common, words) == pytest.approx(1 / 3)
    assert cwe_score("The most common words are the apple and the river", common, words) == pytest.approx(2 / 3)
    assert cwe_score("", common, words) == 0.0


def test_cwe_prompt_goes_through_a_chat_template_where_the_tokenizer_has_one(tok):
    chat_tok = hub.byte_tokenizer()
    chat_tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    sample = cwe_sample(chat_tok, 600, seed=0, config=CWEConfig(n_common=1))
    assert sample.prompt.startswith("<u>Below is a numbered list") and sample.prompt.endswith(
        "What is the most common word in the above list?</u><a>"
    )
    assert "Answer:" not in sample.prompt  # no worked example in the chat form
    assert cwe_sample(tok, 600, seed=0, config=CWEConfig(n_common=1)).prompt.startswith(EXAMPLE)
    assert not cwe_sample(chat_tok, 600, seed=0, config=CWEConfig(n_common=1, chat=False)).prompt.startswith("<u>")


def test_chance_is_the_score_of_random_entries(tok):
    sample = cwe_sample(tok, 800, seed=1, config=CWEConfig(n_common=1, common_share=0.5))
    # one common word holding half the entries: one random entry finds it half the time
    assert chance(sample, guesses=4000) == pytest.approx(0.5, abs=0.05)


def test_position_buckets_and_probe_against_hand_computation():
    assert position_buckets(2048, 256) == [(0, 256), (256, 512), (512, 1024), (1024, 2048)]
    assert position_buckets(700, 256) == [(0, 256), (256, 512), (512, 700)]
    model = hub.tiny("llama", layers=2, hidden=64, ffn=128)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    ref = logprobs(model, ids)
    probe = long_context_probe(model, ref, ids, [(0, 16), (16, 40)])
    assert probe["kl"] == pytest.approx([0.0, 0.0], abs=1e-6)  # a model against itself
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    loss = loss.reshape(2, 39).mean(0)
    assert probe["loss"][0] == pytest.approx(loss[:16].mean().item(), rel=1e-5)
    assert probe["loss"][1] == pytest.approx(loss[16:39].mean().item(), rel=1e-5)


def _sparse_with_a_broken_layer(broken=2, layers=4):
    torch.manual_seed(0)
    dense = hub.tiny("llama", layers=layers, hidden=64, ffn=128)
    sparse = UpcycleSparseForCausalLM.from_dense(
        hub.tiny("llama", layers=layers, hidden=64, ffn=128),
        BankSparsity(32, 8, 64, predictor="lowrank"),
        list(range(layers)),
    ).eval()
    for i, ffn in sparse_ffns(sparse).items():
        ffn.predictor.init_svd(ffn.gate_proj.weight)  # a fair predictor: the gate's own ranking
        ffn.keep = 24  # mild sparsity everywhere ...
        if i == broken:  # ... but one layer keeps 8 of 32, the channels its gate ranks lowest
            ffn.keep = 8
            with torch.no_grad():
                ffn.predictor.up.weight.neg_()
    return dense, sparse


def test_localisation_names_the_broken_layer():
    dense, sparse = _sparse_with_a_broken_layer(broken=2)
    ids = torch.randint(0, dense.config.vocab_size, (2, 96))
    loc = localise(sparse, logprobs(dense, ids), ids, first_bucket=16, long_from=32, progress=False)
    assert loc["ranking"][0] == 2
    assert loc["layers"] == [0, 1, 2, 3] and len(loc["closed"]) == 4 and len(loc["closed"][0]) == len(loc["buckets"])
    scores = dict(zip(loc["layers"], loc["score"]))
    assert scores[2] > max(scores[i] for i in (0, 1, 3))
    # restoring every layer closes the whole gap: the model is then the dense one
    with restored(sparse, [0, 1, 2, 3]), torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert [f.keep for f in sparse_ffns(sparse).values()] == [24, 24, 8, 24]  # and the context put them back


@pytest.mark.parametrize("objective,train_ffn", [("local", True), ("local", False), ("end_to_end", False)])
def test_repair_trains_only_the_chosen_layer_and_lowers_its_gap(objective, train_ffn):
    dense, sparse = _sparse_with_a_broken_layer(broken=1, layers=3)
    blocks = torch.randint(0, dense.config.vocab_size, (4, 64))
    ids = blocks[:2]
    ref = logprobs(dense, ids)
    before = {n: p.clone() for n, p in sparse.named_parameters()}
    kl_before = sum(long_context_probe(sparse, ref, ids, [(0, 64)])["kl"])
    losses = repair_layer(
        sparse, dense, 1, blocks, steps=30, lr=3e-2, train_ffn=train_ffn, objective=objective, progress=False
    )
    kl_after = sum(long_context_probe(sparse, ref, ids, [(0, 64)])["kl"])
    changed = {n for n, p in sparse.named_parameters() if not torch.equal(p, before[n])}
    layer = "model.layers.1.mlp."
    want = {layer + "predictor.down.weight", layer + "predictor.up.weight", layer + "predictor.up.bias"}
    if train_ffn:
        want |= {layer + "gate_proj.weight", layer + "up_proj.weight", layer + "down_proj.weight"}
    assert changed == want
    assert kl_after < kl_before and len(losses) == 30
    assert all(p.requires_grad for p in sparse.parameters())  # flags restored
    with pytest.raises(ConfigError, match="layer 7"):
        repair_layer(sparse, dense, 7, blocks, steps=1, progress=False)
    with pytest.raises(ConfigError, match="objective"):
        repair_layer(sparse, dense, 1, blocks, steps=1, objective="global", progress=False)
    with pytest.raises(ConfigError, match="no bank-sparse"):
        sparse_ffns(dense)


def test_repair_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from upcycle.cli import main

    dense = hub.tiny("llama", layers=2, hidden=64, ffn=128)
    hub.save(dense, hub.byte_tokenizer(), tmp_path / "dense")
    sparse = UpcycleSparseForCausalLM.from_dense(
        hub.tiny("llama", layers=2, hidden=64, ffn=128), BankSparsity(32, 8, 16, predictor="lowrank"), [1]
    )
    hub.save(sparse, hub.byte_tokenizer(), tmp_path / "sparse")
    out = tmp_path / "out"
    capsys.readouterr()  # the saves' progress bars
    cases = [
        (["repair", str(tmp_path / "sparse")], "missing REFERENCE"),
        (
            ["repair", str(tmp_path / "dense"), "--reference", str(tmp_path / "dense"), "--out", str(out)],
            "no bank-sparse",
        ),
        (["repair", str(tmp_path / "sparse"), "--reference", "x", "--lengths", "a,b"], "--lengths"),
        (["repair", str(tmp_path / "sparse"), "--reference", "x", "--layer", "first"], "layer"),
        (
            ["repair", str(tmp_path / "sparse"), "--reference", str(tmp_path / "dense"), "--layer", "0"],
            "not a bank-sparse layer (those are [1])",
        ),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_ruler_cwe_lists_hold_ten_words_thirty_times_and_every_other_word_three_times():
    from upcycle.eval.cwe import RULER

    tok = hub.byte_tokenizer()
    sample = cwe_sample(tok, 6000, seed=0, config=RULER)
    counts = collections.Counter(sample.entries)
    assert len(sample.common) == 10 and all(counts[w] == 30 for w in sample.common)
    assert {n for w, n in counts.items() if w not in sample.common} == {3}
    assert sample.length <= 6000 and len(sample.entries) > 300
    assert sample.score(", ".join(sample.common)) == 1.0 and sample.score(", ".join(sample.common[:4])) == 0.4
    with pytest.raises(ValueError, match="too short"):
        cwe_sample(tok, 1000, seed=0, config=RULER)  # 300 entries of common words alone do not fit
