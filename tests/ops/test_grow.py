"""grow's operators on tiny models of every family: exact modes against the source's own logits,
diversity modes' reported deviation against an independent recomputation, and the facts each mode
rests on (a shared expert's ½ gate, cloned router rows, k-means centroids, renumbered KV slots)."""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import logits, tokens_for

from upcycle import arch, hub
from upcycle.errors import ConfigError, UnsupportedArchitecture
from upcycle.ops.grow import GrowChecks, GrowStep, GrowthNotPreserved, apply_step
from upcycle.ops.grow.depth import evenly
from upcycle.ops.grow.moe import kmeans_rows

DENSE = list(arch.DENSE_FAMILIES)
MOE = list(arch.MOE_FAMILIES)
EXACT_DENSE_TO_MOE = [
    GrowStep(op="moe", experts=4, top_k=2, mode="copy"),
    GrowStep(op="moe", experts=4, top_k=1, mode="copy", router="random"),
    GrowStep(op="moe", experts=4, top_k=2, mode="granular", granularity=2),
    GrowStep(op="moe", experts=4, top_k=4, mode="partition", router="zero"),
]
EXACT_ANY = [
    GrowStep(op="depth", add=2),
    GrowStep(op="depth", at=[-1, 1]),
    GrowStep(op="ffn_width", width=200),
    GrowStep(op="ffn_width", width=256, noise=0.1),  # zero-sum noise on the split: still exact
    GrowStep(op="hidden", factor=2),
    GrowStep(op="hidden", factor=3, noise=0.1),
]
EXACT_MOE = [GrowStep(op="experts", factor=2), GrowStep(op="experts", factor=3), GrowStep(op="top_k", top_k=2)]
RELAXED = GrowChecks(max_loss_change=100.0, min_logit_cosine=-1.0, max_router_kl=100.0)


def _max_dlogit(a, b, ids):
    return (logits(a, ids) - logits(b, ids)).abs().max().item()


def _cases(families, steps):
    return [
        pytest.param(f, s, id=f"{f}-{s.op}-{s.mode if s.op == 'moe' else ''}{n}")
        for f in families
        for n, s in enumerate(steps)
    ]


@pytest.mark.parametrize(
    "family,step", _cases(DENSE, EXACT_DENSE_TO_MOE) + _cases(DENSE + MOE, EXACT_ANY) + _cases(MOE, EXACT_MOE)
)
def test_exact_modes_keep_the_logits(family, step):
    source = hub.tiny(family)
    ids = tokens_for(source, n=3, length=32)
    before = logits(source, ids)
    grown, report = apply_step(source, step, tokens_for(source, n=2, length=32, seed=1))
    assert report.kind == "exact" and report.preservation.passed
    assert _max_dlogit(source, grown, ids) <= 1e-4
    assert torch.equal(logits(source, ids), before), "the source model was changed"
    if step.op != "top_k":
        assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in source.parameters())


@pytest.mark.parametrize("family", DENSE)
def test_shared_mode_in_qwen2_moe(family):
    if family == "qwen3":
        with pytest.raises(UnsupportedArchitecture, match="cannot become qwen2_moe"):
            apply_step(hub.tiny(family), GrowStep(op="moe", family="qwen2_moe", mode="shared", router="random"))
        return
    source = hub.tiny(family)
    grown, _ = apply_step(source, GrowStep(op="moe", experts=4, top_k=2, mode="shared", router="random"))
    a = arch.adapter_for(grown)
    assert type(grown).__name__ == "Qwen2MoeForCausalLM"
    dense = arch.adapter_for(source).ffn_weights(0)
    assert torch.all(a.shared_expert_gate(0).weight == 0)  # sigmoid(0) = 1/2 ...
    assert torch.equal(a.shared_expert(0).down, 2 * dense.down)  # ... times a doubled down projection
    assert torch.all(a.experts(0).down == 0)  # routed experts enter with zero output
    ids = tokens_for(source)
    assert _max_dlogit(source, grown, ids) <= 1e-4


