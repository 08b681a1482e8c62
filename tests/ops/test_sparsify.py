"""sparsify: the bank-sparse FFN against hand computations and the dense Hugging Face model."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import upcycle
import upcycle.train
from conftest import logits, tokens_for
from upcycle import hub, sparsify
from upcycle.arch import adapter_for
from upcycle.errors import ConfigError, UnsupportedArchitecture
from upcycle.eval.selection import predictor_recall, selection_stats
from upcycle.modules import BankSparseFFN, BankSparsity, UpcycleSparseForCausalLM, bank_topk_mask
from upcycle.ops import narrow_ffn
from upcycle.ops.sparsify import coactivation_order
from upcycle.train.sparsify import AnnealKeep


def _ffn(gate="hard", bank=16, keep=4, rank=8, hidden=32, width=64, selection="predictor"):
    torch.manual_seed(1)
    ffn = BankSparseFFN(hidden, width, BankSparsity(bank, keep, rank, gate, selection, predictor="lowrank"))
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return ffn


def test_bank_topk_keeps_exactly_k_per_bank_even_with_ties():
    scores = torch.randn(5, 7, 96)
    scores[0, 0] = 1.0  # every score tied
    for bank, keep in [(32, 8), (16, 1), (96, 96), (8, 3)]:
        mask = bank_topk_mask(scores, bank, keep)
        per_bank = mask.reshape(5, 7, -1, bank).sum(-1)
        assert torch.equal(per_bank, torch.full_like(per_bank, keep))
        # the kept ones are the largest of their bank
        banked, kept = scores.reshape(5, 7, -1, bank), mask.reshape(5, 7, -1, bank).bool()
        low_kept = banked.masked_fill(~kept, float("inf")).amin(-1)
        high_dropped = banked.masked_fill(kept, float("-inf")).amax(-1)
        assert (low_kept >= high_dropped).all()


@pytest.mark.parametrize("gate", ["hard", "sigmoid", "softmax"])
def test_forward_matches_a_hand_computation_and_keeps_k_per_bank(gate):
    ffn = _ffn(gate)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        out = ffn(x)
        h = F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)
        z = x @ ffn.predictor.down.weight.T @ ffn.predictor.up.weight.T + ffn.predictor.up.bias
        expected = torch.zeros_like(h)
        kept_counts = []
        for b in range(3):
            for t in range(5):
                for start in range(0, 64, 16):
                    bank_z = z[b, t, start : start + 16]
                    top = sorted(range(16), key=lambda j: -float(bank_z[j]))[:4]
                    kept_counts.append(len(top))
                    for j in top:
                        g = {
                            "hard": 1.0,
                            "sigmoid": torch.sigmoid(bank_z[j]),
                            "softmax": 4 * torch.exp(bank_z[j]) / torch.exp(bank_z[top]).sum(),
                        }[gate]
                        expected[b, t, start + j] = h[b, t, start + j] * g
        gate_values = ffn.gate_values(x, h)
    torch.testing.assert_close(out, expected @ ffn.down_proj.weight.T, rtol=1e-5, atol=1e-6)
    nonzero = (gate_values != 0).reshape(3, 5, 4, 16).sum(-1)
    assert torch.equal(nonzero, torch.full_like(nonzero, 4))


@pytest.mark.parametrize("gate", ["hard", "sigmoid", "softmax"])
def test_gradients_reach_the_predictor_in_every_gate_mode(gate):
    ffn = _ffn(gate)
    ffn(torch.randn(2, 6, 32)).pow(2).sum().backward()
    for name, p in ffn.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hard_gate_straight_through_gradient_is_the_activation_times_upstream():
    ffn = _ffn("hard")
    x = torch.randn(4, 32)
    z = ffn.predictor(x).detach().requires_grad_()
    h = ffn.activation(x).detach()
    mask = bank_topk_mask(z.detach(), 16, 4)
    (h * (mask + (z - z.detach()))).sum().backward()
    torch.testing.assert_close(z.grad, h)


def test_keep_equal_to_bank_is_the_dense_model_exactly():
    dense = hub.tiny("llama")
    sparse, _ = sparsify(dense, None, bank=32, keep=32, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0)
    ids = tokens_for(dense)
    assert torch.equal(logits(sparse, ids), logits(dense, ids))
    assert adapter_for(sparse).ffn_kind(0) == "bank_sparse"


def test_sparsify_leaves_the_input_model_untouched_and_changes_outputs_when_sparse():
    dense = hub.tiny("qwen2")
    before = copy.deepcopy(dense.state_dict())
    sparse, _ = sparsify(dense, None, bank=32, keep=8, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0)
    ids = tokens_for(dense)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert adapter_for(dense).ffn_kind(0) == "dense"
    assert not torch.allclose(logits(sparse, ids), logits(dense, ids))


def test_selected_layers_only():
    dense = hub.tiny("llama", layers=3)
    sparse, report = sparsify(
        dense, None, bank=32, keep=8, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0, layers=[1]
    )
    kinds = [adapter_for(sparse).ffn_kind(i) for i in range(3)]
    assert kinds == ["dense", "bank_sparse", "dense"] and report.layers == [1]


def test_channel_permutation_preserves_logits(text_folder, tmp_cache):
    dense = hub.tiny("llama")
    tok = hub.byte_tokenizer()
    sparse, _ = sparsify(
        dense,
        tok,
        bank=32,
        keep=32,
        rank=4,
        predictor="lowrank",
        warmup_steps=0,
        convert_steps=0,
        permute=True,
        calibration=str(text_folder),
        calibration_tokens=2048,
        seq_len=64,
    )
    gate_before = adapter_for(dense).ffn_weights(0).gate
    gate_after = adapter_for(sparse).ffn_weights(0).gate
    assert not torch.equal(gate_before, gate_after)  # channels did move
    torch.testing.assert_close(
        logits(sparse, tokens_for(dense)), logits(dense, tokens_for(dense)), rtol=1e-5, atol=1e-5
    )


def test_coactivation_order_groups_channels_that_fire_together():
    # channels 0..7 fire on even tokens, 8..15 on odd ones, interleaved in the input order
    h = torch.zeros(200, 16)
    group_a, group_b = torch.arange(0, 16, 2), torch.arange(1, 16, 2)
    h[0::2, group_a] = 1 + torch.rand(100, 8)
    h[1::2, group_b] = 1 + torch.rand(100, 8)
    order = coactivation_order(h, 0.5)
    first_half = set(order[:8].tolist())
    assert first_half in (set(group_a.tolist()), set(group_b.tolist()))


def test_wide_layers_order_channels_as_the_exact_eigendecomposition_does(monkeypatch):
    # above EIGH_WIDTH the Fiedler vector comes from LOBPCG: the same order as eigh's (up to its sign)
    from upcycle.ops import sparsify as ops

    generator = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 8, (300,), generator=generator)
    gains = torch.rand(400, 8, generator=generator) * 3
    h = torch.randn(400, 300, generator=generator) * (0.3 + gains[:, groups])
    exact = coactivation_order(h, 0.25)
    monkeypatch.setattr(ops, "EIGH_WIDTH", 100)
    iterative = coactivation_order(h, 0.25)
    assert torch.equal(iterative, exact) or torch.equal(iterative, exact.flip(0))


def test_padding_makes_a_width_fit_the_bank_without_changing_the_function():
    dense = hub.tiny("llama", ffn=120)
    with pytest.raises(ConfigError, match="bank=64"):
        sparsify(dense, None, bank=64, keep=16, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0)
    sparse, report = sparsify(
        dense, None, bank=64, keep=64, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0, pad=True
    )
    assert report.width == 128
    torch.testing.assert_close(logits(sparse, tokens_for(dense)), logits(dense, tokens_for(dense)))


def test_save_load_gives_identical_logits_through_upcycle_and_transformers(tmp_path):
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    sparse, _ = sparsify(
        dense,
        None,
        bank=32,
        keep=8,
        rank=4,
        predictor="lowrank",
        gate="softmax",
        warmup_steps=0,
        convert_steps=0,
        init="random",
    )
    with torch.no_grad():
        sparse.model.layers[0].mlp.threshold.fill_(0.5)  # buffers travel too
    hub.save(sparse, None, tmp_path / "m")
    ids = tokens_for(sparse)
    expected = logits(sparse, ids)
    by_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(by_transformers, UpcycleSparseForCausalLM)
    assert torch.equal(logits(by_transformers, ids), expected)
    assert by_transformers.lm_head.weight is by_transformers.model.embed_tokens.weight  # still tied
    assert float(by_transformers.model.layers[0].mlp.threshold) == 0.5


def test_save_load_through_upcycle_hub(tmp_path, tmp_cache):
    dense = hub.tiny("mistral")
    sparse, _ = sparsify(
        dense, None, bank=64, keep=16, rank=8, predictor="lowrank", gate="sigmoid", warmup_steps=0, convert_steps=0
    )
    hub.save(sparse, hub.byte_tokenizer(), tmp_path / "m")
    reloaded, tok = upcycle.load(tmp_path / "m")
    ids = tokens_for(dense)
    assert torch.equal(logits(reloaded, ids), logits(sparse, ids))
    assert reloaded.config.sparsity["keep"] == 16 and reloaded.config.base_model_type == "mistral"


def test_densify_gives_the_stock_family_with_every_channel():
    dense = hub.tiny("qwen3")
    sparse, _ = sparsify(dense, None, bank=32, keep=8, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0)
    back = upcycle.densify(sparse)
    assert type(back) is type(dense)
    assert torch.equal(logits(back, tokens_for(dense)), logits(dense, tokens_for(dense)))
    with pytest.raises(ConfigError, match="densify needs a bank-sparse model"):
        upcycle.densify(dense)


def test_generation_works_on_the_sparse_type():
    sparse, _ = sparsify(
        hub.tiny("llama"), None, bank=32, keep=8, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0
    )
    out = sparse.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
    # greedy decoding with the KV cache agrees with re-running the full sequence
    full = logits(sparse, out[:, :-1])[0, -1].argmax()
    assert int(full) == int(out[0, -1])


def test_warmup_raises_recall_of_the_oracle(text_folder, tmp_cache):
    dense = hub.tiny("llama", ffn=256)
    tok = hub.byte_tokenizer()
    common = dict(
        bank=64,
        keep=16,
        rank=16,
        predictor="lowrank",
        calibration=str(text_folder),
        calibration_tokens=4096,
        seq_len=64,
        convert_steps=0,
    )
    _, cold = sparsify(dense, tok, warmup_steps=1, warmup_lr=1e-9, **common)
    _, warm = sparsify(dense, tok, warmup_steps=200, **common)
    assert len(warm.recall) == 2
    assert warm.recall_mean > cold.recall_mean + 0.1
    assert 0.25 <= cold.recall_mean < 0.9  # the SVD start is no oracle


def test_recall_is_measured_against_an_independent_top_k():
    ffn = _ffn("hard")
    x = torch.randn(50, 32)
    with torch.no_grad():
        h = (F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)).abs()
        z = ffn.predictor(x)
    hit = total = 0
    for t in range(50):
        for start in range(0, 64, 16):
            oracle = set((h[t, start : start + 16].argsort(descending=True)[:4]).tolist())
            pred = set((z[t, start : start + 16].argsort(descending=True)[:4]).tolist())
            hit, total = hit + len(oracle & pred), total + 4
    assert predictor_recall(ffn, x) == pytest.approx(hit / total)


def test_oracle_and_threshold_baselines(text_folder, tmp_cache):
    dense = hub.tiny("llama", ffn=256)
    tok = hub.byte_tokenizer()
    ids = tokens_for(dense, n=4, length=32)
    oracle, _ = sparsify(
        dense, None, bank=64, keep=16, rank=4, predictor="lowrank", selection="oracle", warmup_steps=0, convert_steps=0
    )
    stats = selection_stats(oracle, ids)
    assert stats["recall"] == [1.0, 1.0] and stats["density"] == [0.25, 0.25]
    teal, report = sparsify(
        dense,
        tok,
        bank=64,
        keep=16,
        rank=4,
        predictor="lowrank",
        selection="threshold",
        calibration=str(text_folder),
        calibration_tokens=4096,
        seq_len=64,
        convert_steps=0,
    )
    assert all(abs(d - 0.25) < 0.02 for d in report.density)  # calibrated to 75% sparsity
    # the threshold module keeps exactly the activations above its threshold
    ffn = adapter_for(teal).ffn(0)
    x = torch.randn(10, 64)
    with torch.no_grad():
        h = ffn.activation(x)
        expected = (h * (h.abs() > ffn.threshold)) @ ffn.down_proj.weight.T
        torch.testing.assert_close(ffn(x), expected)


def test_narrow_keeps_the_most_important_channels():
    dense = hub.tiny("llama", ffn=128)
    calib = tokens_for(dense, n=4, length=32)
    same, _ = narrow_ffn(dense, calib, fraction=1.0)
    torch.testing.assert_close(logits(same, tokens_for(dense)), logits(dense, tokens_for(dense)))
    quarter, report = narrow_ffn(dense, calib, fraction=0.25)
    assert report.width_after == 32 and quarter.config.intermediate_size == 32
    rebuilt = adapter_for(quarter).rebuild()  # the config describes the weights
    assert torch.equal(logits(rebuilt, tokens_for(dense)), logits(quarter, tokens_for(dense)))
    assert all(0.25 < s <= 1 for s in report.kept_importance)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep=80), "keep=80"),
        (dict(keep=0), "keep=0"),
        (dict(bank=48), "bank=48"),
        (dict(rank=0), "rank=0"),
        (dict(rank=-3), "rank=-3"),
        (dict(gate="relu"), "gate='relu'"),
        (dict(init="zeros"), "init='zeros'"),
    ],
)
def test_bad_configs_give_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        sparsify(
            hub.tiny("llama"),
            None,
            **{
                "bank": 64,
                "keep": 16,
                "rank": 4,
                "predictor": "lowrank",
                "warmup_steps": 0,
                "convert_steps": 0,
                **kwargs,
            },
        )
    assert "\n" not in str(err.value)


def test_models_without_a_dense_swiglu_ffn_are_refused():
    with pytest.raises(ConfigError, match="layer 0's FFN is moe"):
        sparsify(hub.tiny("qwen2_moe"), None, warmup_steps=0)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedArchitecture):
        sparsify(gpt2, None, warmup_steps=0)


def test_calibration_needs_a_tokenizer():
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        sparsify(hub.tiny("llama"), None, bank=32, keep=8, rank=4, predictor="lowrank", warmup_steps=10)


def test_anneal_keep_goes_from_the_bank_to_the_target():
    sparse, _ = sparsify(
        hub.tiny("llama"), None, bank=32, keep=8, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0
    )

    class FakeTrainer:  # what the callback reads from the trainer
        model = sparse
        config = type("C", (), {"stages": [None]})()
        progress = type("P", (), {"stage_index": 0, "stage_step": 0})()

        @staticmethod
        def stage_steps(stage):
            return 10

    cb, trainer, seen = AnnealKeep(fraction=0.5), FakeTrainer(), []
    cb.on_stage_start(trainer)
    for step in range(1, 11):
        seen.append(adapter_for(sparse).ffn(0).keep)
        trainer.progress.stage_step = step
        cb.on_step_end(trainer, {})
    assert seen[0] == 32 and seen[5:] == [8] * 5
    assert all(a >= b for a, b in zip(seen, seen[1:]))


def test_training_recipe_sparsifies_anneals_and_saves_a_reloadable_sparse_model(text_folder, tmp_path, tmp_cache):
    from upcycle.train import TrainConfig, Trainer

    config = TrainConfig.from_dict(
        dict(
            model="tiny-llama",
            data=str(text_folder),
            out=str(tmp_path / "run"),
            seq_len=32,
            global_batch=4,
            micro_batch=2,
            lr=3e-3,
            warmup_steps=1,
            ckpt_every=100,
            progress=False,
            val_blocks=2,
            losses=[{"name": "lm"}, {"name": "kd"}],
            teacher="self",
            groups=[{"name": "predictor", "patterns": [r"\.predictor\."]}],
            stages=[
                {
                    "name": "predictor",
                    "tokens": 32 * 4 * 2,
                    "train": ["predictor"],
                    "transform": "sparsify",
                    "transform_options": {
                        "bank": 32,
                        "keep": 8,
                        "rank": 4,
                        "predictor": "lowrank",
                        "warmup_steps": 20,
                        "calibration": str(text_folder),
                        "calibration_tokens": 1024,
                        "seq_len": 32,
                    },
                },
                {
                    "name": "end-to-end",
                    "tokens": 32 * 4 * 6,
                    "callbacks": [{"name": "anneal_keep", "options": {"fraction": 0.5}}],
                },
            ],
        )
    )
    trainer = Trainer(config)
    dense_before = copy.deepcopy(trainer.model)
    seen = []

    class Watch(upcycle.train.Callback):
        def on_step_end(self, t, record):
            seen.append((record["stage"], adapter_for(t.model).ffn(0).keep))

    trainer.callbacks.append(Watch())
    trainer.fit()
    assert [k for s, k in seen if s == "predictor"] == [8, 8]
    e2e = [k for s, k in seen if s == "end-to-end"]
    assert e2e == [32, 24, 16, 8, 8, 8]  # the k each step ran with: linear over the first half of 6 steps
    # the teacher is the dense model from before the transform
    assert torch.equal(
        logits(trainer.teacher, tokens_for(dense_before)), logits(dense_before, tokens_for(dense_before))
    )
    reloaded, _ = upcycle.load(tmp_path / "run" / "final")
    assert isinstance(reloaded, UpcycleSparseForCausalLM)
    ids = tokens_for(reloaded)
    assert torch.equal(logits(reloaded, ids), logits(trainer.model.eval(), ids))


def test_cli_sparsify_and_densify(text_folder, tmp_path, tmp_cache, capsys):
    from upcycle.cli import main

    src = tmp_path / "dense"
    hub.save(hub.tiny("llama"), hub.byte_tokenizer(), src)
    out = tmp_path / "sparse"
    assert (
        main(
            [
                "sparsify",
                str(src),
                str(out),
                "--bank",
                "32",
                "--keep",
                "8",
                "--rank",
                "4",
                "--warmup-steps",
                "20",
                "--calibration",
                str(text_folder),
                "--calibration-tokens",
                "2048",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "reloaded: max |Δlogit| 0" in printed and "recall" in printed
    report = json.loads((out / "sparsify_report.json").read_text())
    assert len(report["recall"]) == 2 and (out / "recall.png").exists() and (out / "sparsify_report.md").exists()
    assert main(["densify", str(out), str(tmp_path / "back")]) == 0
    assert "dense vs sparse on random tokens" in capsys.readouterr().out  # (its progress bar went to stderr)
    back, _ = upcycle.load(tmp_path / "back")
    assert back.config.model_type == "llama"
    # one-line errors, nothing written
    for argv, message in [
        (["sparsify", str(src), str(tmp_path / "x"), "--keep", "80"], "keep=80"),
        (["sparsify", str(src), str(tmp_path / "x"), "--bank", "48"], "bank=48"),
        (["sparsify", str(src), str(tmp_path / "x"), "--rank", "0"], "rank=0"),
        (["sparsify", str(src), str(out)], "exists"),
        (["densify", str(src), str(tmp_path / "y")], "densify needs a bank-sparse model"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_router_loss_is_the_per_bank_ranking_cross_entropy_and_trains_only_the_predictor():
    from upcycle.train.losses import LOSSES, LossInputs

    ffn = _ffn("hard")
    ffn.train()
    x = torch.randn(3, 32)
    ffn(x)
    with torch.no_grad():
        h = ffn.activation(x).abs()
        z = ffn.predictor(x)
    expected = 0.0
    for t in range(3):
        for start in range(0, 64, 16):
            oracle = h[t, start : start + 16].argsort(descending=True)[:4]
            expected -= torch.log_softmax(z[t, start : start + 16], 0)[oracle].sum() / 4
    expected /= 12
    model = torch.nn.Sequential(ffn)
    loss = LOSSES["router"](LossInputs(None, None, None, model))
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert ffn.predictor.up.weight.grad.abs().sum() > 0 and ffn.gate_proj.weight.grad is None


@pytest.mark.parametrize("predictor", ["lowrank", "shadow"])
def test_layerwise_conversion_lowers_every_layers_error_on_held_out_rows(predictor, text_folder, tmp_cache):
    dense, tok = hub.load("tiny-llama")
    options = dict(
        bank=32,
        keep=8,
        rank=8,
        predictor=predictor,
        group=16,
        warmup_steps=20,
        calibration=str(text_folder),
        calibration_tokens=2048,
        seq_len=64,
        seed=0,
        convert_steps=0,
    )
    plain, _ = sparsify(dense, tok, **options)
    converted, report = sparsify(
        dense, tok, **{**options, "convert_steps": 60, "convert_rows": 256, "convert_lr": 3e-3}
    )
    assert len(report.convert_error_after) == len(report.layers) == 2
    assert all(a < b for a, b in zip(report.convert_error_after, report.convert_error_before)), report
    # and the whole model moved toward the dense one on held-out text (an independent measurement)
    from upcycle import data
    from upcycle.eval import compare

    held = data.blocks(str(text_folder), tok, "validation", 64, max_blocks=8)
    assert compare(dense, converted, held).mean_kl < compare(dense, plain, held).mean_kl
    assert all(torch.equal(p, q) for p, q in zip(dense.parameters(), hub.load("tiny-llama")[0].parameters()))
