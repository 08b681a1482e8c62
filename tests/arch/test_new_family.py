"""Adding a model family is one adapter class and one registry line: a toy family defined here goes
through grow, slim, prune and sparsify on a tiny model, each checked against an independent computation."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import upcycle
from upcycle import arch, hub
from upcycle.eval import compare
from upcycle.modules import BankSparseFFN


class ToyConfig(LlamaConfig):  # the transformers side: a family transformers knows by model_type
    model_type = "toy_llama"


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig


AutoConfig.register("toy_llama", ToyConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)


# ---- upcycle's side: one class ...
class Toy(arch.families.DenseSwiGLU):
    family, model_types, moe_targets = "toy_llama", ("toy_llama",), ("mixtral",)


@pytest.fixture
def toy():
    arch.register(Toy)  # ... and one registry line (undone after the test: other tests run over the shipped families)
    yield hub.tiny("toy_llama", layers=3, hidden=64, ffn=128), hub.byte_tokenizer()
    arch.FAMILIES.pop("toy_llama")


def _calibration(text_folder):
    return dict(calibration=str(text_folder), calibration_tokens=256, seq_len=64)


def test_the_toy_is_a_family(toy):
    model, _ = toy
    assert type(model) is ToyForCausalLM and type(arch.adapter_for(model)) is Toy
    assert "toy_llama" in arch.dense_families() and "tiny-toy_llama" in hub.builtin_names()


def test_grow_the_toy_into_its_moe_target_exactly(toy, text_folder):
    model, tok = toy
    step = upcycle.GrowStep(op="moe", experts=4, top_k=2, mode="copy", router="random")
    grown, report = upcycle.grow(
        model, tok, upcycle.GrowConfig(steps=[step], **_calibration(text_folder)), progress=False
    )
    assert grown.config.model_type == "mixtral" and report.reports[0].kind == "exact"
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    assert compare(model, grown, ids).max_abs_logit < 1e-4  # copies of the FFN, renormalised: the same function


def test_slim_the_toy_by_a_layer(toy, text_folder):
    model, tok = toy
    cut = upcycle.SlimStep(op="depth", layers=1, criterion="last")
    slim, report = upcycle.slim(
        model,
        tok,
        upcycle.SlimConfig(stages=[upcycle.SlimStage(cuts=[cut])], **_calibration(text_folder)),
        progress=False,
    )
    assert type(slim) is ToyForCausalLM and slim.config.num_hidden_layers == 2
    # "last" drops the last layer: the first two layers are the source's, weight for weight
    for name, p in slim.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name


def test_prune_the_toy_to_half_its_weights(toy, text_folder):
    model, tok = toy
    pruned, report = upcycle.prune(
        model,
        tok,
        upcycle.PruneConfig(spec=upcycle.PruneSpec(method="magnitude"), **_calibration(text_folder)),
        progress=False,
    )
    w, original = pruned.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight
    assert int((w == 0).sum()) == w.numel() // 2
    kept_per_row = original.abs().topk(w.shape[1] // 2, dim=1).indices  # magnitude, per row: by hand
    assert torch.equal(torch.zeros_like(w).scatter(1, kept_per_row, 1.0).bool(), w != 0)


def test_sparsify_the_toy_at_full_keep_is_the_dense_function(toy, text_folder):
    model, tok = toy
    sparse, report = upcycle.sparsify(
        model,
        tok,
        upcycle.SparsifyConfig(
            bank=32, keep=32, group=16, warmup_steps=0, convert_steps=0, **_calibration(text_folder)
        ),
        progress=False,
    )
    assert sparse.config.base_model_type == "toy_llama" and report.layers == [0, 1, 2]
    assert all(isinstance(arch.adapter_for(sparse).ffn(i), BankSparseFFN) for i in range(3))
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    assert compare(model, sparse, ids).max_abs_logit < 1e-4
