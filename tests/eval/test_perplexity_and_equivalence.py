import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tokens_for
from upcycle import hub
from upcycle.eval import compare, perplexity


def test_perplexity_matches_a_hand_computation():
    model = hub.tiny("qwen2")
    blocks = tokens_for(model, n=5, length=17)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=blocks).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, blocks[:, 1:, None]).mean().item()
    result = perplexity(model, blocks, batch_size=2, progress=False)
    assert result.tokens == 5 * 16
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert result.bits_per_token == pytest.approx(nll / math.log(2), rel=1e-5)


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary():
    model = hub.tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = perplexity(model, tokens_for(model), progress=False)
    assert result.ppl == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size():
    model = hub.tiny("mistral")
    blocks = tokens_for(model, n=6)
    a = perplexity(model, blocks, batch_size=1, progress=False)
    b = perplexity(model, blocks, batch_size=6, progress=False)
    assert a.nll == pytest.approx(b.nll, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_equivalence_of_a_model_with_itself(family):
    model = hub.tiny(family)
    check = compare(model, hub.tiny(family), tokens_for(model))
    assert check.max_abs_logit == 0 and check.mean_kl == 0 and check.top1_agreement == 1
    assert check.preserved()


def test_equivalence_flags_a_perturbed_weight():
    reference, candidate = hub.tiny("qwen3"), hub.tiny("qwen3")
    with torch.no_grad():
        candidate.model.layers[1].mlp.down_proj.weight[3, 7] += 0.5
    check = compare(reference, candidate, tokens_for(reference))
    assert not check.preserved()
    assert check.max_abs_logit > 1e-3 and check.mean_kl > 0
    # an independent bound: the perturbed logits really differ by the reported maximum
    with torch.no_grad():
        ids = tokens_for(reference)
        diff = (reference(input_ids=ids).logits - candidate(input_ids=ids).logits).abs().max().item()
    assert check.max_abs_logit == pytest.approx(diff, rel=1e-6)
