"""Every paper's headline claims re-run from one command, at budgets that can tell, judged on paired seeds.

    python benchmarks/reproduce.py                      # every part not finished yet (hours; resumable)
    python benchmarks/reproduce.py --paper seft         # one part
    python benchmarks/reproduce.py --paper seft --redo  # a finished part run again
    make reproduce                                      # the first line
    python docs/tables.py                               # the docs' claim tables, from claims.json

Writes benchmarks/results/claims.json: for each claim its statement, the figures per seed, the seeds, the
paired margin (mean and spread of the per-seed differences, how many seeds agree), the verdict, the command
that re-runs it, the commit and the part's wall time. Nothing in it is carried over from another run: a part
that has not run has no claims. Each run of a part is kept (its report and the settings that made it, not
its weights) under runs/reproduce/<part>/, so an interrupted part resumes where it stopped.

Parts so far:
  seft  SEFT (arXiv 2505.24037) on SmolLM2-135M pruned by Wanda to 50 % and 2:4: SEFT, masked full
        fine-tuning, LoRA and LoRA* (LoRA re-pruned by Wanda), and SEFT with its positions fixed and without
        resurrection; 100 optimizer steps per arm (10 topology updates), each learning rate chosen from one
        sweep on a validation draw of the task, three seeds for every arm a claim compares.
  grow  state-preserving growth (arXiv 2606.07404) on SmolLM2-135M: dense -> MoE (the dense FFN as shared
        expert, 8 routed experts of its own neurons active from step 0, k-means router) trained against the
        same architecture from scratch and the dense model continued, on the same tokens, three seeds, every
        run timed in a process of its own; and a lineage through the trainer's stages — dense -> MoE, train,
        experts x2, train — with every growth step's check against the model trained before it.
  slim  SlimQwen (arXiv 2605.08738): slim.py's dense cuts (20 layers x hidden 432) recovered by each loss and
        schedule with three seeds (MTP's weight decaying), and the expert criteria (frequency, soft, REAP x
        prune, merge, partial) on the grow part's trained MoE, whose experts carry weight: one shot, and
        recovered with three seeds.
  repair  a sparsified SmolLM2-135M's long-context failure localised to a layer and repaired there, scored on
        CWE with one common word at 512 and 1,024 tokens, 24 prompts each: dense, sparse, the localised layer
        repaired and, as the control, a random layer repaired; RULER's CWE configuration (10 common words x
        30, every other word x 3) on the dense model, to show where it stands.
  sparsify  the flagship's headline (arXiv's predictor-gated bank-sparse FFN): SmolLM2-135M made 16-of-64
        bank-sparse (the 4-bit GPTQ shadow predictor, layer-wise conversion) and trained, against the dense
        model continued and a dense model with a quarter of the FFN width trained alike, on the same
        98,304 tokens: every arm run here, none carried over.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import harness
from harness import RESULTS, VERDICTS, child, child_done, load, mark, paired, provenance, reused, save, upcycle

RUNS = Path(__file__).resolve().parents[1] / "runs" / "reproduce"  # wherever the command is run from
COMMAND = "python benchmarks/reproduce.py --paper {part}"
SPENT: list[float] = []  # the wall time of every run a part used, kept ones included: its time when run whole


def spent(result: dict) -> dict:
    SPENT.append(result["seconds"])
    return result


def child_run(folder: Path, settings: dict, *args: str, what: str, keep: tuple[str, ...] = (), before=None) -> dict:
    """A run of a part in a process of its own (this script's `--child ARGS FOLDER`): its result and wall
    time, kept in `folder` and in the ledger with the settings that made it (the same settings later: the
    kept result, never run again), the run's checkpoints and models deleted once its figures are taken. A run
    stopped part-way with the same settings keeps its folder, so a run that checkpoints resumes there.
    `before()` is called only when the run is made (e.g. to make the model it reads)."""
    done = reused(folder, settings, "result.json")
    if done is not None:
        return spent(done)
    if before is not None:
        before()
    if reused(folder, settings, "bench_settings.json") is None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        mark(folder, settings)
    started = time.perf_counter()
    result = child(__file__, *args, str(folder))
    if "error" in result:
        raise SystemExit(f"{what} failed: {result['error']}")
    result["seconds"] = time.perf_counter() - started
    for run in [folder, *(d for d in folder.iterdir() if d.is_dir())]:
        for heavy in {"checkpoints", "final"} - set(keep):  # a 135M MoE is ~1 GB a run: figures in result.json
            shutil.rmtree(run / heavy, ignore_errors=True)
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    mark(folder, settings, "result.json")
    return spent(result)


# ---- SEFT ---------------------------------------------------------------------------------------------
SEFT = {
    "model": "smollm2-135m",
    "steps": 100,  # optimizer steps of every arm
    "seq_len": 128,  # shorter sequences and batches than the earlier 256 x 8: 100 steps (51,200 tokens) in
    "global_batch": 4,  # about the time 25 took, so every arm of the sweep and the seeds fits the budget
    "every": 10,  # a topology update every 10 steps: 10 updates in 100 steps (the last at the end)
    "window": 2,
    "lr_sweep": [1e-4, 3e-4, 1e-3],
    "seeds": [0, 1, 2],
    "targets": ["50", "2:4"],
    "eval_examples": 96,  # the task's test draw, reported
    "validation_examples": 96,  # another draw, for choosing the learning rate only
}
SEFT_ARGS = ["--sparse", "seft", "--budget-rank", "16", "--every", str(SEFT["every"]), "--window", str(SEFT["window"])]
ARMS = {
    "seft": SEFT_ARGS,
    "seft_fixed_positions": [*SEFT_ARGS, "--drop", "0"],  # no drop, so no growth: the deltas never move
    "seft_no_resurrection": [*SEFT_ARGS, "--no-resurrect"],  # growth on the live positions only
    "masked": ["--sparse", "masked"],  # full fine-tuning with the mask fixed (SPP/SQFT's memory class)
    "lora": ["--lora", "16"],
    "lora_star": ["--lora", "16", "--lora-star"],  # LoRA merged, then re-pruned by Wanda: SEFT's baseline
}
SWEPT = ("seft", "masked", "lora_star")  # each takes its own learning rate from the sweep
LR_FROM = {"seft_fixed_positions": "seft", "seft_no_resurrection": "seft", "lora": "lora_star"}  # same training
SEEDED = ("seft", "lora_star", "seft_fixed_positions", "seft_no_resurrection")  # the arms a claim compares


def seft_source(target: str) -> Path:
    """SmolLM2-135M pruned by Wanda to `target` (calibrated on 128 × 256 tokens, upcycle's defaults)."""
    folder = RUNS / "seft" / f"source-wanda-{target.replace(':', 'of')}"
    if not ((folder / "seconds.json").exists() and (folder / "config.json").exists()):
        spec = ["--nm", target] if ":" in target else ["--sparsity", str(int(target) / 100)]
        started = time.perf_counter()
        out = upcycle("prune", SEFT["model"], folder, "--method", "wanda", *spec, "--calibration-tokens", "32768")
        if isinstance(out, dict):
            raise SystemExit(f"pruning the SEFT source failed: {out['error']}")
        (folder / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
        mark(folder, {"target": target}, "seconds.json")
    return folder


def seft_source_seconds(target: str) -> dict:
    """The source's pruning time, from the ledger where it was made on another machine (no weights made)."""
    folder = RUNS / "seft" / f"source-wanda-{target.replace(':', 'of')}"
    return reused(folder, {"target": target}, "seconds.json") or json.loads(
        (seft_source(target) / "seconds.json").read_text()
    )


def seft_run(target: str, arm: str, lr: float, seed: int, validate: bool = False) -> dict:
    """One fine-tuning run in a process of its own: its report (figures and training memory) and wall time.
    The run's weights are deleted once scored (36 runs of a 135M model would be 20 GB); its report stays.
    `validate`: the sweep's runs also score the validation draw (the others do not need it)."""
    out = RUNS / "seft" / f"{target.replace(':', 'of')}-{arm}-lr{lr:g}-s{seed}"
    validation = SEFT["validation_examples"] if validate else 0
    settings = {"arm": ARMS[arm], "lr": lr, "seed": seed} | {k: SEFT[k] for k in ("steps", "seq_len", "global_batch")}
    settings |= {"eval_examples": SEFT["eval_examples"], "validation_examples": validation}
    done = reused(out, settings, "finetune_report.json")
    if done is not None:
        return spent(done)
    tokens = SEFT["steps"] * SEFT["global_batch"] * SEFT["seq_len"]
    started = time.perf_counter()
    run = upcycle("finetune", seft_source(target), out, *ARMS[arm], "--lr", lr, "--tokens", tokens, "--seed", seed,
                  "--seq-len", SEFT["seq_len"], "--global-batch", SEFT["global_batch"],
                  "--eval-examples", SEFT["eval_examples"], "--validation-examples", validation)  # fmt: skip
    if isinstance(run, dict):
        raise SystemExit(f"SEFT part: {target} {arm} lr {lr:g} seed {seed} failed: {run['error']}")
    report = json.loads((out / "finetune_report.json").read_text()) | {"seconds": time.perf_counter() - started}
    (out / "finetune_report.json").write_text(json.dumps(report, indent=2))
    for weights in out.glob("*.safetensors"):
        weights.unlink()
    mark(out, settings, "finetune_report.json")
    print(f"  seft {target} {arm} lr {lr:g} seed {seed}: {_brief(report)}", flush=True)
    return spent(report)


def _brief(report: dict) -> str:
    after = report["after"]
    return (
        f"exact match {after['task_accuracy']:.3f} (validation {after.get('validation_accuracy', float('nan')):.3f}),"
        f" ppl {after['ppl']:.2f}, {report['seconds']:.0f} s"
    )


def seft_part() -> tuple[dict, list[dict]]:
    """(the `seft` section of claims.json, its claims)."""
    section = {"setup": SEFT, "steps_per_arm": SEFT["steps"], "lr_sweep": {}, "arms": {}}
    claims = []
    for target in SEFT["targets"]:
        spent(seft_source_seconds(target))
        sweep = {arm: {f"{lr:g}": seft_run(target, arm, lr, 0, True) for lr in SEFT["lr_sweep"]} for arm in SWEPT}
        chosen = {arm: max(runs, key=lambda lr: _validation_key(runs[lr])) for arm, runs in sweep.items()}
        chosen |= {arm: chosen[source] for arm, source in LR_FROM.items()}
        section["lr_sweep"][target] = {
            "validation_accuracy": {
                arm: {lr: r["after"]["validation_accuracy"] for lr, r in runs.items()} for arm, runs in sweep.items()
            },  # fmt: skip
            "validation_ppl": {arm: {lr: r["after"]["ppl"] for lr, r in runs.items()} for arm, runs in sweep.items()},
            "chosen": chosen,
            "rule": "the highest exact match on the validation draw; ties by the lower held-out perplexity; the "
            "ablations take SEFT's rate and LoRA LoRA*'s (the same training)",
        }
        arms = {}
        for arm in ARMS:
            if arm == "seft_no_resurrection" and ":" in target:
                continue  # N:M growth stays on live positions anyway: the same run as SEFT's
            seeds = SEFT["seeds"] if arm in SEEDED else SEFT["seeds"][:1]
            # a swept arm's seed-0 run at its chosen rate is the sweep's own run (validated), kept
            runs = [seft_run(target, arm, float(chosen[arm]), seed, arm in SWEPT and seed == 0) for seed in seeds]
            arms[arm] = _arm_figures(runs, seeds, chosen[arm])
        section["arms"][target] = arms
        claims += _seft_claims(target, arms)
    section["ablation_fixed_positions"] = {
        t: {k: section["arms"][t][a] for k, a in (("seft", "seft"), ("fixed", "seft_fixed_positions"))}
        for t in SEFT["targets"]
    }
    return section, claims


def _validation_key(report: dict) -> tuple:
    return report["after"]["validation_accuracy"], -report["after"]["ppl"]


def _arm_figures(runs: list[dict], seeds: list[int], lr: str) -> dict:
    first = runs[0]
    return {
        "lr": float(lr),
        "seeds": seeds,
        "task_accuracy": [r["after"]["task_accuracy"] for r in runs],
        "ppl": [r["after"]["ppl"] for r in runs],
        "before": first["before"],
        "sparsity_exact": all(r["sparsity_exact"] for r in runs),
        "train_peak_rss_mb": first.get("train_peak_rss_mb"),
        "s_per_step": first.get("s_per_step"),
        "steps": first.get("steps"),
        "seconds": [round(r["seconds"], 1) for r in runs],
    }


def _seft_claims(target: str, arms: dict) -> list[dict]:
    where = f"at {target} %" if ":" not in target else f"at {target}"
    pairs = [
        ("seft", "lora_star", "SEFT ≥ LoRA* (LoRA, merged, re-pruned by Wanda)"),
        ("seft", "seft_fixed_positions", "SEFT's drop-and-grow beats its deltas at fixed positions"),
        ("seft", "seft_no_resurrection", "SEFT's growth into pruned positions (resurrection) helps"),
    ]
    claims = []
    for a, b, statement in pairs:
        if a not in arms or b not in arms:
            continue
        for metric, higher in (("task_accuracy", True), ("ppl", False)):
            judged = paired(arms[a][metric], arms[b][metric], higher_better=higher)
            claims.append({
                "paper": "seft",
                "claim": f"{statement} {where}, in {'task exact match' if higher else 'held-out perplexity'}",
                "verdict": judged["verdict"],
                "seeds": arms[a]["seeds"],
                "margin": {k: judged[k] for k in ("mean", "spread", "agree", "diffs")},
                "figures": {a: arms[a][metric], b: arms[b][metric]},
            })  # fmt: skip
    return claims


# ---- grow ---------------------------------------------------------------------------------------------
GROW = {
    "model": "smollm2-135m",
    "text": "shakespeare+pystdlib",
    "tokens": 65536,  # training tokens of every run: 32 steps of 8 x 256
    "seq_len": 256,
    "global_batch": 8,
    "lr": 3e-4,
    "seeds": [0, 1, 2],
    "held_blocks": 16,  # validation blocks every run is scored on
    # the seed's dense -> MoE: the dense FFN as shared expert, routed experts of its own neurons that carry
    # weight from step 0 (a changed step: its cost at step 0 is measured), k-means router
    "moe": {"op": "moe", "family": "qwen2_moe", "mode": "shared", "active": True, "experts": 8, "top_k": 2},
    "lineage_second": {"op": "experts", "factor": 2},
}
ROUTER_TERMS = [{"name": "lm"}, {"name": "balance", "weight": 0.01}, {"name": "router_z", "weight": 0.001}]
GROW_ARMS = ("grown", "scratch", "dense_continued")


def grow_run(arm: str, seed: int) -> dict:
    """One training run of the grow part in a process of its own (its time and memory its own)."""
    settings = {k: GROW[k] for k in ("tokens", "seq_len", "global_batch", "lr", "moe", "held_blocks")}
    result = child_run(RUNS / "grow" / f"{arm}-s{seed}", settings | {"arm": arm, "seed": seed},
                       "grow", arm, str(seed), what=f"grow part: {arm} seed {seed}")  # fmt: skip
    print(f"  grow {arm} seed {seed}: ppl {result['start_ppl']:.2f} -> {result['final_ppl']:.2f}, "
          f"{result['seconds']:.0f} s", flush=True)  # fmt: skip
    return result


def _grow_child(arm: str, seed: str, out: str, out_json: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from upcycle import data, hub
    from upcycle.eval import perplexity
    from upcycle.ops.grow import GrowChecks, GrowStep, apply_step
    from upcycle.train import TrainConfig, Trainer

    seed_ = int(seed)
    dense, tokenizer = hub.load(GROW["model"])
    held = data.blocks(GROW["text"], tokenizer, "validation", GROW["seq_len"], max_blocks=GROW["held_blocks"])
    calibration = data.blocks(GROW["text"], tokenizer, "train", GROW["seq_len"], max_blocks=32)
    growth = None
    if arm == "dense_continued":
        model, losses = dense, [{"name": "lm"}]
    else:
        step = GrowStep.from_dict(GROW["moe"] | {"seed": seed_})
        relaxed = GrowChecks(max_loss_change=100.0, min_logit_cosine=-1.0, max_router_kl=100.0)
        grown, report = apply_step(dense, step, held, relaxed, calibration=calibration)
        growth = report.as_dict()
        model, losses = grown, ROUTER_TERMS
        if arm == "scratch":
            torch.manual_seed(seed_)
            model = AutoModelForCausalLM.from_config(grown.config)
    start_ppl = perplexity(model, held, progress=False).ppl
    config = TrainConfig.from_dict(dict(
        model=GROW["model"], data=GROW["text"], out=out, seed=seed_, seq_len=GROW["seq_len"],
        global_batch=GROW["global_batch"], micro_batch=4, lr=GROW["lr"], warmup_steps=2, ckpt_every=1_000_000,
        losses=losses, stages=[{"name": "main", "tokens": GROW["tokens"]}], progress=False,
    ))  # fmt: skip
    started = time.perf_counter()
    Trainer(config, model=model, tokenizer=tokenizer).fit()
    train_seconds = time.perf_counter() - started
    final_ppl = perplexity(model, held, progress=False).ppl
    params = sum(p.numel() for p in model.parameters())
    child_done(out_json, {"start_ppl": start_ppl, "final_ppl": final_ppl, "train_seconds": train_seconds,
                          "params": params, "growth": growth})  # fmt: skip


def grow_lineage() -> dict:
    settings = {k: GROW[k] for k in ("tokens", "seq_len", "global_batch", "lr", "moe", "lineage_second")}
    return child_run(RUNS / "grow" / "lineage", settings, "lineage", "-", "0", what="grow part: the lineage")


def _lineage_child(out: str, out_json: str) -> None:
    from upcycle import data, hub
    from upcycle.eval import perplexity
    from upcycle.train import TrainConfig, Trainer
    from upcycle.train.trainer import Callback

    dense, tokenizer = hub.load(GROW["model"])
    held = data.blocks(GROW["text"], tokenizer, "validation", GROW["seq_len"], max_blocks=GROW["held_blocks"])

    class Scores(Callback):  # held-out perplexity as each stage starts (grown) and ends (trained)
        def __init__(self):
            self.at = []

        def on_stage_start(self, trainer):
            self.at.append({"stage": trainer.progress.stage_index, "when": "start (after growth)",
                            "ppl": perplexity(trainer.model, held, progress=False).ppl})  # fmt: skip

        def on_stage_end(self, trainer):
            self.at.append({"stage": trainer.progress.stage_index, "when": "end (trained)",
                            "ppl": perplexity(trainer.model, held, progress=False).ppl})  # fmt: skip

    relaxed = {"max_loss_change": 100.0, "min_logit_cosine": -1.0, "max_router_kl": 100.0}  # measure, never stop
    grow = {"calibration": GROW["text"], "checks": relaxed}
    config = TrainConfig.from_dict(dict(
        model=GROW["model"], data=GROW["text"], out=out, seed=0, seq_len=GROW["seq_len"],
        global_batch=GROW["global_batch"], micro_batch=4, lr=GROW["lr"], warmup_steps=2, ckpt_every=1_000_000,
        losses=ROUTER_TERMS, progress=False,
        stages=[
            {"name": "moe", "tokens": GROW["tokens"], "transform": "grow",
             "transform_options": grow | {"steps": [GROW["moe"]]}},
            {"name": "more_experts", "tokens": GROW["tokens"], "transform": "grow",
             "transform_options": grow | {"steps": [GROW["lineage_second"]]}},
        ],
    ))  # fmt: skip
    scores = Scores()
    trainer = Trainer(config, model=dense, tokenizer=tokenizer, callbacks=[scores])
    started = time.perf_counter()
    trainer.fit()
    steps = [r.as_dict() for name in ("moe", "more_experts") for r in trainer.stage_reports[name]]
    child_done(out_json, {"steps": steps, "ppl": scores.at, "train_seconds": time.perf_counter() - started})


def grow_part() -> tuple[dict, list[dict]]:
    runs = {arm: [grow_run(arm, seed) for seed in GROW["seeds"]] for arm in GROW_ARMS}
    arms = {
        arm: {
            "seeds": GROW["seeds"],
            "final_ppl": [r["final_ppl"] for r in rs],
            "start_ppl": [r["start_ppl"] for r in rs],
            "seconds": [round(r["seconds"], 1) for r in rs],
            "train_seconds": [round(r["train_seconds"], 1) for r in rs],
            "params": rs[0]["params"],
        }
        for arm, rs in runs.items()
    }
    growth = [r["growth"]["preservation"] for r in runs["grown"]]
    lineage = grow_lineage()
    section = {"setup": GROW, "seeds": GROW["seeds"], "arms": arms, "growth_at_step_0": growth, "lineage": lineage}
    claims = []
    for other, statement in (
        ("scratch", "a grown MoE (routed experts active from step 0) beats the same architecture from scratch"),
        ("dense_continued", "a grown MoE beats the dense model continued on the same tokens"),
    ):
        judged = paired(arms["grown"]["final_ppl"], arms[other]["final_ppl"], higher_better=False)
        claims.append({
            "paper": "grow",
            "claim": f"{statement} ({GROW['tokens']:,} tokens, held-out perplexity)",
            "verdict": judged["verdict"],
            "seeds": GROW["seeds"],
            "margin": {k: judged[k] for k in ("mean", "spread", "agree", "diffs")},
            "figures": {"grown": arms["grown"]["final_ppl"], other: arms[other]["final_ppl"]},
        })  # fmt: skip
    exact = all(step["kind"] == "exact" for step in lineage["steps"][1:])
    claims.append({
        "paper": "grow",
        "claim": "a trained MoE grows again (experts x2) without changing its function",
        "verdict": "reproduced" if exact and all(s["preservation"]["passed"] for s in lineage["steps"]) else "not reproduced",
        "seeds": [0],
        "margin": {"mean": max(s["preservation"]["max_dlogit"] for s in lineage["steps"][1:]), "spread": 0.0,
                   "agree": "1/1", "diffs": []},
        "figures": {"max_dlogit": [s["preservation"]["max_dlogit"] for s in lineage["steps"]]},
    })  # fmt: skip
    return section, claims


# ---- repair -------------------------------------------------------------------------------------------
REPAIR = {
    "model": "smollm2-135m",
    "sparsify": {"bank": 64, "keep": 32, "rank": 64, "warmup_steps": 200, "convert_steps": 0},
    # RULER's own CWE (10 common words x 30, the rest x 3) is beyond a 135M model wherever it fits: its 300
    # common entries alone take ~1.8k tokens, and the dense model scored 0.0 on all 16 prompts at 2,048 and
    # 4,096 tokens (a run stopped part-way, figures read from it). So it is measured on the dense model only,
    # to state that, and the claims are judged on the CWE variant the dense model does (one common word,
    # 15 % of the list; dense 0.375 / 0.25 at 512 / 1,024 against chance ~0.15 in repair.json), with enough
    # prompts for a per-prompt pairing (8 would give steps of 1/8).
    "ruler_dense": {"lengths": [2048], "samples": 8},
    "lengths": [512, 1024],
    "samples": 24,
    "steps": 300,
}


def repair_run() -> dict:
    return child_run(RUNS / "repair" / "run", REPAIR, "repair", "-", "0", what="repair part")


def _repair_child(out_json: str) -> None:
    from upcycle import hub, sparsify
    from upcycle.eval.cwe import RULER, CWEConfig, cwe_eval
    from upcycle.pipelines.repair import RepairConfig
    from upcycle.pipelines.repair import run as repair

    reference, tokenizer = hub.load(REPAIR["model"])
    ruler = cwe_eval(reference, tokenizer, config=RULER, **REPAIR["ruler_dense"])
    model, made = sparsify(reference, tokenizer, progress=False, **REPAIR["sparsify"])
    options = RepairConfig(
        lengths=tuple(REPAIR["lengths"]), samples=REPAIR["samples"], steps=REPAIR["steps"], cwe=CWEConfig()
    )
    _, result = repair(model, tokenizer, options, reference=reference)
    measured = result["measured"]
    child_done(out_json, {
        "ruler_dense": {k: ruler[k] for k in ("lengths", "score", "per_prompt", "chance")},
        "recall": made.recall_mean,
        "chosen_layer": result["chosen_layer"],
        "random_layer": result["random_layer"],
        "cwe": {name: dict(zip(map(str, REPAIR["lengths"]), m["cwe"])) for name, m in measured.items()},
        "cwe_per_prompt": {name: m["cwe_per_prompt"] for name, m in measured.items()},
        "chance": dict(zip(map(str, REPAIR["lengths"]), result["chance"])),
        "gap_closed": result["gap_closed"],
        "kl_long": {name: m["probe"]["kl"][-1] for name, m in measured.items() if "probe" in m},
    })  # fmt: skip


def repair_part() -> tuple[dict, list[dict]]:
    run = repair_run()
    section = {"setup": REPAIR, "cwe_config": "one common word, 15 % of the list, every other word once; RULER's "
               "(10 common words x 30, every other word x 3) on the dense model only: ruler_dense"} | run  # fmt: skip
    claims = []
    per = run["cwe_per_prompt"]
    for name, statement in (
        ("dense", "the sparse model loses CWE accuracy that the dense model has"),
        ("repaired_top", "repairing the localised layer restores CWE accuracy toward the dense model's"),
        ("repaired_random", "repairing a random layer (the control) restores CWE accuracy"),
    ):
        if name not in per:
            continue
        mine = [v for length in per[name] for v in length]  # paired prompt by prompt: the same prompts
        sparse = [v for length in per["sparse"] for v in length]
        judged = paired(mine, sparse)
        claims.append({
            "paper": "repair",
            "claim": f"{statement} (CWE, one common word, {' and '.join(map(str, REPAIR['lengths']))} tokens)",
            "verdict": judged["verdict"],
            "seeds": list(range(len(mine))),
            "margin": {k: judged[k] for k in ("mean", "spread", "agree", "diffs")},
            "figures": {name: mine, "sparse": sparse},
        })  # fmt: skip
    return section, claims


# ---- sparsify -----------------------------------------------------------------------------------------
SPARSIFY = {"budget": 98304, "seeds": [0], "arms": ["sparse", "dense_companion", "dense4x"], "val_blocks": 16}


def trained_sparse(seed: int = 0) -> Path:
    """The sparse arm's trained model, kept for the CPU race (benchmarks/cpu_decode.py reads it)."""
    import sparsify_quality as sq

    return RUNS / "sparsify" / f"sparse-s{seed}" / sq.SPARSE_ARMS[0][1] / "final"


def sparsify_run(arm: str, seed: int, weights: bool = False) -> dict:
    """One arm's run; `weights`: its trained model is wanted too (the race), so a run whose figures alone
    are kept (the ledger's, or a folder without the model) is made again."""
    settings = {"arm": arm, "seed": seed, "budget": SPARSIFY["budget"], "val_blocks": SPARSIFY["val_blocks"]}
    folder = RUNS / "sparsify" / f"{arm}-s{seed}"
    ledger = harness.LEDGER
    if weights and not (trained_sparse(seed) / "config.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        harness.LEDGER = None  # so the ledger's figures are not restored in place of the run
    keep = ("final",) if arm == "sparse" else ()
    try:
        result = child_run(folder, settings, "sparsify", arm, str(seed), what=f"sparsify part: {arm} seed {seed}",
                           keep=keep)  # fmt: skip
    finally:
        harness.LEDGER = ledger
    print(f"  sparsify {arm} seed {seed}: ppl {result['ppl']}, {result['seconds']:.0f} s", flush=True)
    return result


def _sparsify_child(arm: str, seed: str, out: str, out_json: str) -> None:
    import sparsify_quality as sq  # the benchmark's own recipe, its runs redirected here (nothing reused)
    import torch

    import upcycle
    from upcycle import data
    from upcycle.ops import narrow_ffn

    sq.RUNS = Path(out)
    torch.manual_seed(int(seed))
    dense, tok = upcycle.load(sq.MODEL)
    val = sq.held_out(tok, blocks=SPARSIFY["val_blocks"])
    if arm == "sparse":
        key, run_name, options, _ = sq.SPARSE_ARMS[0]
        run = sq.sparse_run(run_name, dense, tok, val, SPARSIFY["budget"], **options)
        child_done(out_json, {"ppl": run["ppl"], "ppl_untrained": run["ppl_untrained"],
                              "recall_trained_mean": run["recall_trained_mean"]})  # fmt: skip
        return
    if arm == "dense4x":
        model = narrow_ffn(dense, data.blocks(sq.DATA, tok, "train", sq.SEQ, max_blocks=64), fraction=0.25)[0]
    else:  # a copy: the dense model is also the teacher
        model = copy.deepcopy(dense)
    untrained = sq.score(model, val)
    model, _ = sq.train(arm, model, tok, dense, [{"name": "end-to-end", "tokens": SPARSIFY["budget"]}])
    child_done(out_json, {"ppl": sq.score(model, val), "ppl_untrained": untrained})


def sparsify_part() -> tuple[dict, list[dict]]:
    runs = {arm: [sparsify_run(arm, s) for s in SPARSIFY["seeds"]] for arm in SPARSIFY["arms"]}
    both = {arm: [r["ppl"]["both"] for r in rs] for arm, rs in runs.items()}
    ratio = {arm: [p / c for p, c in zip(both[arm], both["dense_companion"])] for arm in ("sparse", "dense4x")}
    section = {"setup": SPARSIFY, "ppl": both, "ratio_to_companion": ratio, "runs": runs}
    judged = paired(ratio["sparse"], ratio["dense4x"], higher_better=False)
    claims = [{
        "paper": "sparsify",
        "claim": "a 16-of-64 bank-sparse model trained on the same tokens is closer to the dense model "
        "continued than a dense model of a quarter of the FFN width is (held-out perplexity ratio)",
        "verdict": judged["verdict"],
        "seeds": SPARSIFY["seeds"],
        "margin": {k: judged[k] for k in ("mean", "spread", "agree", "diffs")},
        "figures": {"sparse / companion": ratio["sparse"], "dense4x / companion": ratio["dense4x"]},
    }]  # fmt: skip
    return section, claims


# ---- slim ---------------------------------------------------------------------------------------------
SLIM = {
    "recovery_tokens": 16384,  # slim.py's recipe for the dense cuts (20 layers x hidden 432): seq 256, batch 8
    "recovery_seeds": [0, 1, 2],
    # the expert test bed: the grow part's MoE (shared expert = the FFN, 8 routed experts active from step 0)
    # trained 65,536 tokens, so its routed experts carry weight; SlimQwen keeps the shared expert too
    "bed": {k: GROW[k] for k in ("tokens", "seq_len", "global_batch", "lr", "moe", "held_blocks")},
    "experts": 4,  # 8 -> 4 routed experts per layer, top-2 kept
    "criteria": ["frequency", "soft", "reap"],
    "modes": ["prune", "merge", "partial"],
    "expert_tokens": 16384,  # recovery of each expert cut: KD from the test bed + LM (8 steps of 8 x 256), as the
    # dense cuts get: 9 MoE recoveries at 32k would take the whole command past its 8-hour budget
    "expert_recovered": ["frequency/prune", "reap/prune", "reap/partial"],  # x every recovery seed
}
SLIM_CLAIMS = (  # the dense cuts' claims: (statement, better arm, worse arm), judged seed by seed
    ("pruned + KD + LM beats the same architecture from scratch", "pruned_kd_lm", "scratch"),
    ("KD + LM beats KD alone", "pruned_kd_lm", "pruned_kd"),
    ("KD + LM beats LM alone", "pruned_kd_lm", "pruned_lm"),
    ("MTP distillation (its weight decaying 0.3 -> 0.1) helps", "pruned_kd_lm_mtp", "pruned_kd_lm"),
    ("progressive (depth, 10 % of the tokens, then width) beats one-shot", "progressive", "pruned_kd_lm"),
)


def slim_dense() -> dict:
    """slim.py's recovery arms (its recipe, its runs redirected here): every arm with every recovery seed."""
    import slim as bench  # benchmarks/slim.py

    folder = RUNS / "slim" / "dense"
    settings = {"tokens": SLIM["recovery_tokens"], "seeds": SLIM["recovery_seeds"]}
    if (done := reused(folder, settings, "result.json")) is not None:
        return spent(done)
    bench.RUNS, bench.ONE_SEED = folder, ()  # each arm's runs resume from their own folders
    started = time.perf_counter()
    result = bench.recovery_part(SLIM["recovery_tokens"], len(SLIM["recovery_seeds"]))
    result = {k: result[k] for k in ("ppl", "seeds", "both_one_shot_ppl", "params")}
    result["seconds"] = time.perf_counter() - started
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    mark(folder, settings, "result.json")
    return spent(result)


def slim_bed() -> Path:
    """The expert test bed's weights (the grow part's `grown` seed-0 run, its model kept)."""
    folder = RUNS / "slim" / "bed"
    if not (folder / "final" / "config.json").exists():
        shutil.rmtree(folder, ignore_errors=True)  # its figures without its weights: made again
    child_run(folder, SLIM["bed"] | {"arm": "grown", "seed": 0}, "grow", "grown", "0",
              what="slim part: the expert test bed", keep=("final",))  # fmt: skip
    return folder / "final"


def slim_experts() -> dict:
    bed = RUNS / "slim" / "bed" / "final"  # made only where a run that reads it is made here
    one_shot = child_run(RUNS / "slim" / "experts-one-shot", {k: SLIM[k] for k in ("experts", "criteria", "modes")},
                         "slim", "one-shot", "0", what="slim part: one-shot expert cuts", before=slim_bed)  # fmt: skip
    recovered = {}
    for key in SLIM["expert_recovered"]:
        for seed in SLIM["recovery_seeds"]:
            settings = {"cut": key, "seed": seed, "tokens": SLIM["expert_tokens"], "experts": SLIM["experts"]}
            run = child_run(RUNS / "slim" / f"experts-{key.replace('/', '-')}-s{seed}", settings,
                            "slim", key, str(seed), what=f"slim part: {key} seed {seed}", before=slim_bed)  # fmt: skip
            recovered.setdefault(key, []).append(run)
            print(f"  slim {key} seed {seed}: one-shot {run['one_shot_ppl']:.2f} -> {run['ppl']:.2f}", flush=True)
    return {"bed": str(bed), "one_shot": one_shot, "recovered": recovered}


def _slim_child(cut: str, seed: str, out: str, out_json: str) -> None:
    from upcycle import hub
    from upcycle.pipelines.slim import SlimConfig
    from upcycle.pipelines.slim import run as slim

    model, tokenizer = hub.load(RUNS / "slim" / "bed" / "final")
    if cut == "one-shot":  # every criterion x mode, no training, on the same calibration and held-out text
        figures = {}
        for criterion in SLIM["criteria"]:
            for mode in SLIM["modes"]:
                step = {"op": "experts", "experts": SLIM["experts"], "criterion": criterion, "mode": mode}
                config = SlimConfig.from_dict({"stages": [{"name": "cut", "cuts": [step], "tokens": 0}]})
                report = slim(model, tokenizer, config, progress=False).report.as_dict()
                one = report["cuts"][0]
                figures[f"{criterion}/{mode}"] = {"ppl": one["ppl_after"], "kl": one["kl"]}
                figures["source_ppl"] = one["ppl_before"]
        return child_done(out_json, figures)
    criterion, mode = cut.split("/")
    step = {"op": "experts", "experts": SLIM["experts"], "criterion": criterion, "mode": mode}
    config = SlimConfig.from_dict({"stages": [{"name": "cut", "cuts": [step], "tokens": SLIM["expert_tokens"]}],
                                   "recovery": "kd_lm", "seed": int(seed)})  # fmt: skip
    report = slim(model, tokenizer, config, progress=False, run_dir=Path(out) / "recovery").report.as_dict()
    child_done(out_json, {"one_shot_ppl": report["cuts"][0]["ppl_after"], "ppl": report["ppl"]["slim"],
                          "source_ppl": report["ppl"]["source"]})  # fmt: skip


def slim_part() -> tuple[dict, list[dict]]:
    dense, experts = slim_dense(), slim_experts()
    seeds = dense["seeds"]
    claims = []
    for statement, better, worse in SLIM_CLAIMS:
        n = min(len(seeds[better]), len(seeds[worse]))  # scratch: one seed (its margin is orders of magnitude)
        claims.append(_claim("slim", f"{statement} ({SLIM['recovery_tokens']:,} recovery tokens, held-out "
                             "perplexity)", seeds[better][:n], seeds[worse][:n], better, worse, higher=False,
                             seeds=SLIM["recovery_seeds"][:n]))  # fmt: skip
    one, rec = experts["one_shot"], {k: [r["ppl"] for r in rs] for k, rs in experts["recovered"].items()}
    seeds_ = SLIM["recovery_seeds"]
    claims.append(_claim("slim", "REAP's one-shot expert cut costs less than frequency's (8 -> 4 experts; one "
                         "calibration set, deterministic)", [one["reap/prune"]["ppl"]], [one["frequency/prune"]["ppl"]],
                         "reap/prune", "frequency/prune", higher=False, seeds=[0]))  # fmt: skip
    claims.append(_claim("slim", "a partial-preservation merge beats pruning the same experts (REAP), after "
                         f"{SLIM['expert_tokens']:,} recovery tokens", rec["reap/partial"], rec["reap/prune"],
                         "reap/partial", "reap/prune", higher=False, seeds=seeds_))  # fmt: skip
    # SlimQwen: one-shot criteria converge after continued training. Reproduced when the recovered gap
    # between the criteria is under a fifth of their one-shot gap and within two seed spreads of zero.
    gap_one = one["frequency/prune"]["ppl"] / one["reap/prune"]["ppl"] - 1
    after = paired(rec["reap/prune"], rec["frequency/prune"], higher_better=False)
    gap_after = statistics.mean(f / r - 1 for f, r in zip(rec["frequency/prune"], rec["reap/prune"]))
    converged = abs(gap_after) < abs(gap_one) / 5 and abs(after["mean"]) <= 2 * after["spread"] + 1e-9
    claims.append({
        "paper": "slim",
        "claim": "expert criteria converge after recovery (REAP vs frequency: the one-shot gap shrinks below a "
        "fifth and within two seed spreads)",
        "verdict": "reproduced" if converged else "not reproduced",
        "seeds": seeds_,
        "margin": {k: after[k] for k in ("mean", "spread", "agree", "diffs")} | {"gap_one_shot": gap_one,
                                                                               "gap_recovered": gap_after},
        "figures": {"frequency/prune": rec["frequency/prune"], "reap/prune": rec["reap/prune"]},
    })  # fmt: skip
    section = {"setup": SLIM, "dense": dense, "experts": experts, "expert_one_shot_within": one["source_ppl"]}
    return section, claims


def _claim(paper, statement, a, b, name_a, name_b, *, higher: bool, seeds: list[int]) -> dict:
    judged = paired(a, b, higher_better=higher)
    return {
        "paper": paper,
        "claim": statement,
        "verdict": judged["verdict"],
        "seeds": seeds,
        "margin": {k: judged[k] for k in ("mean", "spread", "agree", "diffs")},
        "figures": {name_a: a, name_b: b},
    }


# ---- the docs' table ----------------------------------------------------------------------------------
def table(results: dict, paper: str | None = None) -> str:
    """Every claim of claims.json (or one paper's): its verdict, the paired margin and the figures per seed."""
    claims = [c for c in results.get("claims", []) if paper in (None, c["paper"])]
    if not claims:
        if paper:
            return f"Not run yet: `python benchmarks/reproduce.py --paper {paper}` writes these claims."
        return "No part has run yet: `make reproduce` (or `--paper NAME`) writes the claims."
    lines = [
        "| paper | claim | verdict | seeds agreeing | mean paired margin (spread) | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        m = c["margin"]
        per_seed = "; ".join(f"{arm} {', '.join(_num(v) for v in values)}" for arm, values in c["figures"].items())
        lines.append(
            f"| {c['paper']} | {c['claim']} | **{c['verdict']}** | {m['agree']} | {_num(m['mean'])} "
            f"({_num(m['spread'])}) | {per_seed} |"
        )
    parts = {name: p for name, p in results.get("parts", {}).items() if paper in (None, name)}
    lines += ["", "Parts: " + "; ".join(f"`{name}` {p['seconds'] / 3600:.2f} h at {p['commit']}"
                                       for name, p in parts.items())]  # fmt: skip
    return "\n".join(lines)


def lineage_table(results: dict) -> str:
    """The grow part's lineage: each growth step's check against the model trained before it, and the
    held-out perplexity as each stage starts (just grown) and ends (trained)."""
    lineage = results.get("grow", {}).get("lineage")
    if not lineage:
        return "Not run yet: `python benchmarks/reproduce.py --paper grow` runs the lineage."
    ppl = {(p["stage"], p["when"].split()[0]): p["ppl"] for p in lineage["ppl"]}
    lines = [
        "| stage | growth step | kind | parameters | max abs Δlogit | loss change | check | ppl grown | ppl trained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, step in enumerate(lineage["steps"]):
        p = step["preservation"]
        lines.append(
            f"| {n + 1} | {step['step']} | {step['kind']} | {step['params_before'] / 1e6:.1f}M → "
            f"{step['params_after'] / 1e6:.1f}M | {p['max_dlogit']:.3g} | {100 * p['loss_change']:+.2f} % | "
            f"{'passed' if p['passed'] else 'FAILED'} | {ppl.get((n, 'start'), float('nan')):.2f} | "
            f"{ppl.get((n, 'end'), float('nan')):.2f} |"
        )
    return "\n".join(lines + ["", f"Training: {lineage['train_seconds'] / 60:.0f} min in all."])


def slim_experts_table(results: dict) -> str:
    """The slim part's expert cuts on the active-MoE test bed: one shot by criterion x mode, and recovered."""
    experts = results.get("slim", {}).get("experts")
    if not experts:
        return "Not run yet: `python benchmarks/reproduce.py --paper slim` runs the expert cuts."
    one, setup = experts["one_shot"], results["slim"]["setup"]
    lines = [
        f"8 → {setup['experts']} routed experts per layer (top-2, shared expert kept); the test bed's held-out ppl "
        f"{one['source_ppl']:.2f}. One shot:",
        "",
        "| criterion | " + " | ".join(setup["modes"]) + " |",
        "|---|" + "---|" * len(setup["modes"]),
    ]
    for criterion in setup["criteria"]:
        cells = " | ".join(f"{one[f'{criterion}/{mode}']['ppl']:.2f}" for mode in setup["modes"])
        lines.append(f"| {criterion} | {cells} |")
    lines += ["", f"After {setup['expert_tokens']:,} recovery tokens (KD from the test bed + LM), per seed:", ""]
    lines += ["| cut | one shot | recovered (seeds " + ", ".join(map(str, setup["recovery_seeds"])) + ") |"]
    lines += ["|---|---|---|"]
    for key, runs in experts["recovered"].items():
        recovered = ", ".join(f"{r['ppl']:.2f}" for r in runs)
        lines.append(f"| {key} | {runs[0]['one_shot_ppl']:.2f} | {recovered} |")
    return "\n".join(lines)


def legend(_: dict | None = None) -> str:
    """What each verdict means (harness.VERDICTS, the words `paired` gives)."""
    return "\n".join(f"- **{word}** — {meaning};" for word, meaning in VERDICTS.items()).removesuffix(";") + "."


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.1f}"


# ---- the command ---------------------------------------------------------------------------------------
PARTS = {"seft": seft_part, "grow": grow_part, "slim": slim_part, "repair": repair_part, "sparsify": sparsify_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", nargs="*", choices=list(PARTS), default=list(PARTS), help="the parts to run")
    parser.add_argument("--redo", action="store_true", help="run the parts named again even where finished")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, arm, seed, out, out_json = args.child
        if kind == "repair":
            return _repair_child(out_json)
        if kind == "sparsify":
            return _sparsify_child(arm, seed, out, out_json)
        if kind == "slim":
            return _slim_child(arm, seed, out, out_json)
        return _grow_child(arm, seed, out, out_json) if kind == "grow" else _lineage_child(out, out_json)
    harness.LEDGER = RESULTS / "claims_runs.json"
    results = load("claims")
    results.pop("run", None)
    for part in args.paper:
        if results.get("parts", {}).get(part, {}).get("finished") and not args.redo:
            print(f"{part}: finished at {results['parts'][part]['commit']}, kept (--redo runs it again)")
            continue
        print(f"{part} ...", flush=True)
        started, SPENT[:] = time.perf_counter(), []
        section, claims = PARTS[part]()
        seconds = round(sum(SPENT), 1)  # every run's own time, those kept from an interrupted invocation too
        commit = provenance()["commit"]
        command = COMMAND.format(part=part)
        for claim in claims:
            claim |= {"command": command, "seconds": seconds, "commit": commit}
        results[part] = section
        if part == "repair":  # the key: model -> length -> accuracy, beside the part's section
            results["cwe"] = section["cwe"]
        results["claims"] = [c for c in results.get("claims", []) if c["paper"] != part] + claims
        results.setdefault("parts", {})[part] = {
            "finished": True,
            "seconds": seconds,
            "seconds_this_invocation": round(time.perf_counter() - started, 1),
            "commit": commit,
        }
        save("claims", results)
        for claim in claims:
            print(f"  {claim['verdict']}: {claim['claim']} ({claim['margin']['agree']} seeds)")
    print(f"wrote {RESULTS / 'claims.json'}")


if __name__ == "__main__":
    sys.exit(main())
