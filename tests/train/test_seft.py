"""SEFT: the sparse-delta layer against a dense reference (forward, gradients, the window), topology
updates that keep the budget and the target count, resurrection, N:M patterns that never break, and
whole runs of the one trainer (seft, masked) that end at exactly the pruned model's sparsity."""

import json

import pytest
import torch
from tests.conftest import tokens_for
from torch import nn

from upcycle import hub
from upcycle.errors import ConfigError
from upcycle.ops.prune import PruneSpec, prunable_linears, prune
from upcycle.train import TrainConfig, Trainer
from upcycle.train.seft import attach_deltas, delta_layers, evolve, merge_deltas, prune_back
from upcycle.train.sparse_delta import SparseDeltaLinear


def _pruned_linear(out=6, inp=8, sparsity=0.5, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inp, generator=gen))
        linear.weight[torch.rand(out, inp, generator=gen) < sparsity] = 0
    return linear


def test_forward_gradients_and_window_equal_a_dense_reference():
    linear = _pruned_linear()
    layer = SparseDeltaLinear(linear, budget=10, seed=1)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(10, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(3, 5, 8, requires_grad=True)
    # the reference: the same W_eff as one dense trainable matrix
    w_ref = linear.weight.detach().clone().view(-1)
    w_ref[layer.index] += layer.delta.detach()
    w_ref = w_ref.view(6, 8).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w_ref, linear.bias.detach())
    layer.collect = True
    y = layer(x)
    assert torch.allclose(y, y_ref, atol=1e-6)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(layer.delta.grad, w_ref.grad.view(-1)[layer.index], atol=1e-5)
    assert torch.allclose(layer.window, w_ref.grad, atol=1e-5)
    assert bool(layer.live.view(-1)[layer.index].all()) and len(set(layer.index.tolist())) == 10
    merged = layer.merged()
    assert type(merged) is nn.Linear and torch.allclose(merged.weight, w_ref.detach(), atol=1e-7)


def test_an_update_keeps_the_budget_and_grows_where_the_gradient_is_largest():
    layer = SparseDeltaLinear(_pruned_linear(out=8, inp=16, sparsity=0.5), budget=12)
    target = int(layer.live.sum())
    with torch.no_grad():
        layer.delta.copy_(torch.linspace(-1, 1, 12))
    grad = torch.rand(8, 16, generator=torch.Generator().manual_seed(3)) * 0.01
    grad.view(-1)[layer.index] = 0  # held positions: no gradient; two live free positions with a large one
    free_live = [p for p in layer.live.view(-1).nonzero().flatten().tolist() if p not in set(layer.index.tolist())]
    grad.view(-1)[free_live[:2]] = 5.0
    layer.window = grad
    smallest = layer.index[layer.delta.abs().argsort()[:2]].tolist()
    w_before = layer.effective_weight()
    stats = evolve(layer, drop_fraction=2 / 12, target_live=target)
    assert torch.equal(layer.effective_weight(), w_before)  # dropped deltas folded in, grown ones at zero
    held = set(layer.index.tolist())
    assert layer.budget == 12 and len(held) == 12 and stats["dropped"] == 2 and stats["grown"] == 2
    assert set(free_live[:2]) <= held and not set(smallest) & held
    assert int(layer.live.sum()) == target and layer.window is None


def test_resurrection_a_pruned_weight_with_a_dominant_gradient_comes_back_and_something_else_goes():
    layer = SparseDeltaLinear(_pruned_linear(out=4, inp=8, sparsity=0.5, seed=4), budget=4)
    target = int(layer.live.sum())
    dead = (~layer.live).view(-1).nonzero().flatten()[0].item()
    grad = torch.full((4, 8), 1e-3)
    grad.view(-1)[dead] = 10.0
    layer.window = grad
    stats = evolve(layer, drop_fraction=0.25, target_live=target)
    assert dead in layer.index.tolist() and bool(layer.live.view(-1)[dead]) and stats["resurrected"] == 1
    assert int(layer.live.sum()) == target + 1  # one over until the next prune-back judges it
    slot = layer.index.tolist().index(dead)
    with torch.no_grad():
        layer.delta[slot] = 3.0  # what training would give it
    before = set(layer.live.view(-1).nonzero().flatten().tolist())
    layer.window = torch.ones(4, 8)  # sensitivity is then |θ|: the smallest live weight goes
    theta = layer.effective_weight().abs().view(-1)
    weakest = min(before, key=lambda p: float(theta[p]))
    assert prune_back(layer, target) == 1
    after = set(layer.live.view(-1).nonzero().flatten().tolist())
    assert before - after == {weakest} and dead in after and int(layer.live.sum()) == target
    held_dead = ~layer.live.view(-1)[layer.index]  # a slot on a pruned position is freed: δ = 0 until the next grow
    assert layer.weight.view(-1)[weakest] == 0 and bool((layer.delta[held_dead] == 0).all())


