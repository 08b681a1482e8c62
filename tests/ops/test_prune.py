"""prune's masks and SparseGPT against independent computations (loops over a small matrix, the
least-squares optimum of a hand-worked 2-input case, magnitude pruning when the inputs are
uncorrelated), exact sparsity and intact N:M patterns on tiny models of every family, bad input refused."""

import itertools

import pytest
import torch
from tests.conftest import tokens_for

from upcycle import arch, hub
from upcycle.errors import ConfigError
from upcycle.ops.prune import PruneSpec, prune
from upcycle.ops.prune.masks import nm_holds, nm_mask, unstructured_mask, wanda_scores, zeros_in
from upcycle.ops.prune.sparsegpt import reconstruction_error, sparsegpt

ALL = list(arch.FAMILIES)


def _linears(model):
    adapter = arch.adapter_for(model)
    return {f"{i}.{name}": m.weight for i in range(adapter.num_layers) for name, m in adapter.linears(i).items()}


def test_wanda_mask_matches_a_loop_over_each_row():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=gen)
    x = torch.randn(40, 8, generator=gen) * torch.arange(1, 9)  # features of very different scale
    mask = unstructured_mask(wanda_scores(w, (x * x).sum(0)), 0.5, per="row")
    for r in range(5):
        score = [abs(float(w[r, j])) * float(x[:, j].norm()) for j in range(8)]
        lowest = sorted(range(8), key=lambda j: score[j])[:4]
        assert mask[r].nonzero().flatten().tolist() == sorted(lowest)


def test_nm_mask_keeps_the_n_largest_of_every_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.9, 0.1]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, False, False, True]]


def test_zero_counts_and_the_nm_check_agree_with_a_loop_over_the_groups():
    # 1,100 rows of 4,096: more than one block of rows is checked; the one violation is in the last row
    w = torch.randn(1100, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w.view(-1, 4)[:, :2] = 0  # 2:4 everywhere
    assert zeros_in(w) == sum(int(v == 0) for v in w.flatten().tolist())
    assert nm_holds(w, 2, 4) and not nm_holds(w, 1, 4)
    w[-1, 0] = 1.0
    assert not nm_holds(w, 2, 4) and int((w[-1, :4] != 0).sum()) == 3


def test_per_layer_mask_counts_ties_exactly():
    mask = unstructured_mask(torch.ones(3, 7), 0.5, per="layer")
    assert int(mask.sum()) == 11  # round half up of 10.5


def test_sparsegpt_on_two_correlated_inputs_gives_the_least_squares_weight():
    # y = a x0 + b x1 with E[x0²] = E[x1²] = 1, E[x0 x1] = r. Pruning the small weight a, the best b' minimises
    # E[(a x0 + b x1 − b' x1)²]: b' = b + a r (worked by hand). SparseGPT's OBS update must land there.
    a, b, r = 0.1, 2.0, 0.6
    w, h = torch.tensor([[a, b]]), torch.tensor([[1.0, r], [r, 1.0]])
    new, mask = sparsegpt(w, h, nm=(1, 2), damp=1e-9)
    assert mask.tolist() == [[True, False]]
    assert new[0, 0] == 0 and abs(float(new[0, 1]) - (b + a * r)) < 1e-5


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=gen)
    new, mask = sparsegpt(w, torch.eye(16), sparsity=0.5, block=16)
    expected = unstructured_mask(w.abs(), 0.5, per="layer")
    assert torch.equal(mask, expected) and torch.equal(new, w.masked_fill(expected, 0))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_on_the_same_rows(nm):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=gen)
    mix = torch.randn(64, 64, generator=gen) * 0.3 + torch.eye(64)
    x = torch.randn(512, 64, generator=gen) @ mix  # correlated inputs, as a layer's are
    h, norms = x.T @ x, (x * x).sum(0)
    pruned, mask = sparsegpt(w, h, sparsity=0.6, nm=nm, block=16)
    scores = wanda_scores(w, norms)
    wanda = w.masked_fill(nm_mask(scores, *nm) if nm else unstructured_mask(scores, 0.6, per="layer"), 0)
    assert int((pruned == 0).sum()) == int((wanda == 0).sum())
    assert reconstruction_error(w, pruned, x) < 0.8 * reconstruction_error(w, wanda, x)


