"""`upcycle grow`: a plan applied and verified step by step, a stock folder that loads without upcycle,
and bad input refused in one line with nothing written."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from tests.commands.test_errors import one_line_error

from upcycle import hub
from upcycle.cli import main
from upcycle.commands.grow import GrowConfig, GrowStepOptions, RunOptions
from upcycle.commands.grow import run as grow_run

PLAN = {
    "steps": [
        {"op": "moe", "experts": 4, "top_k": 2, "mode": "shared", "routed": "partition"},
        {"op": "experts", "factor": 2, "save": True},
        {"op": "depth", "add": 1},
    ]
}

# a process that never imports upcycle: the grown folder must stand on transformers alone
FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    out = model(input_ids=ids).logits
assert "upcycle" not in sys.modules
print(json.dumps({"cls": type(model).__name__, "logits": out.tolist()}))
"""


@pytest.fixture
def source(tmp_path):
    hub.save(hub.tiny("llama", layers=3), hub.byte_tokenizer(), tmp_path / "dense")
    return tmp_path / "dense"


def test_a_plan_grows_verifies_and_reloads_without_upcycle(source, tmp_path, text_folder, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    out = tmp_path / "grown"
    assert (
        main(
            [
                "grow",
                str(source),
                str(out),
                "--plan",
                str(plan),
                "--calibration",
                str(text_folder),
                "--calibration-tokens",
                "512",
                "--seq-len",
                "64",
            ]
        )
        == 0
    ), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("— exact") == 3 and "step 3/3" in printed
    report = json.loads((out / "grow_report.json").read_text())
    assert [r["kind"] for r in report["reports"]] == ["exact"] * 3
    assert report["overall"]["equivalence"]["max_abs_logit"] <= 1e-4
    assert (out / "step-2" / "model.safetensors").exists() and (out / "grow_report.md").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] == 8
    assert config["num_experts_per_tok"] == 4 and config["num_hidden_layers"] == 4

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    result = subprocess.run(
        [sys.executable, "-c", FRESH, str(out), json.dumps(ids.tolist())], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    fresh = json.loads(result.stdout)
    dense, _ = hub.load(source)
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
    assert fresh["cls"] == "Qwen2MoeForCausalLM"
    assert (torch.tensor(fresh["logits"]) - expected).abs().max().item() <= 1e-4


def test_a_single_step_from_the_python_api(source, tmp_path, text_folder):
    config = GrowConfig(calibration=str(text_folder), calibration_tokens=256, seq_len=64)
    result = grow_run(
        str(source),
        str(tmp_path / "wide"),
        config,
        GrowStepOptions(op="ffn_width", width=192),
        options=RunOptions(progress=False),
    )
    assert result["reports"][0]["kind"] == "exact"
    wide, _ = hub.load(tmp_path / "wide")
    assert wide.config.intermediate_size == 192 and type(wide).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--op", "moe", "--experts", "4", "--top-k", "5"], "top_k=5 is not allowed: at most experts=4"),
        (["--op", "experts"], "op experts needs a mixture-of-experts model"),
        (["--op", "moe", "--mode", "mixture"], "mode='mixture' is not allowed"),
        (
            ["--op", "moe", "--mode", "granular", "--experts", "6", "--top-k", "3", "--granularity", "3"],
            "granularity=3 does not divide the FFN width 128",
        ),
        (["--op", "moe", "--family", "qwen3_moe"], "llama model cannot become qwen3_moe"),
        (["--op", "depth"], "give `add`"),
        ([], "nothing to grow"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(source, tmp_path, text_folder, capsys, args, message):
    out = tmp_path / "new" / "grown"
    err = one_line_error(
        [
            "grow",
            str(source),
            str(out),
            "--calibration",
            str(text_folder),
            "--calibration-tokens",
            "256",
            "--seq-len",
            "64",
            *args,
        ],
        capsys,
    )
    assert message in err
    assert not (tmp_path / "new").exists()


def test_a_failed_check_writes_nothing(source, tmp_path, text_folder, capsys):
    out = tmp_path / "grown"
    err = one_line_error(
        [
            "grow",
            str(source),
            str(out),
            "--op",
            "moe",
            "--mode",
            "drop",
            "--drop-ratio",
            "0.5",
            "--calibration",
            str(text_folder),
            "--calibration-tokens",
            "256",
            "--seq-len",
            "64",
        ],
        capsys,
    )
    assert "FAILED" in err and "mode drop" in err
    assert not out.exists()


def test_a_bad_plan_file(source, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("layers: 3\n")
    assert "must hold `steps:`" in one_line_error(
        ["grow", str(source), str(tmp_path / "o"), "--plan", str(plan)], capsys
    )
    plan.write_text("steps: [{op: grow-wings}]\n")
    assert "op='grow-wings' is not allowed" in one_line_error(
        ["grow", str(source), str(tmp_path / "o"), "--plan", str(plan)], capsys
    )
    assert not (tmp_path / "o").exists()


# one grown folder per target family and operator kind; all of them read back by one fresh process
TARGETS = [
    ("llama", {"op": "moe", "family": "mixtral", "experts": 4, "top_k": 2, "router": "random"}),
    ("qwen3", {"op": "moe", "experts": 4, "top_k": 2, "mode": "granular", "router": "random"}),
    ("qwen2", {"op": "moe", "experts": 4, "top_k": 1, "mode": "shared", "router": "random"}),
    ("mixtral", {"op": "experts", "factor": 2}),
    ("qwen3", {"op": "hidden", "factor": 2}),
    ("mistral", {"op": "depth", "add": 2}),
    ("qwen2_moe", {"op": "ffn_width", "width": 96}),
]

FRESH_MANY = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[folder] = [type(model).__name__, model(input_ids=ids).logits.tolist()]
assert "upcycle" not in sys.modules
print(json.dumps(out))
"""


def test_every_target_family_reloads_without_upcycle_with_the_sources_logits(tmp_path):
    from upcycle.ops.grow import GrowStep, apply_step

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    folders, expected = [], {}
    for n, (family, step) in enumerate(TARGETS):
        source = hub.tiny(family)
        grown, report = apply_step(source, GrowStep(**step))
        assert report.kind == "exact"
        folder = str(tmp_path / f"{n}-{family}-{step['op']}")
        hub.save(grown, None, folder)
        with torch.no_grad():
            expected[folder] = (type(grown).__name__, source(input_ids=ids).logits)
        folders.append(folder)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_MANY, json.dumps(ids.tolist()), *folders],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for folder, (cls, logits) in json.loads(result.stdout).items():
        assert cls == expected[folder][0]
        assert (torch.tensor(logits) - expected[folder][1]).abs().max().item() <= 1e-4, folder