def test_without_resurrection_the_dominant_pruned_position_stays_dead_and_the_best_live_one_grows():
    layer = SparseDeltaLinear(_pruned_linear(out=4, inp=8, sparsity=0.5, seed=4), budget=4)
    target = int(layer.live.sum())
    dead = (~layer.live).view(-1).nonzero().flatten()[0].item()
    free_live = [p for p in layer.live.view(-1).nonzero().flatten().tolist() if p not in set(layer.index.tolist())]
    grad = torch.full((4, 8), 1e-3)
    grad.view(-1)[dead] = 10.0
    grad.view(-1)[free_live[0]] = 5.0
    layer.window = grad
    stats = evolve(layer, drop_fraction=0.25, target_live=target, resurrect=False)
    held = set(layer.index.tolist())
    assert dead not in held and free_live[0] in held and stats["resurrected"] == 0 and stats["grown"] == 1
    assert not bool(layer.live.view(-1)[dead]) and int(layer.live.sum()) == target


def test_nm_mode_grows_only_on_live_positions_so_the_pattern_holds():
    linear = _pruned_linear(out=8, inp=16, sparsity=0.0)
    with torch.no_grad():  # a 2:4 pattern
        linear.weight.view(8, 4, 4)[:, :, 2:] = 0
    layer = SparseDeltaLinear(linear, budget=10)
    target = int(layer.live.sum())
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        layer.window = torch.rand(8, 16, generator=gen)
        with torch.no_grad():
            layer.delta.add_(torch.randn(10, generator=gen))
        evolve(layer, drop_fraction=0.5, target_live=target, nm=(2, 4))
        w = layer.merged().weight
        assert int(((w != 0).view(8, 4, 4).sum(-1)).max()) <= 2 and int(layer.live.sum()) == target


def _run(tmp_path, text_folder, model, tokenizer, stage_extra, name):
    cfg = TrainConfig.from_dict(
        dict(
            model="tiny-llama",
            data=str(text_folder),
            out=str(tmp_path / name),
            seq_len=32,
            global_batch=4,
            micro_batch=2,
            lr=1e-2,
            warmup_steps=1,
            ckpt_every=100,
            progress=False,
            val_blocks=2,
            groups=stage_extra.pop("groups", []),
            losses=[{"name": "lm"}],
            stages=[{"name": "finetune", "tokens": 1280, **stage_extra}],
        )
    )
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    trainer.fit()
    return trainer


@pytest.fixture
def pruned(tmp_cache):
    model, tokenizer = hub.load("tiny-llama")
    model, report = prune(model, PruneSpec(method="wanda", sparsity=0.6), tokens_for(model, n=4, length=32))
    return model, tokenizer, report


def test_a_seft_run_evolves_and_ends_at_exactly_the_pruned_sparsity(pruned, tmp_path, text_folder):
    model, tokenizer, report = pruned
    zeros = {k: int((m.weight == 0).sum()) for k, m in prunable_linears(model).items()}
    before = {k: m.weight.detach().clone() for k, m in prunable_linears(model).items()}
    trainer = _run(
        tmp_path,
        text_folder,
        model,
        tokenizer,
        dict(
            groups=[{"name": "deltas", "patterns": [r"\.delta$"]}, {"name": "rest", "frozen": True}],
            transform="seft",
            transform_options={"density": 0.05},
            callbacks=[{"name": "seft", "options": {"every": 3, "window": 2, "drop": 0.3}}],
        ),
        "seft",
    )
    records = [json.loads(line) for line in open(tmp_path / "seft" / "seft.jsonl")]
    updates = [r for r in records if "grown" in r]
    assert [r["step"] for r in updates] == [3, 6, 9] and all(r["grown"] > 0 for r in updates)
    assert updates[0]["drop_fraction"] == pytest.approx(0.3) and updates[-1]["drop_fraction"] < 0.3
    assert records[-1]["live"] == records[-1]["target_live"]
    budgets = [layer.budget for layer in delta_layers(trainer.model)]
    merged = merge_deltas(trainer.model)
    assert not delta_layers(merged)
    after = prunable_linears(merged)
    assert {k: int((m.weight == 0).sum()) for k, m in after.items()} == zeros
    assert all(type(m) is nn.Linear for m in after.values())
    changed = sum(int((after[k].weight != before[k]).sum()) for k in before)
    assert 0 < changed <= sum(budgets) * 4  # the deltas moved weights, and only about as many as they could hold


def test_a_masked_run_keeps_every_zero(pruned, tmp_path, text_folder):
    model, tokenizer, _ = pruned
    masks = {k: m.weight == 0 for k, m in prunable_linears(model).items()}
    before = {k: m.weight.detach().clone() for k, m in prunable_linears(model).items()}
    trainer = _run(tmp_path, text_folder, model, tokenizer, dict(callbacks=[{"name": "masked"}]), "masked")
    for k, m in prunable_linears(trainer.model).items():
        assert bool((m.weight[masks[k]] == 0).all()) and not torch.equal(m.weight, before[k]), k


def test_seft_on_a_model_without_zeros_is_refused():
    with pytest.raises(ConfigError, match="no zero weights"):
        attach_deltas(hub.tiny("llama"), density=0.01)
