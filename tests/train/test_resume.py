"""Crash safety and exact resume, with real SIGKILLs in a subprocess, and torchrun equivalence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from upcycle import hub
from upcycle.train import checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "train_and_die.py"


def write_config(tmp_path, text_folder, out, **changes):
    values = dict(
        model="tiny-llama",
        data=str(text_folder),
        out=str(out),
        seq_len=32,
        global_batch=4,
        micro_batch=1,
        lr=3e-3,
        warmup_steps=2,
        ckpt_every=3,
        progress=False,
        val_blocks=2,
        losses=[{"name": "lm"}, {"name": "kd", "weight": {"from": 1.0, "to": 0.5}}],
        teacher="self",
        stages=[{"name": "one", "tokens": 32 * 4 * 5}, {"name": "two", "tokens": 32 * 4 * 6}],
    )
    path = tmp_path / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump({**values, **changes}))
    return path


def run(*args, env=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=environment)


def step_losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "loss" in r]


@pytest.fixture
def reference(tmp_path, text_folder, tmp_cache):
    out = tmp_path / "uninterrupted"
    result = run(SCRIPT, write_config(tmp_path, text_folder, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return step_losses(out)


def test_sigkill_mid_training_then_resume_gives_the_same_losses(tmp_path, text_folder, tmp_cache, reference):
    out = tmp_path / "killed"
    cfg = write_config(tmp_path, text_folder, out)
    killed = run(SCRIPT, cfg, "--kill-after-step", 8)  # stage two, two steps after the step-6 checkpoint
    assert killed.returncode == -9
    assert checkpoint.load(checkpoint.latest(out))[2]["step"] == 6
    resumed = run(SCRIPT, cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert step_losses(out) == reference  # every step, exactly


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, text_folder, tmp_cache, reference):
    out = tmp_path / "killed-in-write"
    cfg = write_config(tmp_path, text_folder, out)
    killed = run(SCRIPT, cfg, "--kill-in-checkpoint-at-step", 6)
    assert killed.returncode == -9
    assert (out / "checkpoints" / ".tmp-step-000006").exists()  # the half-published one is there...
    last = checkpoint.latest(out)
    assert last.name == "step-000005"  # ...but `latest` still names the previous (end of stage one)
    model_sd, _, meta = checkpoint.load(last)
    model = hub.tiny("llama")
    model.load_state_dict(model_sd)  # loadable
    resumed = run(SCRIPT, cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert step_losses(out) == reference


def _torchrun(tmp_path, text_folder, mode):
    out = tmp_path / f"torchrun-{mode}"
    cfg = write_config(tmp_path, text_folder, out, distributed=mode, micro_batch=2)
    result = run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "upcycle.cli",
        "train",
        "--config",
        cfg,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, text_folder, tmp_cache, reference, mode):
    out = _torchrun(tmp_path, text_folder, mode)
    two = step_losses(out)
    assert [s for s, _ in two] == [s for s, _ in reference]
    for (_, a), (_, b) in zip(two, reference):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    # the distributed checkpoint is a plain full state dict: it loads into a single-process model
    model_sd, state, _ = checkpoint.load(checkpoint.latest(out))
    model = hub.tiny("llama")
    model.load_state_dict(model_sd)
    assert "model.layers.0.mlp.up_proj.weight" in state["optimizer"]["state"]
    final, _ = hub.load(out / "final")
    with torch.no_grad():
        ids = torch.randint(0, 256, (1, 16))
        assert torch.equal(final(input_ids=ids).logits, model(input_ids=ids).logits)
