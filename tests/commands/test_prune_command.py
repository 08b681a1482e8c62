"""`upcycle prune`: a stock folder with exactly the promised zeros in every matrix, that loads without
upcycle and computes what the pruned model computed; bad input refused in one line with nothing written."""

import json
import subprocess
import sys

import pytest
import torch
from tests.commands.test_errors import one_line_error

from upcycle import hub
from upcycle.cli import main

FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
zeros = {n: int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("proj.weight")}
assert "upcycle" not in sys.modules
print(json.dumps({"zeros": zeros, "pruning": model.config.upcycle_pruning}))
"""

TEXT = ["--calibration-tokens", "512", "--seq-len", "64", "--no-progress"]


@pytest.fixture
def source(tmp_path):
    hub.save(hub.tiny("qwen3", layers=3), hub.byte_tokenizer(), tmp_path / "dense")
    return tmp_path / "dense"


@pytest.mark.parametrize("method,target", [("sparsegpt", ["--sparsity", "0.6"]), ("wanda", ["--nm", "2:4"])])
def test_prune_writes_a_stock_folder_with_the_reported_zeros(source, tmp_path, text_folder, capsys, method, target):
    out = tmp_path / "pruned"
    assert (
        main(["prune", str(source), str(out), "--method", method, *target, "--calibration", str(text_folder), *TEXT])
        == 0
    ), capsys.readouterr().err
    assert "every matrix's zeros as reported" in capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert report["exact"] and report["ppl_after"] > report["ppl_before"] * 0.5
    result = subprocess.run([sys.executable, "-c", FRESH, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = json.loads(result.stdout)
    assert fresh["pruning"]["method"] == method
    assert len(fresh["zeros"]) == len(report["matrices"]) == 3 * 7
    for name, m in report["matrices"].items():  # layers.0.self_attn.q_proj -> model.layers.0.self_attn.q_proj.weight
        assert fresh["zeros"][f"model.{name}.weight"] == m["zeros"], name
    assert sum(fresh["zeros"].values()) == report["target_zeros"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sparsity", "1.0"], "sparsity"),
        (["--nm", "4:2"], "N:M"),
        (["--method", "obs"], "method"),
        (["--nm", "3:7"], "divisible by 7"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(source, tmp_path, text_folder, capsys, args, message):
    out = tmp_path / "pruned"
    err = one_line_error(["prune", str(source), str(out), "--calibration", str(text_folder), *TEXT, *args], capsys)
    assert message in err and not out.exists()


def test_the_pruned_model_loads_in_upcycle_with_its_weights(source, tmp_path, text_folder):
    from upcycle.commands.prune import PruneConfig, PruneSpec, RunOptions, run

    out = tmp_path / "mag"
    run(
        str(source),
        str(out),
        PruneConfig(calibration=str(text_folder), calibration_tokens=512, seq_len=64),
        PruneSpec(method="magnitude", sparsity=0.5),
        RunOptions(progress=False),
    )
    model, _ = hub.load(out)
    w = model.model.layers[0].mlp.down_proj.weight
    original = hub.load(source)[0].model.layers[0].mlp.down_proj.weight
    assert int((w == 0).sum()) == w.numel() // 2
    assert torch.equal(w[w != 0], original[w != 0])
    for r in range(w.shape[0]):  # per output row, every kept weight is at least as large as every pruned one
        kept, pruned = original[r][w[r] != 0].abs(), original[r][w[r] == 0].abs()
        assert float(kept.min()) >= float(pruned.max())
