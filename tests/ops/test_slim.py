"""slim's criteria against independent computations (Hugging Face's own hidden states, router and
experts), cuts of inert parts that leave the logits unchanged, and bad cuts refused in one line."""

import math

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import logits, tokens_for

from upcycle import arch, hub
from upcycle.errors import ConfigError
from upcycle.ops import calibrate
from upcycle.ops.grow import GrowStep, apply_step
from upcycle.ops.slim import SlimStep, apply_cut, importance

ALL = list(arch.FAMILIES)
DENSE = list(arch.DENSE_FAMILIES)
MOE = list(arch.MOE_FAMILIES)


def _blocks(model, seed=0):
    return tokens_for(model, n=4, length=32, seed=seed)


@torch.no_grad()
def _hf_states(model, blocks):
    """Hugging Face's record of the residual stream: the embeddings, then each layer's output (the
    last entry is after the final norm, so it is left out)."""
    return [h.float() for h in model(input_ids=blocks, output_hidden_states=True).hidden_states[:-1]]


@pytest.mark.parametrize("family", ALL)
def test_block_influence_and_angular_distance_match_hugging_faces_hidden_states(family):
    model = hub.tiny(family, layers=4)
    blocks = _blocks(model)
    hs = _hf_states(model, blocks)
    bi = importance.block_influence(model, blocks)
    for i in range(len(hs) - 1):
        want = 1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
        assert bi[i].item() == pytest.approx(want.item(), abs=1e-5)
    ang = importance.angular_distance(model, blocks, 2)
    for start in range(len(hs) - 2):
        cos = F.cosine_similarity(hs[start][:, -1], hs[start + 2][:, -1], dim=-1).clamp(-1, 1)
        assert ang[start].item() == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
def test_rmsnorm_importance_is_the_norms_mean_absolute_output(family):
    model = hub.tiny(family, layers=2)
    blocks = _blocks(model)
    adapter = arch.adapter_for(model)
    with torch.no_grad():
        hs = model(input_ids=blocks, output_hidden_states=True).hidden_states
        want = torch.zeros(adapter.hidden_size)
        for i in range(adapter.num_layers):  # each layer's input norm on its input; the post-attention norm
            x = hs[i]  # on the stream after attention, recomputed through the modules
            normed = adapter.norms(i)["input"](x)
            attn = adapter.layer(i).self_attn(
                normed,
                position_embeddings=model.model.rotary_emb(x, torch.arange(x.shape[1])[None]),
                attention_mask=None,
            )[0]
            want += normed.abs().mean((0, 1)) + adapter.norms(i)["post_attention"](x + attn).abs().mean((0, 1))
        want += hs[-1].abs().mean((0, 1))  # the final norm's output is HF's last hidden state
    got = importance.hidden_importance(model, blocks)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_expert_statistics_match_the_models_own_router_and_experts(family):
    model = hub.tiny(family, layers=2, experts=4, top_k=2)
    blocks = _blocks(model)
    adapter = arch.adapter_for(model)
    stats = importance.expert_importance(model, blocks)
    inputs = {}
    hooks = [
        adapter.ffn(i).register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0]))
        for i in range(2)
    ]
    with torch.no_grad():
        model(input_ids=blocks)
    for h in hooks:
        h.remove()
    for i in range(2):
        x = torch.cat(inputs[i]).reshape(-1, adapter.hidden_size)
        with torch.no_grad():
            _, weights, index = adapter.router(i)(x)  # the stock router's own top-k
            experts = adapter.ffn(i).experts
            E = adapter.num_experts(i)
            chosen = torch.zeros(len(x), E).scatter_(1, index, 1.0)
            soft = torch.zeros(len(x), E).scatter_(1, index, weights.float())
            reap = torch.zeros(E)
            for e in range(E):
                rows = chosen[:, e].bool()
                if rows.any():  # the stock experts' forward with only expert e, at weight 1
                    xe = x[rows]
                    out = experts(xe, torch.full((len(xe), 1), e), torch.ones(len(xe), 1))
                    reap[e] = (soft[rows, e] * out.norm(dim=-1)).mean()
        s = stats[i]
        assert torch.allclose(s.frequency, chosen.mean(0)) and torch.allclose(s.soft, soft.mean(0), atol=1e-6)
        assert torch.allclose(s.reap, reap, rtol=1e-4, atol=1e-6)


