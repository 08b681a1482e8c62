"""prune on smollm2-135m: one-shot magnitude / Wanda / SparseGPT at 50 % and 70 % unstructured and 2:4, each
in its own process (seconds of the pruning itself, the process's peak memory, held-out perplexity), side by
side with llm-compressor's one-shot Wanda and SparseGPT on the same model, calibration blocks and sparsity,
measured the same way (its output scored by upcycle's own perplexity on the same held-out blocks).

    python benchmarks/prune_seft.py --part oneshot  # the one-shot part (about 26 minutes on 2 CPU cores)
    python benchmarks/prune_seft.py --part finetune # SEFT vs masked vs LoRA vs LoRA* at 50 and 70 % (--targets 50,70,2:4)
    python benchmarks/prune_seft.py --no-peer       # upcycle only
    python docs/tables.py                           # the docs' tables from the JSON

Calibration: 128 blocks × 256 tokens of shakespeare + pystdlib (train split); held-out: 32 × 256
(validation split). llm-compressor 0.14.0.1 is installed by the script into a throwaway environment
(benchmarks/peers: torch pinned). Results: benchmarks/results/prune_seft.json and prune_seft.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from harness import RESULTS, bars, child, child_done, command, figure, load, mark, reused, save, seed_margin, upcycle
from peers import PEERS, driver, peer_python

from upcycle import data, hub
from upcycle.eval import perplexity
from upcycle.eval.peak_memory import peak_rss_mb
from upcycle.ops.prune import PruneSpec, prune, sparsity_of

RUNS = Path("runs/bench-prune")
MODEL = "smollm2-135m"
TEXT = "shakespeare+pystdlib"
CALIBRATION_BLOCKS, HELD_BLOCKS, SEQ = 128, 32, 256
TARGETS = {"50": {"sparsity": 0.5}, "70": {"sparsity": 0.7}, "2:4": {"nm": "2:4"}}
METHODS = ("magnitude", "wanda", "sparsegpt")
# Every fine-tuning arm: the same pruned model, task data, steps and held-out text; each in its own process.
FINETUNE = {
    "seft": (["--sparse", "seft", "--budget-rank", "16", "--every", "2", "--window", "1"], 1e-3),
    "masked": (["--sparse", "masked"], 1e-4),
    "lora": (["--lora", "16"], 1e-3),
    "lora_star": (["--lora", "16", "--lora-star"], 1e-3),
}
SEEDED = ("seft", "lora_star")  # the arms run with every seed (the claim compares them)
# what an arm's row keeps of its first seed's report (the means and per-seed lists are added)
KEPT = ("before", "sparsity_after", "peak_rss_mb", "train_peak_rss_mb", "rss_before_train_mb", "s_per_step")
KEPT += ("trainable_params", "optimizer_state_mb", "steps")


def blocks(tokenizer):
    return (
        data.blocks(TEXT, tokenizer, "train", SEQ, max_blocks=CALIBRATION_BLOCKS),
        data.blocks(TEXT, tokenizer, "validation", SEQ, max_blocks=HELD_BLOCKS),
    )


def target_args(target: str) -> list[str]:
    spec = TARGETS[target]
    return ["--nm", spec["nm"]] if "nm" in spec else ["--sparsity", str(spec["sparsity"])]


def prune_in_child(method: str, target: str, out_json: str) -> None:
    """One upcycle run in this process: load, prune in place, then score. The peak memory is read before
    scoring, so it covers what llm-compressor's does (load and prune; scoring is done outside it)."""
    model, tokenizer = hub.load(MODEL)
    calibration, held = blocks(tokenizer)
    spec = PruneSpec(method=method, **TARGETS[target])
    _, report = prune(model, spec, calibration if method != "magnitude" else None, None, inplace=True)
    peak = peak_rss_mb()  # before scoring
    ppl = perplexity(model, held, progress=False).ppl
    result = {"ppl": ppl, "seconds": report.seconds, "peak_rss_mb": peak}
    child_done(out_json, result | {"sparsity": report.sparsity, "exact": report.exact})


