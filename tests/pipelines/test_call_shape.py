"""Every verb's one call shape: `upcycle.<verb>(model, tokenizer, config)` returns a Result (model and a
typed report) and prints nothing; the command line and the Python call read the same defaults."""

import dataclasses
import typing

import pytest
import torch

import upcycle
from upcycle import hub
from upcycle.cli import VERBS, main
from upcycle.commandline import _fields, _signature, parse
from upcycle.config import RunOptions
from upcycle.modules import BankSparsity, UpcycleSparseForCausalLM
from upcycle.pipelines import Result


def _tiny(family="llama"):
    return hub.tiny(family, layers=2, hidden=64, ffn=128), hub.byte_tokenizer()


def _calibration(text_folder):
    return dict(calibration=str(text_folder), calibration_tokens=256, seq_len=64)


def _calls(text_folder):
    """verb -> (the call, what its result must hold): tiny models, a few steps each."""

    def sparsify():
        model, tok = _tiny()
        config = upcycle.SparsifyConfig(
            bank=32, keep=8, warmup_steps=2, convert_steps=2, convert_rows=64, group=16, **_calibration(text_folder)
        )
        return upcycle.sparsify(model, tok, config, progress=False), upcycle.pipelines.sparsify.SparsifyReport

    def grow():
        model, tok = _tiny()
        config = upcycle.GrowConfig(steps=[upcycle.GrowStep(op="depth", add=1)], **_calibration(text_folder))
        return upcycle.grow(model, tok, config, progress=False), upcycle.pipelines.grow.GrowReport

    def slim():
        model, tok = _tiny()
        config = upcycle.SlimConfig(
            stages=[upcycle.SlimStage(cuts=[upcycle.SlimStep(op="depth", layers=1)])], **_calibration(text_folder)
        )
        return upcycle.slim(model, tok, config, progress=False), upcycle.pipelines.slim.SlimReport

    def prune():
        model, tok = _tiny()
        config = upcycle.PruneConfig(spec=upcycle.PruneSpec(method="wanda", sparsity=0.5), **_calibration(text_folder))
        return upcycle.prune(model, tok, config, progress=False), upcycle.pipelines.prune.PruneReport

    def finetune():
        model, tok = _tiny()
        model, _ = upcycle.prune(
            model, tok, upcycle.PruneConfig(spec=upcycle.PruneSpec(method="magnitude")), progress=False
        )
        config = upcycle.FinetuneConfig(
            sparse="seft",
            task="none",
            data=str(text_folder),
            held=str(text_folder),
            held_blocks=2,
            tokens=512,
            seq_len=64,
            global_batch=4,
            micro_batch=4,
            every=1,
            window=1,
        )
        return upcycle.finetune(model, tok, config, progress=False), upcycle.pipelines.finetune.FinetuneReport

    def repair():
        dense, tok = _tiny()
        sparse = UpcycleSparseForCausalLM.from_dense(
            hub.tiny("llama", layers=2, hidden=64, ffn=128), BankSparsity(32, 8, 16, predictor="lowrank"), [0, 1]
        ).eval()
        config = upcycle.RepairConfig(
            lengths=(700,),
            samples=1,
            probe_source=str(text_folder),
            probe_tokens=96,
            train_source=str(text_folder),
            short_source=str(text_folder),
            seq_len=64,
            train_blocks=2,
            steps=2,
            control=False,
        )
        return upcycle.repair(sparse, tok, config, reference=dense, progress=False), dict

    return {"sparsify": sparsify, "grow": grow, "slim": slim, "prune": prune, "finetune": finetune, "repair": repair}


@pytest.mark.parametrize("verb", ["sparsify", "grow", "slim", "prune", "finetune", "repair"])
def test_every_verb_returns_a_result_and_prints_nothing(verb, text_folder, tmp_cache, capsys):
    result, report_type = _calls(text_folder)[verb]()
    assert capsys.readouterr().out == ""
    assert isinstance(result, Result) and isinstance(result.report, report_type)
    assert isinstance(result.model, torch.nn.Module)
    model, report = result  # unpacks as (model, report)
    assert model is result.model and report is result.report


@pytest.mark.parametrize("verb", VERBS)
def test_the_command_lines_defaults_are_the_python_defaults(verb):
    run, sections, params = _signature(verb)
    required = [n for n, (_, needed, positional) in params.items() if needed]
    argv = [verb] + [a for n in required for a in ((f"--{n}", "x") if not params[n][2] else ("x",))]
    if verb == "train":
        argv += ["--model", "x"]
    _, built, _ = parse(argv, VERBS)
    for name, cls in sections.items():
        if verb == "train":  # its one section is the run config, with a required model
            continue
        assert built[name] == cls(), (verb, name)  # every field: the CLI's value is the class's default
        default = typing.get_type_hints(run) and dataclasses.asdict(cls())
        assert dataclasses.asdict(built[name]) == default
    # and each option is declared once, in one section
    names = list(_fields(sections))
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "verb,config",
    [
        ("sparsify", upcycle.SparsifyConfig),
        ("grow", upcycle.GrowConfig),
        ("slim", upcycle.SlimConfig),
        ("prune", upcycle.PruneConfig),
        ("finetune", upcycle.FinetuneConfig),
        ("repair", upcycle.RepairConfig),
    ],
)
def test_the_command_and_the_python_call_take_the_same_config(verb, config):
    run, sections, _ = _signature(verb)
    assert sections["config"] is config
    assert sections.get("options", RunOptions) is RunOptions
    pipeline = getattr(upcycle, verb)
    assert typing.get_type_hints(pipeline)["config"] == config | None


def test_an_option_of_another_operator_is_one_line_naming_the_operators_options(capsys):
    assert main(["grow", "tiny-llama", "out-never-written", "--op", "depth", "--experts", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "upcycle: error: grow: experts does not apply to the depth operator; its options: seed, save, add, "
        "at, layer_map"
    )
    assert main(["slim", "tiny-llama", "out-never-written", "--op", "depth", "--layers", "1", "--hidden", "8"]) == 2
    assert "hidden does not apply to the depth operator; its options: criterion, layers" in capsys.readouterr().err


def test_the_python_steps_refuse_what_the_command_line_refuses():
    with pytest.raises(upcycle.UpcycleError, match="experts does not apply to the depth operator"):
        upcycle.GrowStep(op="depth", add=1, experts=8)
    with pytest.raises(upcycle.UpcycleError, match="width does not apply to the heads operator"):
        upcycle.SlimStep.from_dict({"op": "heads", "heads": 2, "width": 3}, "cuts[0]")
    step = upcycle.GrowStep(op="moe", experts=4)
    assert type(step).__name__ == "MoeStep" and step.to_dict()["op"] == "moe" and step.top_k == 2
    assert upcycle.GrowStep.from_dict(step.to_dict()) == step  # a plan's YAML round-trips