@pytest.mark.parametrize("family,method", list(itertools.product(ALL, ["magnitude", "wanda", "sparsegpt"])))
def test_prune_reaches_the_exact_sparsity_of_every_matrix(family, method):
    model = hub.tiny(family)
    blocks = tokens_for(model, n=4, length=32)
    before = {k: v.clone() for k, v in _linears(model).items()}
    pruned, report = prune(model, PruneSpec(method=method, sparsity=0.7), blocks)
    weights = _linears(pruned)
    assert report.exact and set(report.matrices) == {f"layers.{k}" for k in weights}
    for name, w in weights.items():
        rows, cols = w.shape
        expected = rows * int(cols * 0.7 + 0.5) if method != "sparsegpt" else int(rows * cols * 0.7 + 0.5)
        assert int((w == 0).sum()) == expected, name
        if method != "sparsegpt":  # the kept weights are untouched
            assert torch.equal(w[w != 0], before[name][w != 0])
    assert all(torch.equal(w, _linears(model)[k]) for k, w in before.items())  # the source left alone


@pytest.mark.parametrize("family,method", list(itertools.product(ALL, ["wanda", "sparsegpt"])))
def test_nm_pattern_holds_in_every_matrix(family, method):
    model = hub.tiny(family)
    pruned, report = prune(model, PruneSpec(method=method, nm="2:4"), tokens_for(model, n=4, length=32))
    assert report.exact
    for name, w in _linears(pruned).items():
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2 and int((w == 0).sum()) == w.numel() // 2, name


def test_pruning_lowers_quality_less_with_calibration_than_without():
    model = hub.tiny("llama", layers=2)
    calibration, held = tokens_for(model, n=8, length=64, seed=0), tokens_for(model, n=8, length=64, seed=1)
    kl = {
        m: prune(model, PruneSpec(method=m, sparsity=0.6), calibration, held)[1].kl for m in ("magnitude", "sparsegpt")
    }
    assert kl["sparsegpt"] < kl["magnitude"]


@pytest.mark.parametrize(
    "spec,message",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(nm="4:4"), "N:M"),
        (dict(nm="2-4"), "N:M"),
        (dict(method="obs"), "method"),
    ],
)
def test_bad_specs_are_refused_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        PruneSpec(**spec)


def test_nm_on_a_width_it_cannot_group_is_refused_before_anything_changes():
    model = hub.tiny("llama", ffn=100)  # down_proj reads 100 inputs
    with pytest.raises(ConfigError, match="divisible by 8"):
        prune(model, PruneSpec(method="magnitude", nm="4:8"))


def test_wanda_without_calibration_is_refused():
    with pytest.raises(ConfigError, match="calibration"):
        prune(hub.tiny("llama"), PruneSpec(method="wanda"))


def test_in_place_pruning_gives_the_copys_weights_and_perplexities():
    model = hub.tiny("qwen2")
    calibration, held = tokens_for(model, n=4, length=32, seed=0), tokens_for(model, n=4, length=32, seed=1)
    spec = PruneSpec(method="sparsegpt", sparsity=0.5)
    copied, report = prune(model, spec, calibration, held)
    same, in_place = prune(hub.tiny("qwen2"), spec, calibration, held, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(_linears(copied).values(), _linears(same).values()))
    assert abs(in_place.ppl_after - report.ppl_after) < 1e-6 * report.ppl_after and in_place.kl is None


def test_nm_keeps_a_weights_own_zeros_and_calls_that_exact():
    """A group of 4 that already holds 3 zeros keeps them under 2:4: one more zero than the target count.
    The pattern holds, so the report calls it exact (an unstructured target counts such zeros instead)."""
    model = hub.tiny("llama")
    first = next(iter(_linears(model)))
    with torch.no_grad():
        _linears(model)[first][0, :3] = 0.0  # one group: three zeros of its own
    pruned, report = prune(model, PruneSpec(method="magnitude", nm="2:4"))
    w = _linears(pruned)[first]
    assert int((w == 0).sum()) == w.numel() // 2 + 1
    assert report.zeros == report.target_zeros + 1 and report.pattern_holds and report.exact
    assert "the pattern in every matrix" in report.line()