def test_expert_statistics_on_a_hand_built_router():
    """Two experts, top-1: three tokens go to expert 0 (logits 2 vs 0), one to expert 1 (4 vs 0)."""
    H = 8
    x = torch.zeros(4, H)
    x[:3, 0], x[3, 1] = 1.0, 1.0
    router = torch.zeros(2, H)
    router[0, 0], router[1, 1] = 2.0, 4.0
    g = torch.Generator().manual_seed(0)
    experts = arch.SwiGLUWeights(
        torch.randn(2, 6, H, generator=g), torch.randn(2, 6, H, generator=g), torch.randn(2, H, 6, generator=g)
    )
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731  softmax of (z, 0)
    norm = [
        torch.linalg.vector_norm(experts.down[e] @ (F.silu(experts.gate[e] @ x[t]) * (experts.up[e] @ x[t])))
        for e, t in ((0, 0), (1, 3))
    ]
    s = importance.expert_stats(x, router, experts, 1, normalize=False)
    assert s.frequency.tolist() == [0.75, 0.25]
    assert s.soft.tolist() == pytest.approx([3 * sig(2) / 4, sig(4) / 4])
    assert s.reap.tolist() == pytest.approx([sig(2) * norm[0].item(), sig(4) * norm[1].item()], rel=1e-5)
    s = importance.expert_stats(x, router, experts, 1, normalize=True)  # renormalised top-1: weight 1
    assert s.soft.tolist() == [0.75, 0.25] and s.reap.tolist() == pytest.approx([n.item() for n in norm], rel=1e-5)


@pytest.mark.parametrize("family", ALL)
def test_removing_identity_layers_leaves_the_logits_unchanged(family):
    source = hub.tiny(family, layers=3)
    grown, _ = apply_step(source, GrowStep(op="depth", at=[0, 2]))  # two identity layers
    slim, report = apply_cut(grown, SlimStep(op="depth", layers=2, criterion="block_influence"), _blocks(grown))
    assert report.removed["removed_layers"] == [1, 4]
    ids = tokens_for(source, seed=5)
    assert (logits(source, ids) - logits(slim, ids)).abs().max().item() <= 1e-5
    assert slim.config.num_hidden_layers == 3


@pytest.mark.parametrize("family", ALL)
def test_cutting_all_zero_hidden_channels_leaves_the_logits_unchanged(family):
    model = hub.tiny(family, layers=2)
    adapter = arch.adapter_for(model)
    dead = torch.arange(48, 64)  # channels nothing writes to: zero in the residual stream everywhere
    with torch.no_grad():
        for name, (axis, role) in adapter.hidden_parameters().items():
            if role in ("embedding", "writes"):
                dict(model.named_parameters())[name].index_fill_(axis, dead, 0.0)
    slim, report = apply_cut(model, SlimStep(op="hidden", hidden=48), _blocks(model))
    assert report.removed["kept_channels"] == list(range(48))
    ids = tokens_for(model, seed=5)
    assert (logits(model, ids) - logits(slim, ids)).abs().max().item() <= 1e-5
    assert slim.config.hidden_size == 48


@pytest.mark.parametrize("family", DENSE)
def test_cutting_dead_ffn_neurons_and_silent_heads_leaves_the_logits_unchanged(family):
    model = hub.tiny(family, layers=2)
    adapter = arch.adapter_for(model)
    with torch.no_grad():
        for i in range(2):
            w = adapter.ffn_weights(i)
            w.gate[96:].zero_(), w.up[96:].zero_()  # neurons 96..127 never fire
            o = adapter.attention(i)["o"].weight
            o[:, 16:32].zero_(), o[:, 48:64].zero_()  # query heads 1 and 3 (one per key/value group) are silent
    ids = tokens_for(model, seed=5)
    slim, _ = apply_cut(model, SlimStep(op="ffn_width", width=96), _blocks(model))
    assert (logits(model, ids) - logits(slim, ids)).abs().max().item() <= 1e-5
    slim, report = apply_cut(model, SlimStep(op="heads", heads=2), _blocks(model))
    assert report.removed["kept_heads"] == [[0, 2], [0, 2]]  # the silent heads are the ones cut
    assert (logits(model, ids) - logits(slim, ids)).abs().max().item() <= 1e-5
    assert slim.config.num_attention_heads == 2


@pytest.mark.parametrize("family", MOE)
def test_merging_identical_experts_changes_nothing(family):
    """grow's clones merged back into their originals: the exact inverse of expert cloning."""
    source = hub.tiny(family, layers=2, experts=4, top_k=2)
    cloned, _ = apply_step(source, GrowStep(op="experts", factor=2))  # 8 experts, twins share router rows
    slim, report = apply_cut(
        cloned, SlimStep(op="experts", experts=4, top_k=2, mode="merge", similarity="router_weight"), _blocks(source)
    )
    assert all(sorted(g) in ([0, 1], [2, 3], [4, 5], [6, 7]) for g in report.removed["layers"][0]["groups"])
    ids = tokens_for(source, seed=5)
    assert (logits(source, ids) - logits(slim, ids)).abs().max().item() <= 1e-5


