"""prune on smollm2-135m: one-shot magnitude / Wanda / SparseGPT at 50 % and 70 % unstructured and 2:4, each
in its own process (seconds of the pruning itself, the process's peak memory, held-out perplexity), side by
side with llm-compressor's one-shot Wanda and SparseGPT on the same model, calibration blocks and sparsity,
measured the same way (its output scored by upcycle's own perplexity on the same held-out blocks).

    python benchmarks/prune_seft.py --part oneshot  # the one-shot part (about 26 minutes on 2 CPU cores)
    python benchmarks/prune_seft.py --part finetune # SEFT vs masked vs LoRA vs LoRA* at 50 and 70 % (--targets 50,70,2:4)
    python benchmarks/prune_seft.py --no-peer       # upcycle only

Calibration: 128 blocks × 256 tokens of shakespeare + pystdlib (train split); held-out: 32 × 256
(validation split). llm-compressor 0.14.0.1 is installed by the script into a throwaway environment
(benchmarks/peers: torch pinned). Results: benchmarks/results/prune_seft.json and prune_seft.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS, child, child_done, figure, load, save
from peers import PEERS, driver, peer_python

from upcycle.eval.peak_memory import peak_rss_mb

RUNS = Path("runs/bench-prune")
MODEL = "smollm2-135m"
TEXT = "shakespeare+pystdlib"
CALIBRATION_BLOCKS, HELD_BLOCKS, SEQ = 128, 32, 256
TARGETS = {"50": {"sparsity": 0.5}, "70": {"sparsity": 0.7}, "2:4": {"nm": "2:4"}}
METHODS = ("magnitude", "wanda", "sparsegpt")


def blocks(tokenizer):
    from upcycle import data

    return (
        data.blocks(TEXT, tokenizer, "train", SEQ, max_blocks=CALIBRATION_BLOCKS),
        data.blocks(TEXT, tokenizer, "validation", SEQ, max_blocks=HELD_BLOCKS),
    )


def prune_in_child(method: str, target: str, out_json: str) -> None:
    """One upcycle run in this process: load, prune in place, then score. The peak memory is read before
    scoring, so it covers what llm-compressor's does (load and prune; scoring is done outside it)."""
    from upcycle import hub
    from upcycle.eval import perplexity
    from upcycle.ops.prune import PruneSpec, prune

    model, tokenizer = hub.load(MODEL)
    calibration, held = blocks(tokenizer)
    spec = PruneSpec(method=method, **TARGETS[target])
    _, report = prune(model, spec, calibration if method != "magnitude" else None, None, inplace=True)
    peak = peak_rss_mb()  # before scoring
    ppl = perplexity(model, held, progress=False).ppl
    child_done(
        out_json,
        {
            "ppl": ppl,
            "seconds": report.seconds,
            "peak_rss_mb": peak,
            "sparsity": report.sparsity,
            "exact": report.exact,
        },
    )