def test_active_routed_experts_are_the_ffns_own_neurons_and_all_that_changes():
    source = hub.tiny("llama")
    step = GrowStep(op="moe", experts=4, top_k=2, mode="shared", active=True, router="random", expert_width=16)
    grown, report = apply_step(source, step, tokens_for(source), RELAXED)
    assert report.kind == "changed" and report.preservation.max_dlogit > 1e-3
    a, dense = arch.adapter_for(grown), arch.adapter_for(source).ffn_weights(0)
    routed = a.experts(0)
    for e in range(4):  # each routed expert: 16 of the FFN's neurons, whole (gate and up rows, down columns)
        rows = [int((dense.gate == row).all(1).nonzero()[0]) for row in routed.gate[e]]
        assert torch.equal(routed.up[e], dense.up[rows]) and torch.equal(routed.down[e], dense.down[:, rows])
    # silence the routed experts by hand: what is left is the dense model exactly (the shared expert)
    with torch.no_grad():
        for i in range(a.num_layers):
            routed = a.experts(i)
            routed.down.zero_()
            a.set_experts(i, routed)
    assert _max_dlogit(source, grown, tokens_for(source)) <= 1e-4
    with pytest.raises(ConfigError, match="active=True.*only with mode shared"):
        GrowStep(op="moe", mode="copy", active=True)


def test_mixtral_target_and_an_unsupported_one():
    source = hub.tiny("llama")
    grown, report = apply_step(
        source, GrowStep(op="moe", family="mixtral", experts=4, top_k=2, router="random"), tokens_for(source)
    )
    assert type(grown).__name__ == "MixtralForCausalLM" and report.kind == "exact"
    assert _max_dlogit(source, grown, tokens_for(source)) <= 1e-4
    with pytest.raises(UnsupportedArchitecture, match="llama model cannot become qwen3_moe"):
        apply_step(source, GrowStep(op="moe", family="qwen3_moe", router="random"))
    with pytest.raises(ConfigError, match="mode shared needs a family with a shared expert"):
        apply_step(source, GrowStep(op="moe", family="mixtral", mode="shared", router="random"))


def test_bad_steps_are_one_line_errors():
    dense, moe = hub.tiny("llama"), hub.tiny("qwen3_moe")
    with pytest.raises(ConfigError, match="top_k=9 is not allowed: at most experts=8"):
        GrowStep(op="moe", experts=8, top_k=9)
    with pytest.raises(ConfigError, match="mode='mixture' is not allowed"):
        GrowStep(op="moe", mode="mixture")
    with pytest.raises(ConfigError, match="op experts needs a mixture-of-experts model"):
        apply_step(dense, GrowStep(op="experts"))
    with pytest.raises(UnsupportedArchitecture, match="op moe needs a dense model"):
        apply_step(moe, GrowStep(op="moe", router="random"))
    with pytest.raises(ConfigError, match="granularity=3 does not divide the FFN width 128"):
        apply_step(dense, GrowStep(op="moe", experts=6, top_k=3, mode="granular", granularity=3, router="random"))
    with pytest.raises(ConfigError, match="top_k=9 is more than the 4 experts"):
        apply_step(moe, GrowStep(op="top_k", top_k=9))
    with pytest.raises(ConfigError, match="narrower than the FFN"):
        apply_step(dense, GrowStep(op="ffn_width", width=64))
    with pytest.raises(ConfigError, match="router kmeans needs calibration text"):
        apply_step(dense, GrowStep(op="moe"))


@pytest.mark.parametrize(
    "family,step",
    [
        ("llama", GrowStep(op="moe", experts=4, top_k=2, mode="drop", drop_ratio=0.25, router="random")),
        ("mixtral", GrowStep(op="experts", factor=2, redraw=0.5)),
    ],
    ids=["drop-upcycling", "clones-redrawn"],
)
def test_diversity_deviation_matches_an_independent_recomputation(family, step):
    source = hub.tiny(family)
    blocks = tokens_for(source, n=4, length=32, seed=3)
    grown, report = apply_step(source, step, blocks, RELAXED)
    p = report.preservation
    assert report.kind == "diversity" and p.max_dlogit > 1e-2  # a deliberate change ...
    a, b = logits(source, blocks).double(), logits(grown, blocks).double()  # ... measured independently
    assert p.max_dlogit == pytest.approx((a - b).abs().max().item(), rel=1e-5)
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    assert p.kl == pytest.approx((la.exp() * (la - lb)).sum(-1).mean().item(), rel=1e-4)
    assert p.logit_cosine == pytest.approx(F.cosine_similarity(a, b, dim=-1).mean().item(), rel=1e-6)
    loss = lambda lp: F.nll_loss(lp[:, :-1].reshape(-1, lp.shape[-1]), blocks[:, 1:].reshape(-1)).item()  # noqa: E731
    assert p.loss_change == pytest.approx((loss(lb) - loss(la)) / loss(la), rel=1e-4)
    with pytest.raises(GrowthNotPreserved, match="FAILED"):  # the default thresholds reject this much change
        apply_step(source, step, blocks)


