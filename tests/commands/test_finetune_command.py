"""`upcycle finetune`: SEFT and masked fine-tuning end with exactly the pruned model's zeros in every
matrix and a stock folder; LoRA is dense again (and says so); LoRA* is re-pruned to the same count;
bad input refused in one line with nothing written."""

import json

import pytest
import torch
from tests.commands.test_errors import one_line_error
from tests.conftest import tokens_for

from upcycle import hub
from upcycle.cli import main
from upcycle.ops.prune import PruneSpec, prune

RUN = [
    "--task",
    "none",
    "--held-blocks",
    "2",
    "--seq-len",
    "32",
    "--global-batch",
    "4",
    "--micro-batch",
    "2",
    "--tokens",
    "640",
    "--lr",
    "1e-2",
    "--no-progress",
]


def _zeros(folder):
    model, _ = hub.load(folder)
    return {n: int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("proj.weight")}


@pytest.fixture
def pruned(tmp_path):
    model = hub.tiny("qwen2", layers=2)
    model, _ = prune(model, PruneSpec(method="wanda", sparsity=0.6), tokens_for(model, n=4, length=32))
    hub.save(model, hub.byte_tokenizer(), tmp_path / "pruned")
    return tmp_path / "pruned"


@pytest.mark.parametrize(
    "method",
    [
        ["--sparse", "seft", "--every", "2", "--window", "1", "--density", "0.05"],
        ["--sparse", "masked"],
        ["--lora", "4", "--lora-star"],
    ],
)
def test_sparse_methods_end_at_exactly_the_pruned_zeros(pruned, tmp_path, text_folder, capsys, method):
    out = tmp_path / "tuned"
    assert (
        main(["finetune", str(pruned), str(out), "--data", str(text_folder), "--held", str(text_folder), *RUN, *method])
        == 0
    ), capsys.readouterr().err
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["sparsity_exact"] and report["steps"] == 5
    assert _zeros(out) == _zeros(pruned)
    weights = {n: p for n, p in hub.load(out)[0].named_parameters()}
    source = {n: p for n, p in hub.load(pruned)[0].named_parameters()}
    assert any(not torch.equal(weights[n], source[n]) for n in weights if n.endswith("proj.weight"))  # it trained
    assert report["after"]["ppl"] < report["before"]["ppl"]
    if method[0] == "--sparse" and method[1] == "seft":
        assert (out / "run" / "seft.jsonl").exists() and report["trainable_params"] < 0.1 * sum(
            p.numel() for n, p in weights.items() if n.endswith("proj.weight")
        )


def test_lora_alone_is_dense_again_and_the_report_says_so(pruned, tmp_path, text_folder, capsys):
    out = tmp_path / "lora"
    assert (
        main(
            [
                "finetune",
                str(pruned),
                str(out),
                "--data",
                str(text_folder),
                "--held",
                str(text_folder),
                *RUN,
                "--lora",
                "4",
            ]
        )
        == 0
    ), capsys.readouterr().err
    report = json.loads((out / "finetune_report.json").read_text())
    assert not report["sparsity_exact"] and report["sparsity_after"] < 0.01
    assert (
        report["lora_params"]
        == report["trainable_params"]
        == 4
        * sum(  # r × (in + out) a matrix
            (m["in"] + m["out"]) for m in _shapes(pruned)
        )
    )


def _shapes(folder):
    model, _ = hub.load(folder)
    return [{"in": p.shape[1], "out": p.shape[0]} for n, p in model.named_parameters() if n.endswith("proj.weight")]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sparse", "seft", "--lora", "4"], "not both"),
        (["--lora-star"], "with --lora"),
        (["--sparse", "lottery"], "sparse"),
        (["--task", "none"], "data"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(pruned, tmp_path, capsys, args, message):
    out = tmp_path / "tuned"
    err = one_line_error(["finetune", str(pruned), str(out), *args], capsys)
    assert message in err and not out.exists()


def test_sparse_finetuning_of_a_dense_model_is_refused(tmp_path, text_folder, capsys):
    hub.save(hub.tiny("llama"), hub.byte_tokenizer(), tmp_path / "dense")
    out = tmp_path / "tuned"
    err = one_line_error(
        [
            "finetune",
            str(tmp_path / "dense"),
            str(out),
            "--data",
            str(text_folder),
            "--held",
            str(text_folder),
            *RUN,
            "--sparse",
            "seft",
        ],
        capsys,
    )
    assert "prune" in err and not out.exists()


def test_without_resurrection_no_update_grows_into_a_pruned_position(pruned, tmp_path, text_folder, capsys):
    seft = ["--sparse", "seft", "--every", "2", "--window", "1", "--density", "0.05"]
    resurrected = {}
    for flag in ("--resurrect", "--no-resurrect"):
        out = tmp_path / flag
        args = ["finetune", str(pruned), str(out), "--data", str(text_folder), "--held", str(text_folder), *RUN]
        assert main([*args, *seft, flag]) == 0, capsys.readouterr().err
        updates = [json.loads(line) for line in (out / "run" / "seft.jsonl").read_text().splitlines()]
        resurrected[flag] = sum(u.get("resurrected", 0) for u in updates)
        assert _zeros(out) == _zeros(pruned)
    assert resurrected["--resurrect"] > 0 and resurrected["--no-resurrect"] == 0