def run_peer(python: Path, method: str, target: str, calibration_json: Path, held, count_zeros) -> dict:
    from upcycle import hub
    from upcycle.eval import perplexity

    out = RUNS / f"llmcompressor-{method}-{target.replace(':', 'of')}"
    args = (
        ["--nm", TARGETS[target]["nm"]] if "nm" in TARGETS[target] else ["--sparsity", str(TARGETS[target]["sparsity"])]
    )
    proc = subprocess.run(
        [
            str(python),
            driver("llmcompressor_prune"),
            str(hub.builtin_folder(MODEL)),
            str(calibration_json),
            str(out),
            "--method",
            method,
            *args,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pruned, _ = hub.load(out)
    return {**result, "ppl": perplexity(pruned, held, progress=False).ppl, "sparsity": count_zeros(pruned)}


def oneshot_part(peer: bool) -> tuple[dict, dict]:
    from upcycle import hub
    from upcycle.eval import perplexity
    from upcycle.ops.prune import sparsity_of

    ours = {}
    for target in TARGETS:
        for method in METHODS:
            key = f"{method}_{target}"
            ours[key] = child(__file__, method, target)
            print(f"upcycle {key}: {ours[key]}", flush=True)
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

    def count_zeros(model):
        fractions = sparsity_of(model)
        return sum(fractions.values()) / len(fractions)  # every matrix of a layer kind has the same size

    theirs = {}
    for target in TARGETS:
        for method in ("wanda", "sparsegpt"):
            key = f"{method}_{target}"
            theirs[key] = run_peer(python, method, target, calibration_json, held, count_zeros)
            print(f"llm-compressor {key}: {theirs[key]}", flush=True)
    return ours, {"tool": PEERS[0], **theirs}


# ---- fine-tuning ----------------------------------------------------------------------------------
# Every arm: the same pruned model, task data, steps and held-out text; each in its own process (peak memory).
FINETUNE = {
    "seft": (["--sparse", "seft", "--budget-rank", "16", "--every", "2", "--window", "1"], 1e-3),
    "masked": (["--sparse", "masked"], 1e-4),
    "lora": (["--lora", "16"], 1e-3),
    "lora_star": (["--lora", "16", "--lora-star"], 1e-3),
}


def pruned_source(method: str, target: str) -> Path:
    folder = RUNS / f"source-{method}-{target.replace(':', 'of')}"
    if not (folder / "config.json").exists():
        args = (
            ["--nm", TARGETS[target]["nm"]]
            if "nm" in TARGETS[target]
            else ["--sparsity", str(TARGETS[target]["sparsity"])]
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "upcycle.cli",
                "prune",
                MODEL,
                str(folder),
                "--method",
                method,
                *args,
                "--no-progress",
                "--overwrite",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    return folder


def finetune_arm(source: Path, arm: str, tokens: int, seed: int) -> dict:
    args, lr = FINETUNE[arm]
    out = RUNS / f"finetune-{source.name}-{arm}-s{seed}"
    marker = out / "bench_settings.json"
    settings = {"args": args, "lr": lr, "tokens": tokens, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == settings:
        report = json.loads((out / "finetune_report.json").read_text())
        if "train_peak_rss_mb" in report:  # (runs from before the training's own peak was measured run again)
            return report
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "upcycle.cli",
            "finetune",
            str(source),
            str(out),
            *args,
            "--lr",
            str(lr),
            "--tokens",
            str(tokens),
            "--seed",
            str(seed),
            "--no-progress",
            "--overwrite",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    marker.write_text(json.dumps(settings))
    return json.loads((out / "finetune_report.json").read_text())


def finetune_part(target: str, tokens: int, seeds: int, method: str = "wanda") -> dict:
    source = pruned_source(method, target)
    out = {}
    for arm in FINETUNE:
        runs = [finetune_arm(source, arm, tokens, seed) for seed in range(seeds if arm in ("seft", "lora_star") else 1)]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out[arm] = runs[0]
            continue
        mean = lambda key: sum(r["after"][key] for r in ok) / len(ok)  # noqa: E731
        out[arm] = {
            "task_accuracy": mean("task_accuracy"),
            "ppl": mean("ppl"),
            "task_accuracy_seeds": [r["after"]["task_accuracy"] for r in ok],
            "ppl_seeds": [r["after"]["ppl"] for r in ok],
            "before": ok[0]["before"],
            "sparsity_exact": all(r["sparsity_exact"] for r in ok),
            "sparsity_after": ok[0]["sparsity_after"],
            "peak_rss_mb": ok[0]["peak_rss_mb"],
            "train_peak_rss_mb": ok[0]["train_peak_rss_mb"],
            "rss_before_train_mb": ok[0]["rss_before_train_mb"],
            "s_per_step": ok[0]["s_per_step"],
            "trainable_params": ok[0]["trainable_params"],
            "optimizer_state_mb": ok[0]["optimizer_state_mb"],
            "steps": ok[0]["steps"],
        }
        print(f"finetune {target} {arm}: {out[arm]}", flush=True)
    return out


def _paired(a: list, b: list, higher_better: bool = True) -> str:
    """Seed by seed (the same data order for both arms), or against the other arm's spread with one seed."""
    sign = 1 if higher_better else -1
    if len(a) == len(b) > 1:
        diffs = [sign * (x - y) for x, y in zip(a, b)]
        word = (
            "tied (equal in every seed)"
            if all(d == 0 for d in diffs)
            else "reproduced"
            if all(d >= 0 for d in diffs)
            else "not reproduced"
            if all(d < 0 for d in diffs)
            else "mixed across seeds"
        )
        return f"{word} (per seed {', '.join(f'{d:+.3f}' for d in diffs)})"
    margin = sign * (sum(a) / len(a) - sum(b) / len(b))
    spread = max(max(a) - min(a), max(b) - min(b))
    word = "reproduced" if margin >= spread else ("not reproduced" if margin < -spread else "within the seed spread")
    return f"{word} (margin {margin:+.3f}, seed spread {spread:.3f})"


def cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "—"


def tables(results: dict) -> str:
    """The README's tables and claims, from the JSON."""
    lines = []
    ours, theirs = results.get("oneshot", {}), results.get("llmcompressor", {})
    if ours:
        dense = next(iter(ours.values())).get("ppl_dense")
        lines += [
            f"One shot (dense ppl {dense:.2f}); seconds of the pruning itself (upcycle: `prune`; llm-compressor: "
            "its `oneshot` call); peak memory of the process through load and prune (upcycle: read before "
            "scoring; llm-compressor: at exit, after saving):",
            "",
            "| target | method | upcycle ppl | s | peak MB | llm-compressor ppl | s | peak MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for target in TARGETS:
            for method in METHODS:
                u, t = ours.get(f"{method}_{target}", {}), theirs.get(f"{method}_{target}", {})
                lines.append(
                    f"| {target if ':' in target else target + ' %'} | {method} | {cell(u, 'ppl', '.2f')} | "
                    f"{cell(u, 'seconds', '.1f')} | {cell(u, 'peak_rss_mb', '.0f')} | {cell(t, 'ppl', '.2f')} | "
                    f"{cell(t, 'seconds', '.1f')} | {cell(t, 'peak_rss_mb', '.0f')} |"
                )
        lines.append("")
    setup = results.get("finetune_setup", {})
    for key, arms in results.get("finetune_by_target", {}).items():
        ok = {k: v for k, v in arms.items() if isinstance(v, dict) and "task_accuracy" in v}
        if not ok:
            continue
        target, source = key.split("-")[0], arms.get("source", "wanda")
        before = next(iter(ok.values()))["before"]
        lines += [
            f"Fine-tuning the {source} {target if ':' in target else target + ' %'} model, "
            f"{setup.get('tokens', 0):,} tokens each (before: exact match {before['task_accuracy']:.3f}, "
            f"ppl {before['ppl']:.2f}); peak memory while training (from the trainer's start to its end) and "
            "of the whole run (load, score, train, merge, score, save):",
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
            lines += [
                "",
                f"- SEFT ≥ LoRA* in exact match: {_paired(s['task_accuracy_seeds'], ls['task_accuracy_seeds'])}; "
                f"in held-out ppl: {_paired(s['ppl_seeds'], ls['ppl_seeds'], higher_better=False)}",
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
    targets = list(TARGETS)
    arms = [("upcycle " + m, results["oneshot"], m) for m in METHODS]
    arms += [("llm-compressor " + m, results.get("llmcompressor", {}), m) for m in ("wanda", "sparsegpt")]
    width = 0.8 / len(arms)
    for n, (label, table, method) in enumerate(arms):
        ppl = [table.get(f"{method}_{t}", {}).get("ppl", float("nan")) for t in targets]
        secs = [table.get(f"{method}_{t}", {}).get("seconds", float("nan")) for t in targets]
        xs = [i + (n - len(arms) / 2 + 0.5) * width for i in range(len(targets))]
        axes[0].bar(xs, ppl, width, label=label)
        axes[1].bar(xs, secs, width, label=label)
    dense = next(iter(results["oneshot"].values())).get("ppl_dense")
    if dense:
        axes[0].axhline(dense, color="k", ls="--", lw=1, label="dense")
    for ax, title in zip(axes, ("held-out perplexity (log)", "seconds of pruning")):
        ax.set_xticks(range(len(targets)), [f"{t} %" if ":" not in t else t for t in targets])
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    if tuned:  # fine-tuning: task exact match after, per arm and pruned model (seeds as dots)
        names = list(next(iter(tuned.values())))
        width = 0.8 / len(names)
        for n, arm in enumerate(names):
            for i, arms in enumerate(tuned.values()):
                if arm in arms:
                    x = i + (n - len(names) / 2 + 0.5) * width
                    axes[2].bar(x, arms[arm]["task_accuracy"], width, color=f"C{n}", label=arm if i == 0 else None)
                    axes[2].plot(
                        [x] * len(arms[arm]["task_accuracy_seeds"]), arms[arm]["task_accuracy_seeds"], "k.", ms=3
                    )
        for i, arms in enumerate(tuned.values()):
            before = next(iter(arms.values()))["before"]["task_accuracy"]
            axes[2].hlines(before, i - 0.45, i + 0.45, colors="k", linestyles=":", label="before" if i == 0 else None)
        axes[2].set_xticks(range(len(tuned)), [k.replace("-", "\n") for k in tuned])
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
    parser.add_argument("--table", action="store_true", help="print the README tables from the JSON and stop")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "TARGET", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        prune_in_child(*args.child)
        return
    if args.table:
        print(tables(load("prune_seft")))
        return
    results = load("prune_seft")
    results.update(
        {
            "model": MODEL,
            "calibration": f"{CALIBRATION_BLOCKS} × {SEQ} tokens of {TEXT} (train split)",
            "held_out": f"{HELD_BLOCKS} × {SEQ} tokens (validation split)",
        }
    )
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