def run_peer(python: Path, method: str, target: str, calibration_json: Path, held) -> dict:
    out = RUNS / f"llmcompressor-{method}-{target.replace(':', 'of')}"
    folder = hub.builtin_folder(MODEL)
    stdout = command(
        python, driver("llmcompressor_prune"), folder, calibration_json, out, "--method", method, *target_args(target)
    )
    if isinstance(stdout, dict):
        return stdout
    pruned, _ = hub.load(out)
    fractions = sparsity_of(pruned)  # every matrix of a layer kind has the same size: the mean is the share
    ppl = perplexity(pruned, held, progress=False).ppl
    return json.loads(stdout.strip().splitlines()[-1]) | {
        "ppl": ppl,
        "sparsity": sum(fractions.values()) / len(fractions),
    }


def oneshot_part(peer: bool) -> tuple[dict, dict]:
    ours = {}
    for target in TARGETS:
        for method in METHODS:
            ours[f"{method}_{target}"] = child(__file__, method, target)
            print(f"upcycle {method}_{target}: {ours[f'{method}_{target}']}", flush=True)
    dense, tokenizer = hub.load(MODEL)
    calibration, held = blocks(tokenizer)
    dense_ppl = perplexity(dense, held, progress=False).ppl
    for row in ours.values():
        row["ppl_dense"] = dense_ppl
    del dense
    if not peer:
        return ours, {"skipped": "--no-peer"}
    try:
        python = peer_python()
    except subprocess.CalledProcessError as e:
        return ours, {"error": f"installing {PEERS[0]} failed: {(e.stderr or '').strip().splitlines()[-1:]}"}
    RUNS.mkdir(parents=True, exist_ok=True)
    calibration_json = RUNS / "calibration.json"
    calibration_json.write_text(json.dumps({"input_ids": calibration.tolist()}))
    theirs = {"tool": PEERS[0]}
    for target in TARGETS:
        for method in ("wanda", "sparsegpt"):
            theirs[f"{method}_{target}"] = run_peer(python, method, target, calibration_json, held)
            print(f"llm-compressor {method}_{target}: {theirs[f'{method}_{target}']}", flush=True)
    return ours, theirs


def pruned_source(method: str, target: str) -> Path:
    folder = RUNS / f"source-{method}-{target.replace(':', 'of')}"
    if not (folder / "config.json").exists():
        out = upcycle("prune", MODEL, folder, "--method", method, *target_args(target))
        if isinstance(out, dict):
            raise SystemExit(f"pruning the source failed: {out['error']}")
    return folder


def finetune_arm(source: Path, arm: str, tokens: int, seed: int) -> dict:
    args, lr = FINETUNE[arm]
    out = RUNS / f"finetune-{source.name}-{arm}-s{seed}"
    settings = {"args": args, "lr": lr, "tokens": tokens, "seed": seed}
    report = reused(out, settings, "finetune_report.json")
    if report is not None and "train_peak_rss_mb" in report:  # (older runs lack the training's own peak)
        return report
    run = upcycle("finetune", source, out, *args, "--lr", lr, "--tokens", tokens, "--seed", seed)
    if isinstance(run, dict):
        return run
    mark(out, settings)
    return json.loads((out / "finetune_report.json").read_text())


def finetune_part(target: str, tokens: int, seeds: int, method: str = "wanda") -> dict:
    source = pruned_source(method, target)
    out = {}
    for arm in FINETUNE:
        runs = [finetune_arm(source, arm, tokens, seed) for seed in range(seeds if arm in SEEDED else 1)]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out[arm] = runs[0]
            continue
        seeds_of = {key: [r["after"][key] for r in ok] for key in ("task_accuracy", "ppl")}
        out[arm] = {key: sum(v) / len(v) for key, v in seeds_of.items()}
        out[arm] |= {f"{key}_seeds": v for key, v in seeds_of.items()}
        out[arm] |= {key: ok[0][key] for key in KEPT} | {"sparsity_exact": all(r["sparsity_exact"] for r in ok)}
        print(f"finetune {target} {arm}: {out[arm]}", flush=True)
    return out


def cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "—"


def percent(target: str) -> str:
    return target if ":" in target else target + " %"


