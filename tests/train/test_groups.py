"""Canonical parameter groups: the same names on every family, and a run that trains only `ffn`
trains exactly the FFN / expert parameters."""

import re

import pytest
import torch

from conftest import ALL_FAMILIES
from upcycle import hub
from upcycle.arch import PARAMETER_GROUPS, adapter_for
from upcycle.errors import ConfigError
from upcycle.modules import BankSparsity, UpcycleSparseForCausalLM
from upcycle.train import TrainConfig, Trainer
from upcycle.train.config import GroupConfig

# independent of the adapter: what each group is, spelled as Hugging Face names (transformers 5)
EXPECTED = {
    "embeddings": r"embed_tokens\.",
    "lm_head": r"^lm_head\.",
    "attention": r"\.self_attn\.",
    "norms": r"(layernorm|^model\.norm)\.",
    "ffn": r"\.mlp\.(?!.*predictor)",
    "router": r"\.mlp\.gate\.",
    "experts": r"\.mlp\.experts\.",
    "shared_expert": r"\.mlp\.shared_expert(_gate)?\.",
    "predictor": r"\.predictor\.",
}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_canonical_groups_hold_the_parameters_their_names_say(family):
    model = hub.tiny(family)
    groups = adapter_for(model).parameter_groups()
    assert set(groups) == set(PARAMETER_GROUPS)
    names = [n for n, _ in model.named_parameters()]
    for group, pattern in EXPECTED.items():
        assert sorted(groups[group]) == sorted(n for n in names if re.search(pattern, n)), group
    assert groups["ffn"] and groups["attention"] and groups["embeddings"]
    if family in ("qwen2_moe", "qwen3_moe", "mixtral"):
        assert groups["router"] and groups["experts"]
    assert bool(groups["shared_expert"]) == (family == "qwen2_moe")


def test_the_predictor_is_its_own_group_not_part_of_ffn():
    sparse = UpcycleSparseForCausalLM.from_dense(hub.tiny("llama"), BankSparsity(32, 8, 4, predictor="lowrank"), [1])
    groups = adapter_for(sparse).parameter_groups()
    assert groups["predictor"] and all(".layers.1.mlp.predictor." in n for n in groups["predictor"])
    assert not set(groups["predictor"]) & set(groups["ffn"])
    assert "model.layers.1.mlp.gate_proj.weight" in groups["ffn"]


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_a_run_that_trains_only_ffn_changes_exactly_the_ffn_parameters(family, text_folder, tmp_path, tmp_cache):
    model, tok = hub.load(f"tiny-{family}")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(
        model=f"tiny-{family}",
        data=str(text_folder),
        out=str(tmp_path / "run"),
        seq_len=32,
        global_batch=4,
        micro_batch=2,
        lr=1e-2,
        warmup_steps=0,
        progress=False,
        val_blocks=2,
        ckpt_every=100,
        groups=[{"name": "ffn"}],
        stages=[{"name": "ffn-only", "tokens": 32 * 4 * 2, "train": ["ffn"]}],
    )
    Trainer(config, model=model, tokenizer=tok).fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n in before if ".mlp." in n}


def test_unknown_group_names_are_one_line_errors_listing_the_known_ones():
    with pytest.raises(ConfigError, match="group='fnn'.*attention, norms, ffn, router"):
        GroupConfig("fnn")
    with pytest.raises(ConfigError, match="parts='mlp'.*a canonical group"):
        GroupConfig("mine", parts=["embeddings", "mlp"])
    GroupConfig("mine", patterns=[r"\.mlp\."])  # regular expressions remain possible


def test_a_group_that_holds_nothing_on_this_model_is_an_error(text_folder, tmp_path, tmp_cache):
    config = TrainConfig(
        model="tiny-llama",
        data=str(text_folder),
        out=str(tmp_path / "run"),
        seq_len=32,
        global_batch=4,
        micro_batch=2,
        progress=False,
        groups=[{"name": "router"}],
        stages=[{"name": "s", "tokens": 32 * 4}],
    )
    with pytest.raises(ConfigError, match="router.*match no parameter"):
        Trainer(config).fit()
