import json
import math

import pytest
import torch
import torch.nn.functional as F

from upcycle import hub
from upcycle.errors import ConfigError
from upcycle.eval import perplexity
from upcycle.train import Callback, LossInputs, TrainConfig, Trainer, TrainingDiverged, checkpoint, register_transform
from upcycle.train.losses import kd_loss, lm_loss
from upcycle.train.schedules import lr_factor, ramp


def config(text_folder, tmp_path, **changes):
    base = dict(
        model="tiny-llama",
        data=str(text_folder),
        out=str(tmp_path / "run"),
        seq_len=32,
        global_batch=4,
        micro_batch=2,
        lr=3e-3,
        warmup_steps=2,
        ckpt_every=100,
        progress=False,
        val_blocks=4,
        stages=[{"name": "main", "tokens": 32 * 4 * 8}],
    )
    return TrainConfig.from_dict({**base, **changes})


def losses(run_folder):
    return [r["loss"] for r in map(json.loads, open(run_folder / "metrics.jsonl")) if "loss" in r]


# ---- losses and schedules against their formulas -------------------------------------------------


def test_lm_loss_is_next_token_cross_entropy():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    logp = torch.log_softmax(logits, -1)
    expected = -sum(logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4)) / 8
    assert lm_loss(LossInputs(logits, ids)).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_equals_torch_in_value_and_gradient(chunk):
    from upcycle.train.losses import cross_entropy

    logits = torch.randn(50, 37, requires_grad=True)
    labels = torch.randint(0, 37, (50,))
    labels[::4] = -100
    ours = cross_entropy(logits, labels, chunk=chunk)
    (g_ours,) = torch.autograd.grad(ours * 3, logits)
    ref = F.cross_entropy(logits, labels, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref * 3, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(g_ours, g_ref, atol=1e-7)


def test_kd_with_teacher_equal_to_student_is_zero_and_positive_otherwise():
    logits = torch.randn(2, 6, 50)
    same = LossInputs(logits, None, logits.clone())
    assert kd_loss(same).item() == pytest.approx(0, abs=1e-6)
    assert kd_loss(same, temperature=2.0, top_k=5).item() == pytest.approx(0, abs=1e-6)
    other = LossInputs(logits, None, logits + torch.randn_like(logits))
    t, s = torch.softmax(other.teacher_logits / 2, -1), torch.log_softmax(logits / 2, -1)
    expected = (t * (t.log() - s)).sum(-1).mean() * 4
    assert kd_loss(other, temperature=2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_lr_schedule_matches_its_formula():
    total, warmup, floor = 20, 4, 0.1
    assert [lr_factor(s, total, warmup, "cosine", floor) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(warmup, total):
        progress = (s - warmup) / (total - warmup - 1)
        cos = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_factor(s, total, warmup, "cosine", floor) == pytest.approx(cos)
        assert lr_factor(s, total, warmup, "linear", floor) == pytest.approx(floor + (1 - floor) * (1 - progress))
        assert lr_factor(s, total, warmup, "constant", floor) == 1.0
    assert ramp(1.0, 0.75, 0, 11) == 1.0 and ramp(1.0, 0.75, 10, 11) == 0.75 and ramp(1.0, 0.75, 5, 11) == 0.875


def test_the_optimizer_sees_the_scheduled_lr(text_folder, tmp_path, tmp_cache):
    seen = []

    class Spy(Callback):
        def on_after_backward(self, trainer):
            seen.append([g["lr"] for g in trainer.optimizer.param_groups])

    cfg = config(text_folder, tmp_path, groups=[{"name": "ffn", "patterns": [r"\.mlp\."], "lr_mult": 0.5}])
    Trainer(cfg, callbacks=[Spy()]).fit()
    for step, lrs in enumerate(seen):
        expected = 3e-3 * lr_factor(step, 8, 2, "cosine", 0.1)
        assert lrs == pytest.approx([expected * 0.5, expected])


# ---- training behaviour --------------------------------------------------------------------------


def test_loss_falls_on_shakespeare(tmp_path):
    cfg = TrainConfig.from_dict(
        dict(
            model="tiny-qwen2",
            data="shakespeare",
            out=str(tmp_path / "run"),
            seq_len=64,
            global_batch=8,
            micro_batch=4,
            lr=3e-3,
            warmup_steps=3,
            progress=False,
            val_blocks=8,
            stages=[{"name": "main", "tokens": 64 * 8 * 30}],
        )
    )
    trainer = Trainer(cfg)
    untrained = perplexity(hub.tiny("qwen2"), trainer.val_blocks, progress=False)
    summary = trainer.fit()
    curve = losses(tmp_path / "run")
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:3]) / 3  # from ~ln(264)=5.6 to well below
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[-1]["val_ppl"] < 0.5 * untrained.ppl and summary["steps"] == 30
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    report = (tmp_path / "run" / "report.md").read_text()
    assert "final_val_loss" in report and "loss_curve.png" in report
    reloaded, _ = hub.load(tmp_path / "run" / "final")
    assert reloaded.config.model_type == "qwen2"


def test_frozen_groups_stay_bit_identical(text_folder, tmp_path, tmp_cache):
    model, tokenizer = hub.load("tiny-llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(
        text_folder,
        tmp_path,
        groups=[
            {"name": "attn", "patterns": [r"self_attn\."], "frozen": True},
            {"name": "embed", "patterns": ["embed_tokens"], "frozen": True},
        ],
    )
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    trainer.fit()
    for name, p in trainer.model.named_parameters():
        if "self_attn." in name or "embed_tokens" in name:
            assert torch.equal(p, before[name]), name
        elif "mlp." in name:
            assert not torch.equal(p, before[name]), name


def test_stages_train_their_own_groups_and_apply_their_transform(text_folder, tmp_path, tmp_cache):
    calls = []

    @register_transform("halve_lm_head_for_test")
    def halve(model, factor=0.5):
        calls.append(factor)
        with torch.no_grad():
            model.lm_head.weight.mul_(factor)
        return model

    model, tokenizer = hub.load("tiny-llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(
        text_folder,
        tmp_path,
        groups=[{"name": "ffn", "patterns": [r"\.mlp\."]}],
        stages=[
            {"name": "ffn-only", "tokens": 512, "train": ["ffn"]},
            {"name": "all", "tokens": 512, "transform": "halve_lm_head_for_test", "transform_options": {"factor": 0.5}},
        ],
    )
    seen = {}

    class Watch(Callback):
        def on_stage_end(self, trainer):
            seen[trainer.config.stages[trainer.progress.stage_index].name] = {
                n: p.detach().clone() for n, p in trainer.model.named_parameters()
            }

    Trainer(cfg, model=model, tokenizer=tokenizer, callbacks=[Watch()]).fit()
    assert calls == [0.5]
    after_first = seen["ffn-only"]
    assert torch.equal(
        after_first["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(
        after_first["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        seen["all"]["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_folder, tmp_path, tmp_cache):
    class Poison(Callback):
        def on_step_end(self, trainer, record):
            if trainer.progress.step == 5:  # after the step-4 checkpoint was written
                with torch.no_grad():
                    trainer.model.model.norm.weight.fill_(float("nan"))

    cfg = config(text_folder, tmp_path, ckpt_every=2)
    with pytest.raises(TrainingDiverged, match="step 6") as err:
        Trainer(cfg, callbacks=[Poison()]).fit()
    assert "step-000004" in str(err.value) and "\n" not in str(err.value)
    model_sd, _, meta = checkpoint.load(checkpoint.latest(tmp_path / "run"))
    assert meta["step"] == 4 and all(torch.isfinite(t).all() for t in model_sd.values())


# ---- bad input: one line each --------------------------------------------------------------------


def test_stage_with_too_few_tokens(text_folder, tmp_path, tmp_cache):
    with pytest.raises(ConfigError, match="tokens=0"):
        config(text_folder, tmp_path, stages=[{"name": "empty", "tokens": 0}])
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        Trainer(config(text_folder, tmp_path, stages=[{"name": "tiny", "tokens": 10}]))


def test_unknown_loss_and_kd_without_teacher(text_folder, tmp_path):
    with pytest.raises(ConfigError, match="loss='mse'.*lm"):
        config(text_folder, tmp_path, losses=[{"name": "mse"}])
    with pytest.raises(ConfigError, match="teacher"):
        config(text_folder, tmp_path, losses=[{"name": "kd"}])


def test_teacher_with_another_vocabulary(text_folder, tmp_path, tmp_cache):
    teacher = hub.tiny("llama", vocab=512)
    cfg = config(text_folder, tmp_path, losses=[{"name": "lm"}, {"name": "kd"}], teacher="self")
    with pytest.raises(ConfigError, match="vocabulary"):
        Trainer(cfg, teacher=teacher)


def test_resume_from_another_models_checkpoint(text_folder, tmp_path, tmp_cache):
    Trainer(config(text_folder, tmp_path)).fit()
    other = hub.tiny("llama", hidden=32, ffn=64)
    with pytest.raises(checkpoint.ResumeMismatch, match="another model"):
        Trainer(config(text_folder, tmp_path), model=other, tokenizer=hub.byte_tokenizer()).fit(resume=True)
    with pytest.raises(checkpoint.ResumeMismatch, match="seq_len"):
        Trainer(config(text_folder, tmp_path, seq_len=16)).fit(resume=True)


def test_bf16_autocast_trains(text_folder, tmp_path, tmp_cache):
    summary = Trainer(config(text_folder, tmp_path, bf16=True)).fit()
    curve = losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0] and summary["steps"] == 8


def test_cli_train_and_its_errors(text_folder, tmp_path, tmp_cache, capsys):
    from upcycle.cli import main

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(config(text_folder, tmp_path).to_yaml())
    assert main(["train", "--config", str(run_yaml), "--out", str(tmp_path / "cli-run")]) == 0
    assert (tmp_path / "cli-run" / "final" / "model.safetensors").exists()
    capsys.readouterr()
    code = main(["train", "--config", str(run_yaml), "--out", str(tmp_path / "empty"), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "no complete checkpoint" in err and err.count("\n") == 1
    code = main(["train", "--config", str(run_yaml), "--losses", "[{name: mse}]"])
    err = capsys.readouterr().err
    assert code == 2 and "mse" in err and err.count("\n") == 1