def tables(results: dict) -> str:
    """The docs' tables and claims, from the JSON."""
    lines = []
    ours, theirs = results.get("oneshot", {}), results.get("llmcompressor", {})
    if ours:
        lines += [
            f"One shot (dense ppl {next(iter(ours.values()))['ppl_dense']:.2f}); seconds of the pruning itself "
            "(upcycle: `prune`; llm-compressor: its `oneshot` call); peak memory of the process through load and "
            "prune (upcycle: read before scoring; llm-compressor: at exit, after saving):",
            "",
            "| target | method | upcycle ppl | s | peak MB | llm-compressor ppl | s | peak MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for target in TARGETS:
            for method in METHODS:
                u, t = ours.get(f"{method}_{target}", {}), theirs.get(f"{method}_{target}", {})
                cells = [
                    cell(r, k, f)
                    for r in (u, t)
                    for k, f in (("ppl", ".2f"), ("seconds", ".1f"), ("peak_rss_mb", ".0f"))
                ]
                lines.append(f"| {percent(target)} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    for key, arms in results.get("finetune_by_target", {}).items():
        ok = {k: v for k, v in arms.items() if isinstance(v, dict) and "task_accuracy" in v}
        if not ok:
            continue
        before = next(iter(ok.values()))["before"]
        lines += [
            f"Fine-tuning the {arms.get('source', 'wanda')} {percent(key.split('-')[0])} model, "
            f"{results.get('finetune_setup', {}).get('tokens', 0):,} tokens each (before: exact match "
            f"{before['task_accuracy']:.3f}, ppl {before['ppl']:.2f}); peak memory while training (from the "
            "trainer's start to its end) and of the whole run (load, score, train, merge, score, save):",
            "",
            "| arm | exact match (seeds) | ppl (seeds) | sparsity kept exactly | peak MB training | peak MB run "
            "| optimizer state MB | s / step | trainable |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, r in ok.items():
            lines.append(
                f"| {arm} | {r['task_accuracy']:.3f} ({', '.join(f'{v:.3f}' for v in r['task_accuracy_seeds'])}) | "
                f"{r['ppl']:.2f} ({', '.join(f'{v:.2f}' for v in r['ppl_seeds'])}) | "
                f"{'yes' if r['sparsity_exact'] else 'no (dense)' if arm == 'lora' else 'no'} | "
                f"{cell(r, 'train_peak_rss_mb', '.0f')} | {r['peak_rss_mb']:.0f} | "
                f"{r['optimizer_state_mb']:.1f} | {r['s_per_step']:.2f} | {r['trainable_params']:,} |"
            )
        if "seft" in ok and "lora_star" in ok:
            s, ls = ok["seft"], ok["lora_star"]
            peak = "train_peak_rss_mb" if "train_peak_rss_mb" in s and "train_peak_rss_mb" in ls else "peak_rss_mb"
            accuracy = seed_margin(s["task_accuracy_seeds"], ls["task_accuracy_seeds"])
            ppl = seed_margin(s["ppl_seeds"], ls["ppl_seeds"], higher_better=False)
            lines += [
                "",
                f"- SEFT against LoRA* in exact match: {accuracy}; in held-out ppl: {ppl}",
                f"- SEFT's peak memory vs LoRA*'s ({'training' if peak != 'peak_rss_mb' else 'whole run'}): "
                f"{s[peak]:.0f} vs {ls[peak]:.0f} MB ({'less' if s[peak] < ls[peak] else 'not less'}; "
                f"masked full fine-tuning {ok.get('masked', {}).get(peak, float('nan')):.0f} MB)",
            ]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    if "oneshot" not in results:
        return
    tuned = {
        k: {a: r for a, r in v.items() if isinstance(r, dict) and "task_accuracy" in r}
        for k, v in results.get("finetune_by_target", {}).items()
    }
    tuned = {k: v for k, v in tuned.items() if v}
    fig, axes = figure(3 if tuned else 2, size=(15 if tuned else 10, 4))
    arms = {f"upcycle {m}": (results["oneshot"], m) for m in METHODS}
    arms |= {f"llm-compressor {m}": (results.get("llmcompressor", {}), m) for m in ("wanda", "sparsegpt")}
    ticks = [percent(t) for t in TARGETS]
    for ax, key, title in ((axes[0], "ppl", "held-out perplexity (log)"), (axes[1], "seconds", "seconds of pruning")):
        values = {
            label: [rows.get(f"{m}_{t}", {}).get(key, float("nan")) for t in TARGETS]
            for label, (rows, m) in arms.items()
        }
        bars(ax, values, ticks)
        ax.set_title(title)
    axes[0].axhline(next(iter(results["oneshot"].values()))["ppl_dense"], color="k", ls="--", lw=1, label="dense")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    if tuned:  # fine-tuning: task exact match after, per arm and pruned model (seeds as dots)
        names = list(next(iter(tuned.values())))
        values = {
            arm: [arms_.get(arm, {}).get("task_accuracy", float("nan")) for arms_ in tuned.values()] for arm in names
        }
        positions = bars(axes[2], values, [k.replace("-", "\n") for k in tuned])
        for arm, xs in zip(names, positions):
            for x, arms_ in zip(xs, tuned.values()):
                if arm in arms_:
                    seeds = arms_[arm]["task_accuracy_seeds"]
                    axes[2].plot([x] * len(seeds), seeds, "k.", ms=3)
        for i, arms_ in enumerate(tuned.values()):
            before = next(iter(arms_.values()))["before"]["task_accuracy"]
            axes[2].hlines(before, i - 0.45, i + 0.45, colors="k", linestyles=":", label="before" if i == 0 else None)
        axes[2].set_title("task exact match after fine-tuning")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"pruning {MODEL} on 2 CPU cores: one shot, then fine-tuning that keeps the zeros")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    parser.add_argument("--part", choices=("all", "oneshot", "finetune"), default="all")
    parser.add_argument("--tokens", type=int, default=8192, help="fine-tuning tokens of every arm (4 steps of 8 × 256)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the SEFT and LoRA* arms")
    parser.add_argument("--targets", default="50,70", help="sparsities to fine-tune at, comma-separated (also 2:4)")
    parser.add_argument(
        "--source",
        default="wanda",
        choices=METHODS,
        help="how the model fine-tuned is pruned (results of a source other than wanda: key TARGET-SOURCE)",
    )
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "TARGET", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return prune_in_child(*args.child)
    results = load("prune_seft") | {
        "model": MODEL,
        "calibration": f"{CALIBRATION_BLOCKS} × {SEQ} tokens of {TEXT} (train split)",
        "held_out": f"{HELD_BLOCKS} × {SEQ} tokens (validation split)",
    }
    if args.part in ("all", "oneshot"):
        started = time.perf_counter()
        results["oneshot"], results["llmcompressor"] = oneshot_part(not args.no_peer)
        results["seconds_oneshot_part"] = round(time.perf_counter() - started, 1)
        save("prune_seft", results)
    if args.part in ("all", "finetune"):
        started = time.perf_counter()
        by_target = results.setdefault("finetune_by_target", {})
        for target in args.targets.split(","):
            key = target if args.source == "wanda" else f"{target}-{args.source}"
            by_target[key] = {**finetune_part(target, args.tokens, args.seeds, args.source), "source": args.source}
            save("prune_seft", results)
        results["finetune"] = by_target.get("50") or next(iter(by_target.values()))
        results["finetune_setup"] = {
            "tokens": args.tokens,
            "task": "record extraction (eval/extract.py), exact match on 96 held-out examples",
            "held_out_ppl": "pystdlib, 16 × 256 tokens",
            "source": "smollm2-135m pruned by Wanda (by the method after the target's dash where there is one)",
            "arms": {k: {"args": v[0], "lr": v[1]} for k, v in FINETUNE.items()},
        }
        results["seconds_finetune_part"] = round(time.perf_counter() - started, 1)
    save("prune_seft", results)
    plot(results, RESULTS / "prune_seft.png")
    print(f"wrote {RESULTS / 'prune_seft.json'}")


if __name__ == "__main__":
    main()