def test_router_kl_of_noisy_clones_matches_the_models_own_router_logits():
    source = hub.tiny("qwen3_moe")
    blocks = tokens_for(source, n=2, length=32, seed=4)
    grown, report = apply_step(source, GrowStep(op="experts", factor=2, noise=0.3), blocks, RELAXED)
    assert report.kind == "diversity"
    with torch.no_grad():  # transformers' own record of the routers' logits, per layer
        src = source(input_ids=blocks, output_router_logits=True).router_logits
        new = grown(input_ids=blocks, output_router_logits=True).router_logits
    kls = []
    for s, g in zip(src, new):
        p = F.softmax(s.double(), -1)
        q = F.softmax(g.double(), -1).reshape(len(p), -1, 2).sum(-1)  # clones 2e and 2e+1 came from expert e
        kls.append((p * (p.log() - q.log())).sum(-1).mean())
    assert report.preservation.router_kl == pytest.approx(torch.stack(kls).mean().item(), rel=1e-3)
    assert report.preservation.router_kl > 1e-4


def test_non_exact_modes_are_reported_not_failed():
    dense, moe = hub.tiny("qwen2"), hub.tiny("mixtral")
    blocks = tokens_for(dense, n=2, length=32)
    for model, step in (
        (dense, GrowStep(op="moe", experts=4, top_k=2, mode="partition", router="random")),
        (dense, GrowStep(op="depth", layer_map=[0, 1, 1])),
        (moe, GrowStep(op="top_k", top_k=3)),
    ):
        _, report = apply_step(model, step, blocks)
        assert report.kind == "changed" and report.preservation.passed and report.preservation.max_dlogit > 1e-3


def test_cloned_experts_share_their_parents_router_rows_and_weights():
    source = hub.tiny("qwen2_moe")
    grown, report = apply_step(source, GrowStep(op="experts", factor=2))
    a, g = arch.adapter_for(source), arch.adapter_for(grown)
    assert g.num_experts(0) == 2 * a.num_experts(0) and g.top_k(0) == 2 * a.top_k(0)
    assert grown.config.num_experts == 8 and grown.config.num_experts_per_tok == 4
    assert torch.equal(g.router(1).weight[5], a.router(1).weight[2])
    assert torch.equal(g.experts(1).down[5], a.experts(1).down[2])
    assert report.facts["origin"][1] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_identity_layers_go_where_asked_and_decode_with_a_kv_cache():
    assert evenly(30, 6) == [3, 8, 12, 16, 20, 25]  # after round(j · 30/7) - 1, j = 1..6
    source = hub.tiny("qwen2", layers=3)
    grown, report = apply_step(source, GrowStep(op="depth", at=[-1, 1]))
    g = arch.adapter_for(grown)
    assert g.num_layers == 5 and grown.config.num_hidden_layers == 5 and report.facts["new_layers"] == [0, 3]
    assert len(grown.config.layer_types) == 5
    assert all(torch.all(w == 0) for j in (0, 3) for w in g.residual_writers(j))
    assert [layer.self_attn.layer_idx for layer in g.layers] == [0, 1, 2, 3, 4]
    prompt = tokens_for(source, n=1, length=8)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=256)
    assert torch.equal(source.generate(prompt, **kwargs), grown.generate(prompt, **kwargs))  # KV slots renumbered


def test_kmeans_router_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:3] * 10
    x = torch.cat([c + 0.3 * torch.randn(100, 16, generator=g) for c in centres])
    rows = kmeans_rows(x, 3, torch.Generator().manual_seed(1))
    routed = (x @ rows.T).argmax(1).reshape(3, 100)
    assert all(len(set(r.tolist())) == 1 for r in routed) and len({int(r[0]) for r in routed}) == 3
    # a token at the mean norm gets logit 4·cos with its own centroid
    assert (x @ rows.T).max(1).values.mean().item() == pytest.approx(4.0, rel=0.05)


def test_granular_needs_renormalised_weights_to_be_exact():
    source = hub.tiny("qwen3")
    step = GrowStep(op="moe", experts=4, top_k=2, mode="granular", granularity=2, normalize=False, router="random")
    _, report = apply_step(source, step, tokens_for(source))
    assert report.kind == "changed" and report.preservation.max_dlogit > 1e-3
