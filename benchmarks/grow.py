"""grow on smollm2-135m: does each operator keep the function, how long and how much memory does it
take, how does mergekit-moe compare, and does a grown MoE beat one trained from scratch?

    python benchmarks/grow.py                      # everything (about an hour on 2 CPU cores)
    python benchmarks/grow.py --part preservation  # operators and mergekit-moe only
    python benchmarks/grow.py --part train --tokens 65536

Preservation: every operator runs in a child process of its own (so its peak memory is its own):
load the source, apply the step (timed; resident memory sampled every 5 ms while it runs), then
compare the grown model with the source on held-out text (16 blocks × 256 tokens of shakespeare +
pystdlib validation; k-means routers fitted on the train split). The MoE-source operators start from
the 8-expert grown model (`moe_shared`) after the train part trained it. mergekit-moe (0.1.5, gate_mode random, 8 copies top-2 into
Mixtral: the same operator as `moe_copy`) runs from a throwaway virtual environment (made in /tmp on
first use, torch pinned) and is measured the same way; if it cannot be installed or run, the error
is recorded.
Train: the grown MoE (dense → 8 experts top-2 + shared expert), the same architecture from random
initialisation, and the dense source continued, each trained on the same N tokens with the same
recipe (LM loss + balance 0.01 + router z 0.001 for the MoEs, AdamW 3e-4 cosine); validation
perplexity on the same held-out blocks every few steps.
Results: benchmarks/results/grow.json and grow.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import torch
import yaml
from harness import RESULTS, child, child_done, curves, figure, held_out, load, measured, save, train
from peers import peer_python
from transformers import AutoModelForCausalLM

from upcycle import data, hub
from upcycle.commands.grow import GrowConfig, GrowStepOptions, RunOptions
from upcycle.commands.grow import run as grow_run
from upcycle.eval.equivalence import compare
from upcycle.eval.peak_memory import peak_rss_mb, reset_peak, rss_mb
from upcycle.ops.grow import GrowChecks, GrowStep, apply_step
from upcycle.ops.grow.verify import preservation

RUNS = Path("runs/bench-grow")
MODEL = "smollm2-135m"
TEXT = "shakespeare+pystdlib"
SEQ = 256
HELD_BLOCKS = 16
CALIBRATION_TOKENS = 8192
MERGEKIT = "mergekit==0.1.5"
RELAXED = GrowChecks(max_loss_change=100.0, min_logit_cosine=-1.0, max_router_kl=100.0)  # measure, never fail
MIXTRAL8 = {"op": "moe", "family": "mixtral", "experts": 8, "top_k": 2}
# name -> (source, step). "moe8" is the model `moe_shared` makes; the MoE operators start from it *after*
# the train part has trained it (its routed experts enter with zero output, so on the untrained model
# routing changes nothing and every MoE operator would look exact for free)
OPERATORS = {
    "moe_copy": ("dense", MIXTRAL8 | {"mode": "copy"}),
    "moe_shared": ("dense", MIXTRAL8 | {"family": "qwen2_moe", "mode": "shared"}),
    "moe_granular": ("dense", MIXTRAL8 | {"mode": "granular", "granularity": 2}),
    "moe_partition": ("dense", MIXTRAL8 | {"mode": "partition"}),
    "moe_drop": ("dense", MIXTRAL8 | {"mode": "drop", "drop_ratio": 0.5}),
    "experts_clone": ("moe8_trained", {"op": "experts", "factor": 2}),
    "experts_noise": ("moe8_trained", {"op": "experts", "factor": 2, "noise": 0.05}),
    "top_k": ("moe8_trained", {"op": "top_k", "top_k": 4}),
    "depth_identity": ("dense", {"op": "depth", "add": 6}),
    "depth_map": ("dense", {"op": "depth", "layer_map": list(range(0, 21)) + list(range(15, 30))}),
    "ffn_width": ("dense", {"op": "ffn_width", "width": 2048}),
    "hidden": ("dense", {"op": "hidden", "factor": 2}),
}
PLAN = [OPERATORS["moe_shared"][1], {"op": "experts", "factor": 2}, {"op": "depth", "add": 6}]
MEASURES = ("max_dlogit", "kl", "top1", "logit_cosine", "loss_before", "loss_after", "loss_change", "router_kl")
ROUTER_TERMS = [{"name": "lm"}, {"name": "balance", "weight": 0.01}, {"name": "router_z", "weight": 0.001}]


def param_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def held_blocks(tokenizer):
    return held_out(tokenizer, (TEXT,), HELD_BLOCKS, SEQ)[TEXT]


def one_operator(name: str, source: str, out_json: str) -> None:
    """One operator (or the plan) in this process: its time, peak memory and preservation."""
    base_rss = rss_mb()
    torch.manual_seed(0)
    model, tokenizer = hub.load(source)
    # the loaded weights may still be pages of the mapped safetensors file, which count in the resident
    # set once touched and again after a write: make them private memory first, as a model in training
    # is, so the measurement is the conversion's and not the loader's
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    gc.collect()
    imported_rss = rss_mb() - param_mb(model)  # the process without the source: what the ratio is over
    held = held_blocks(tokenizer)
    calibration = data.blocks(TEXT, tokenizer, "train", SEQ, max_blocks=CALIBRATION_TOKENS // SEQ)
    steps = PLAN if name == "plan" else [OPERATORS[name][1]]
    loaded_rss = rss_mb()
    start = time.perf_counter()
    kinds, origin = [], None
    reset_peak()  # the peak from here: the process as loaded, then whatever the step adds
    grown = model
    for options in steps:  # the plan keeps only the source and the newest model
        grown, report = apply_step(grown, GrowStep(**options), None, calibration=calibration)
        kinds.append(report.kind)
        origin = report.facts.get("origin") if options["op"] == "experts" else None
    peak, seconds = peak_rss_mb(), time.perf_counter() - start
    kind = "exact" if all(k == "exact" for k in kinds) else ("diversity" if "diversity" in kinds else "changed")
    p = preservation(model, grown, held, kind, RELAXED, origin)
    result = {"step": steps if name == "plan" else steps[0], "kind": kind, "family": grown.config.model_type}
    result |= {key: getattr(p, key) for key in MEASURES}
    result |= {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_without_source_mb": imported_rss,
        "rss_before_mb": loaded_rss,
        "python_rss_mb": base_rss,
        "source_mb": param_mb(model),
        "output_mb": param_mb(grown),
        "params_source": params(model),
        "params_output": params(grown),
    }
    result["memory_ratio"] = (peak - imported_rss) / (result["source_mb"] + result["output_mb"])
    child_done(out_json, result)


def run_mergekit(source_folder: Path, form: str = "mixtral") -> dict:
    """mergekit-moe's 8 copies top-2, measured the same way as upcycle's operators and compared with the
    source on the same held-out blocks. `form`: mixtral (against upcycle's `moe_copy`) or qwen_shared, its
    Qwen-MoE form with a shared expert that is another copy (against `moe_shared`)."""
    try:
        exe = peer_python("upcycle-bench-mergekit", (MERGEKIT,)).parent / "mergekit-moe"
    except subprocess.CalledProcessError as e:
        return {"error": f"{MERGEKIT} could not be installed: {(e.stderr or str(e)).strip().splitlines()[-1]}"}
    work, out = RUNS / f"mergekit-{form}", RUNS / f"mergekit-{form}" / "out"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    experts = [{"source_model": str(source_folder)} for _ in range(8)]
    config = {"base_model": str(source_folder), "gate_mode": "random", "dtype": "float32", "experts_per_token": 2}
    if form == "qwen_shared":
        config |= {"architecture": "qwen", "shared_experts": [{"source_model": str(source_folder)}]}
    (work / "moe.yaml").write_text(yaml.safe_dump(config | {"experts": experts}))
    flags = ("--i-understand-this-is-not-useful-without-training", "--quiet")
    run = measured(exe, work / "moe.yaml", out, *flags)
    if "error" in run:
        return {"error": f"mergekit-moe: {run['error']}"}
    source, tokenizer = hub.load(source_folder)
    merged, _ = hub.load(out)
    p = preservation(source, merged, held_blocks(tokenizer), "exact", RELAXED)
    return {
        "tool": MERGEKIT,
        "config": config
        | {"base_model": MODEL, "experts": f"8 × {MODEL}"}
        | ({"shared_experts": MODEL} if "shared_experts" in config else {}),
        "family": merged.config.model_type,
        **{key: getattr(p, key) for key in ("max_dlogit", "kl", "top1", "logit_cosine", "loss_change")},
        "seconds": run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "source_mb": param_mb(source),
        "output_mb": param_mb(merged),
        "params_output": params(merged),
        "note": "whole process (imports, load, merge, write); verifies nothing",
    }


def train_part(tokens: int, moe_folder: Path) -> dict:
    """The grown MoE, the same architecture from random initialisation and the dense source continued."""
    grown, tokenizer = hub.load(moe_folder)
    torch.manual_seed(0)
    scratch = AutoModelForCausalLM.from_config(grown.config).eval()
    dense, _ = hub.load(MODEL)
    held = data.blocks(TEXT, tokenizer, "validation", SEQ, max_blocks=HELD_BLOCKS)
    runs, every = {}, max(1, tokens // (SEQ * 8) // 8)
    for name, model, source, losses in (
        ("grown", grown, str(moe_folder), ROUTER_TERMS),
        ("scratch", scratch, str(moe_folder), ROUTER_TERMS),
        ("dense_continued", dense, MODEL, None),
    ):
        out = RUNS / f"train-{name}-{tokens}"
        with torch.no_grad():  # the trainer's validation measure before training (it changes `model` in place)
            start_ppl = math.exp(compare(model, model, held).loss_reference)
        records = [json.loads(line) for line in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
        start, trained_now = (
            time.perf_counter(),
            not any(r.get("tokens", 0) >= tokens and "val_loss" in r for r in records),
        )
        if trained_now:
            shutil.rmtree(out, ignore_errors=True)
            train(
                model,
                tokenizer,
                out,
                tokens,
                source=source,
                text=TEXT,
                losses=losses,
                val_every=every,
                val_blocks=HELD_BLOCKS,
            )
            records = [json.loads(line) for line in open(out / "metrics.jsonl")]
        curve = [(r["tokens"], math.exp(r["val_loss"])) for r in records if "val_loss" in r]
        runs[name] = {
            "curve": [(0, start_ppl)] + curve,
            "final_ppl": curve[-1][1],
            "start_ppl": start_ppl,
            "seconds": time.perf_counter() - start if trained_now else None,  # None: a reused run
            "params": params(model),
        }
        print(f"{name}: ppl {start_ppl:.2f} → {curve[-1][1]:.2f} after {tokens} tokens", flush=True)
    return {"tokens": tokens, "data": TEXT, "ppl": {k: v["final_ppl"] for k, v in runs.items()}, "runs": runs}


def plot(results: dict, path: Path) -> None:
    fig, axes = figure(3, size=(17, 4.4), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    pres = results.get("preservation", {})
    names = [n for n in pres if "max_dlogit" in pres[n]]
    if names:
        colors = {"exact": "tab:green", "diversity": "tab:orange", "changed": "tab:red"}
        values = [max(pres[n]["max_dlogit"], 1e-8) for n in names]
        axes[0].barh(names, values, color=[colors.get(pres[n].get("kind"), "tab:gray") for n in names])
        axes[0].set_xscale("log")
        axes[0].axvline(1e-3, color="k", ls="--", lw=1)
        axes[0].set_xlabel("max |Δlogit| vs the source (log; 0 drawn at 1e-8; dashed: 1e-3)")
        axes[0].set_title("preservation (green exact, orange diversity, red changed)", fontsize=10)
        axes[0].invert_yaxis()
    if train := results.get("train"):
        runs = {name: run["curve"] for name, run in train["runs"].items()}
        curves(axes[1], runs, log=True)
        for name, line in zip(runs, axes[1].lines):  # the same colours, scratch left out
            if name != "scratch":
                curves(axes[2], {name: runs[name]}, color=line.get_color())
        axes[1].set_title(f"validation perplexity over {train['tokens']} tokens (log)", fontsize=10)
        axes[2].set_title("grown MoE vs dense continued (linear)", fontsize=10)
        for ax in axes[1:]:
            ax.set_xlabel("training tokens")
            ax.legend(fontsize=8)
        axes[1].set_ylabel("validation perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    """The docs' table: one row per operator (and mergekit-moe), from the JSON."""
    rows = [
        "| operator | kind | output | max \\|Δlogit\\| | mean KL | loss change | router KL | s | peak / (source + output) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    entries = list(results.get("preservation", {}).items())
    if "mergekit_moe" in results:
        entries.append(("mergekit-moe (8 copies, Mixtral)", results["mergekit_moe"]))
    if "mergekit_moe_shared" in results:
        entries.append(("mergekit-moe (8 copies + a shared copy, Qwen-MoE)", results["mergekit_moe_shared"]))
    for name, r in entries:
        if "error" in r:
            rows.append(f"| {name} | error: {r['error']} | | | | | | | |")
            continue
        router = "-" if r.get("router_kl") is None else f"{r['router_kl']:.2g}"
        ratio = (
            f"{r['memory_ratio']:.2f}"
            if "memory_ratio" in r
            else f"{r['peak_rss_mb'] / (r['source_mb'] + r['output_mb']):.2f} (whole process)"
        )
        rows.append(
            f"| {name} | {r.get('kind', '-')} | {r['family']} {r.get('params_output', 0) / 1e6:.0f}M | "
            f"{r['max_dlogit']:.2g} | {r['kl']:.2g} | {100 * r['loss_change']:+.2f} % | {router} | "
            f"{r['seconds']:.1f} | {ratio} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "preservation", "train"), default="all")
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens of each run (train part)")
    parser.add_argument("--only", nargs="*", help="operators to (re-)measure; the others are kept from the JSON")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # NAME SOURCE OUT_JSON: one operator
    args = parser.parse_args()
    if args.child:
        return one_operator(*args.child)
    results = load("grow")
    dense_folder, moe8 = hub.builtin_folder(MODEL), RUNS / "moe8"
    if not (moe8 / "config.json").exists():
        RUNS.mkdir(parents=True, exist_ok=True)
        step = GrowStepOptions(**OPERATORS["moe_shared"][1])
        grow_run(MODEL, str(moe8), GrowConfig(), step, options=RunOptions(progress=False, overwrite=True))
    if args.part in ("all", "train"):
        results["train"] = train_part(args.tokens, moe8)
    trained = RUNS / f"train-grown-{results.get('train', {}).get('tokens', args.tokens)}" / "final"
    sources = {"dense": dense_folder, "moe8": moe8, "moe8_trained": trained if trained.exists() else moe8}
    if args.part in ("all", "preservation"):
        pres = results.setdefault("preservation", {})
        for name, (source, _) in list(OPERATORS.items()) + [("plan", ("dense", None))]:
            if args.only and name not in args.only:
                continue
            print(f"{name} ...", flush=True)
            pres[name] = child(__file__, name, str(sources[source]))
            if "error" not in pres[name]:
                pres[name]["source"] = source if sources[source] != moe8 else "moe8"
            print(f"  {pres[name]}", flush=True)
            save("grow", results)
        if not args.only or "mergekit" in args.only:
            print("mergekit-moe ...", flush=True)
            results["mergekit_moe"] = run_mergekit(dense_folder)
            print(f"  {results['mergekit_moe']}", flush=True)
        if not args.only or "mergekit_shared" in args.only:
            print("mergekit-moe, Qwen-MoE form ...", flush=True)
            results["mergekit_moe_shared"] = run_mergekit(dense_folder, "qwen_shared")
            print(f"  {results['mergekit_moe_shared']}", flush=True)
        results["memory_rule"] = (
            "peak resident memory while the operator runs, less the process without the "
            "source (its weights made private memory first), over (source + output parameter "
            "bytes); the target is ≤ 1.25"
        )
    results["model"], results["text"], results["held_out_tokens"] = MODEL, TEXT, HELD_BLOCKS * SEQ
    path = save("grow", results)
    plot(results, RESULTS / "grow.png")
    print(table(results))
    print(f"wrote {path} and {RESULTS / 'grow.png'}")


if __name__ == "__main__":
    main()
