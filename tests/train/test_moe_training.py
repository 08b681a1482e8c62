"""Training a grown MoE: the router losses against hand-worked values, and a run of the one trainer
with them and a top-k warm start."""

import json
import math

import pytest
import torch

from upcycle import arch, hub
from upcycle.train import LossInputs, TrainConfig, Trainer
from upcycle.train.moe import balance_loss, router_z_loss


def _inputs(model, *router_logits):
    return LossInputs(
        torch.zeros(1, 1, 2),
        torch.zeros(1, 1, dtype=torch.long),
        model=model,
        router_logits=tuple(torch.tensor(r) for r in router_logits),
    )


def test_balance_and_z_losses_are_their_formulas():
    model = hub.tiny("mixtral", experts=2, top_k=1)
    balanced = [[1.0, 0.0], [0.0, 1.0]]  # one token to each expert, mean probabilities 1/2 each
    skewed = [[1.0, 0.0], [1.0, 0.0]]  # both tokens to expert 0, whose mean probability is sigmoid(1)
    assert balance_loss(_inputs(model, balanced)).item() == pytest.approx(1.0, rel=1e-6)
    assert balance_loss(_inputs(model, skewed)).item() == pytest.approx(2 / (1 + math.exp(-1)), rel=1e-6)
    assert balance_loss(_inputs(model, balanced, skewed)).item() == pytest.approx((1 + 2 / (1 + math.exp(-1))) / 2)
    assert router_z_loss(_inputs(model, [[0.0, 0.0]])).item() == pytest.approx(math.log(2) ** 2, rel=1e-6)
    assert router_z_loss(_inputs(model, [[3.0, -50.0]])).item() == pytest.approx(9.0, rel=1e-6)


def test_a_grown_moe_trains_with_router_losses_and_a_top_k_warm_start(text_folder, tmp_path, tmp_cache):
    model, tokenizer = hub.load("tiny-qwen3_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig.from_dict(
        dict(
            model="tiny-qwen3_moe",
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
            groups=[{"name": "router"}, {"name": "experts"}],
            losses=[{"name": "lm"}, {"name": "balance", "weight": 0.01}, {"name": "router_z", "weight": 0.001}],
            stages=[
                {"name": "k1", "tokens": 256, "transform": "top_k", "transform_options": {"k": 1}, "train": ["router"]},
                {"name": "k2", "tokens": 256, "transform": "top_k", "transform_options": {"k": 2}},
            ],
        )
    )
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    trainer.fit()
    adapter = arch.adapter_for(trainer.model)
    assert adapter.top_k(0) == 2 and trainer.model.config.num_experts_per_tok == 2
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in records if "loss_balance" in r]
    assert len(steps) == 4 and all(r["loss_balance"] > 0.5 and r["loss_router_z"] > 0 for r in steps)
    after = dict(trainer.model.named_parameters())
    assert not torch.equal(after["model.layers.0.mlp.gate.weight"], before["model.layers.0.mlp.gate.weight"])