def test_merged_weights_are_the_usage_weighted_average():
    model = hub.tiny("mixtral", layers=1, experts=4, top_k=2)
    blocks = _blocks(model)
    stats = importance.expert_importance(model, blocks)[0]
    slim, report = apply_cut(model, SlimStep(op="experts", experts=2, mode="merge", similarity="router_weight"), blocks)
    a, s = arch.adapter_for(model), arch.adapter_for(slim)
    for n, members in enumerate(report.removed["layers"][0]["groups"]):
        u = stats.frequency[members] / stats.frequency[members].sum()
        want = sum(u[j] * a.experts(0).down[m] for j, m in enumerate(members))
        assert torch.allclose(s.experts(0).down[n], want, atol=1e-6)
    assert slim.config.num_local_experts == 2 and slim.config.num_experts_per_tok == 2


def test_bad_cuts_are_one_line_errors():
    dense, moe = hub.tiny("llama", layers=2), hub.tiny("qwen2_moe", layers=2)
    blocks = _blocks(dense)
    with pytest.raises(ConfigError, match="layers=2 is not allowed: this model has 2 layers"):
        apply_cut(dense, SlimStep(op="depth", layers=2), blocks)
    with pytest.raises(ConfigError, match="heads=3 is not allowed: .* a multiple of the 2 key/value heads"):
        apply_cut(dense, SlimStep(op="heads", heads=3), blocks)
    with pytest.raises(ConfigError, match="op experts needs a mixture-of-experts model"):
        apply_cut(dense, SlimStep(op="experts", experts=2), blocks)
    with pytest.raises(ConfigError, match="top_k=3 is not allowed: at most experts=2"):
        SlimStep(op="experts", experts=2, top_k=3)
    with pytest.raises(ConfigError, match="experts=4 is not allowed: fewer than the 4 experts"):
        apply_cut(moe, SlimStep(op="experts", experts=4), blocks)
    with pytest.raises(ConfigError, match="hidden=64 is not allowed"):
        apply_cut(dense, SlimStep(op="hidden", hidden=64), blocks)
    with pytest.raises(ConfigError, match="hidden=50 is not allowed: a multiple of the 4 attention heads"):
        apply_cut(dense, SlimStep(op="hidden", hidden=50), blocks)  # a width the heads cannot hold
    with pytest.raises(ConfigError, match="criterion='reap' is not allowed: for op depth"):
        SlimStep(op="depth", layers=1, criterion="reap")


def test_without_recompute_every_cut_reads_the_sources_scores_through_the_earlier_cuts():
    from upcycle.ops.slim.lineage import Lineage, source_scores

    model = hub.tiny("llama", layers=4)
    blocks = _blocks(model)
    steps = [SlimStep(op="depth", layers=1, criterion="block_influence")] * 2 + [
        SlimStep(op="heads", heads=2),
        SlimStep(op="ffn_width", width=96),
        SlimStep(op="hidden", hidden=48),
    ]
    scores, lineage, slim = source_scores(model, steps, blocks), Lineage.of(model), model
    for step in steps:
        slim, report = apply_cut(slim, step, blocks, scores=lineage.read(scores, step))
        assert report.removed["importance_from"] == "source"
        lineage = lineage.after(step, report.removed)
    # independently, on the source: the two least influential layers go; in each kept layer the best query head of
    # each key/value group, the 96 most important FFN neurons, and the 48 most important hidden channels stay
    layers = sorted(importance.block_influence(model, blocks).argsort()[2:].tolist())
    heads = importance.head_importance(model, blocks)
    channels = importance.hidden_importance(model, blocks).topk(48).indices.sort().values
    assert list(lineage.layers) == layers and list(lineage.channels) == channels.tolist()
    src, out = arch.adapter_for(model), arch.adapter_for(slim)
    stream = calibrate.LayerStream(model, blocks)
    neurons = {}
    for i in range(4):
        neurons[i] = calibrate.channel_importance(src.ffn_weights(i), stream.module_inputs(src.ffn(i))).topk(96).indices
        stream.advance()
    for new, old in enumerate(layers):
        kept_heads = [int(heads[old, :2].argmax()), 2 + int(heads[old, 2:].argmax())]
        rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kept_heads])
        expected_q = src.attention(old)["q"].weight[rows][:, channels]
        assert torch.equal(out.attention(new)["q"].weight, expected_q)
        expected_up = src.ffn_weights(old).up[neurons[old].sort().values][:, channels]
        assert torch.equal(out.ffn_weights(new).up, expected_up)
