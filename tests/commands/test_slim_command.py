"""`upcycle slim`: one-shot cuts and a progressive plan with recovery through the one trainer, a stock
folder that loads without upcycle, and bad input refused in one line with nothing written."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from tests.commands.test_errors import one_line_error

from upcycle import hub
from upcycle.cli import main
from upcycle.commands.slim import CutOptions, RunOptions, SlimConfig
from upcycle.commands.slim import run as slim_run
from upcycle.train import LossInputs
from upcycle.train.mtp import MTPHead, attach_mtp, detach_mtp, mtp_loss

FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
assert "upcycle" not in sys.modules
print(json.dumps({"cls": type(model).__name__, "layers": model.config.num_hidden_layers, "logits": out.tolist()}))
"""

TEXT = ["--calibration-tokens", "256", "--seq-len", "64"]


@pytest.fixture
def source(tmp_path):
    hub.save(hub.tiny("qwen3", layers=3), hub.byte_tokenizer(), tmp_path / "dense")
    return tmp_path / "dense"


def test_a_progressive_plan_cuts_recovers_and_reloads_without_upcycle(source, tmp_path, text_folder, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "stages": [
                    {
                        "name": "depth",
                        "cuts": [{"op": "depth", "layers": 1, "criterion": "block_influence"}],
                        "tokens": 512,
                    },
                    {"name": "width", "cuts": [{"op": "hidden", "hidden": 48}], "tokens": 512},
                ]
            }
        )
    )
    out = tmp_path / "slim"
    assert (
        main(
            [
                "slim",
                str(source),
                str(out),
                "--plan",
                str(plan),
                "--data",
                str(text_folder),
                "--calibration",
                str(text_folder),
                *TEXT,
                "--global-batch",
                "4",
                "--micro-batch",
                "4",
                "--no-progress",
                "--recovery",
                "kd_lm_mtp",
            ]
        )
        == 0
    ), capsys.readouterr().err
    report = json.loads((out / "slim_report.json").read_text())
    assert [c["step"] for c in report["cuts"]] == ["-1 layers by block_influence", "hidden → 48 by rmsnorm"]
    assert report["cuts"][1]["params_before"] == report["cuts"][0]["params_after"]  # the second cut saw the first
    metrics = [json.loads(line) for line in open(out / "recovery" / "metrics.jsonl")]
    assert {m["stage"] for m in metrics} == {"depth", "width"} and any("loss_mtp" in m for m in metrics)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    result = subprocess.run(
        [sys.executable, "-c", FRESH, str(out), json.dumps(ids.tolist())], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = json.loads(result.stdout)
    slim, _ = hub.load(out)
    with torch.no_grad():
        want = slim(input_ids=ids).logits
    assert fresh["cls"] == "Qwen3ForCausalLM" and fresh["layers"] == 2 and slim.config.hidden_size == 48
    assert (torch.tensor(fresh["logits"]) - want).abs().max().item() <= 1e-5
    assert not any("mtp" in k for k in slim.state_dict())  # the MTP head is a training aid, not exported


def test_a_one_shot_cut_from_the_python_api(tmp_path, text_folder):
    hub.save(hub.tiny("qwen2_moe", layers=2), hub.byte_tokenizer(), tmp_path / "moe")
    config = SlimConfig(calibration=str(text_folder), calibration_tokens=256, seq_len=64)
    cut = CutOptions(op="experts", experts=2, mode="partial", criterion="reap")
    result = slim_run(str(tmp_path / "moe"), str(tmp_path / "slim"), config, cut, RunOptions(progress=False))
    cut = result["cuts"][0]
    assert cut["params_after"] < cut["params_before"] and cut["ppl_after"] > 0
    slim, _ = hub.load(tmp_path / "slim")
    assert slim.config.num_experts == 2 and slim.config.num_experts_per_tok == 2


def test_a_plan_without_recompute_reads_the_sources_importance_in_training_stages(source, tmp_path, text_folder):
    stages = [
        {"name": "depth", "cuts": [{"op": "depth", "layers": 1, "criterion": "block_influence"}], "tokens": 256},
        {"name": "width", "cuts": [{"op": "hidden", "hidden": 48}], "tokens": 256},
    ]
    config = SlimConfig(
        stages=stages,
        recompute=False,
        data=str(text_folder),
        calibration=str(text_folder),
        calibration_tokens=256,
        seq_len=64,
        global_batch=4,
        micro_batch=4,
    )
    result = slim_run(str(source), str(tmp_path / "slim"), config, options=RunOptions(progress=False))
    assert [c["removed"]["importance_from"] for c in result["cuts"]] == ["source", "source"]
    again = slim_run(
        str(source),
        str(tmp_path / "again"),
        SlimConfig(**{**config.to_dict(), "recompute": True}),
        options=RunOptions(progress=False),
    )
    assert [c["removed"]["importance_from"] for c in again["cuts"]] == ["this model", "this model"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--op", "depth", "--layers", "3"], "layers=3 is not allowed: this model has 3 layers"),
        (["--op", "heads", "--heads", "3"], "a multiple of the 2 key/value heads"),
        (["--op", "experts", "--experts", "2"], "op experts needs a mixture-of-experts model"),
        (["--op", "experts", "--experts", "2", "--top-k", "3"], "top_k=3 is not allowed: at most experts=2"),
        (["--op", "depth"], "layers=0 is not allowed"),
        ([], "nothing to cut"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(source, tmp_path, text_folder, capsys, args, message):
    out = tmp_path / "new" / "slim"
    err = one_line_error(["slim", str(source), str(out), "--calibration", str(text_folder), *TEXT, *args], capsys)
    assert message in err
    assert not (tmp_path / "new").exists()


def test_mtp_head_starts_as_the_models_next_token_predictor_and_its_loss_is_its_formula():
    model = hub.tiny("llama", layers=2)
    attach_mtp(model)
    head = model.mtp_head
    assert isinstance(head, MTPHead) and torch.all(head.down.weight == 0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1]
    loss = mtp_loss(LossInputs(out.logits, ids, model=model, hidden_states=h))
    with torch.no_grad():  # independently: normalise, the [I, 0] projection, final norm, LM head, CE on t+2
        x = h[:, :-2]
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + head.norm_hidden.eps)
        logits = model.lm_head(model.model.norm(x))
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert head.down.weight.grad is not None and head.down.weight.grad.abs().sum() > 0
    detach_mtp(model)
    assert not hasattr(model, "mtp_head")
