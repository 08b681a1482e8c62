"""slim on smollm2-135m: cut to about half its non-embedding parameters and recovered by distillation —
does it beat the same architecture from scratch, which recovery losses help, is progressive better
than one-shot, which criteria cut best, and how do expert cuts compare on a grown MoE?

    python benchmarks/slim.py                 # everything (under 90 minutes on 2 CPU cores)
    python benchmarks/slim.py --tokens 8192   # shorter (default 16384 a trained arm)
    python benchmarks/slim.py --part oneshot  # every criterion's one-shot cost, no training (minutes)
    python docs/tables.py                     # the docs' tables from the JSON

The shape: 30 → 20 layers (block influence) and hidden 576 → 432 (RMSNorm importance): 20 layers ×
hidden 432 (9 query / 3 key-value heads, FFN 1536), 53.1M of the 106.2M non-embedding parameters.
Every trained arm gets the same N recovery tokens of shakespeare + pystdlib (seq 256, batch 8, AdamW
3e-4 cosine) and is scored on the same held-out blocks (32 × 256 tokens of both corpora):
  pruned_kd_lm      both cuts at once, then KD from the source + LM (the KD share 1.0 → 0.75)
  pruned_kd / pruned_lm / pruned_kd_lm_mtp   the same cuts, KD alone, LM alone, KD + LM + MTP
  progressive       the depth cut, 10 % of the tokens, the width cut, the other 90 % (KD + LM)
  scratch           the same architecture from random initialisation, KD + LM from the source
  one_shot          = pruned_kd_lm (every cut at stage 1)
Criteria: the one-shot perplexity of each depth criterion (10 layers) and of the width cuts, and the
depth criteria again after N tokens (depth cut alone, KD + LM). Experts: smollm2-135m grown by
Drop-Upcycling into a Mixtral of 8 experts (top-2, no shared expert, so the experts differ and each
one matters) and trained N tokens, cut to 4 experts by each criterion × mode one shot, and the three
modes with REAP after N tokens (`--part experts_shared`: the same one-shot cuts on benchmarks/grow.py's
shared-expert MoE, where they cost < 0.1 %). Two seeds (data orders) for the arms whose margins are
small; one for MTP and scratch, whose margins are tens of per cent. Runs are kept in runs/bench-slim/
and reused when the script is run again with the same settings.
Peers (a throwaway environment, benchmarks/peers/): llm-compressor's REAP on the Drop-Upcycled MoE and
NVIDIA Model Optimizer's pruning on smollm2-135m.
Results: benchmarks/results/slim.json and slim.png.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch
from harness import RESULTS, command, curves, figure, load, mark, reused, save, seed_margin, train
from peers import driver, peer_python
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from upcycle import data, hub
from upcycle.commands.grow import GrowChecks, GrowConfig, GrowStepOptions
from upcycle.commands.grow import run as grow_run
from upcycle.commands.slim import RunOptions, SlimConfig
from upcycle.commands.slim import run as slim_run
from upcycle.eval import perplexity

RUNS = Path("runs/bench-slim")
MODEL = "smollm2-135m"
TEXT = "shakespeare+pystdlib"
DEPTH = {"op": "depth", "layers": 10, "criterion": "block_influence"}
WIDTH = {"op": "hidden", "hidden": 432}
SHAPE = "20 layers × hidden 432 (9 query / 3 key-value heads, FFN 1536)"
GROWN_MOE = Path("runs/bench-grow/train-grown-65536/final")
QUIET = RunOptions(progress=False, overwrite=True)
# name in the JSON -> (the cut, its row in the table: what is cut, by which criterion)
WIDTH_CUTS = {
    "hidden_rmsnorm_432": (WIDTH, "hidden 576 → 432", "rmsnorm"),
    "ffn_activation_1024": ({"op": "ffn_width", "width": 1024}, "FFN 1536 → 1024", "activation"),
    "heads_output_norm_6": ({"op": "heads", "heads": 6}, "query heads 9 → 6", "output_norm"),
}
RECOVERY_ARMS = ("pruned_kd_lm", "pruned_kd", "pruned_lm", "pruned_kd_lm_mtp", "progressive", "scratch")
# Arms whose margin over their comparison was tens of per cent with two seeds: one seed is enough.
ONE_SEED = ("pruned_kd_lm_mtp",)
CLAIMS = (  # (statement, better arm, worse arm)
    ("pruned + KD + LM beats the same architecture from scratch", "pruned_kd_lm", "scratch"),
    ("KD + LM beats KD alone", "pruned_kd_lm", "pruned_kd"),
    ("KD + LM beats LM alone", "pruned_kd_lm", "pruned_lm"),
    ("+ MTP helps", "pruned_kd_lm_mtp", "pruned_kd_lm"),
    ("progressive beats one-shot", "progressive", "pruned_kd_lm"),
)


def slim(
    name: str, plan: list[dict], tokens: int, recovery="kd_lm", seed=0, source=MODEL, teacher=None, make_source=None
) -> dict:
    """One arm through `upcycle slim` (reused when its folder holds the same settings); `make_source()` makes
    the source folder, called only when the run is made."""
    out = RUNS / name
    settings = {
        "plan": plan,
        "tokens": tokens,
        "recovery": recovery,
        "seed": seed,
        "source": source,
        "teacher": teacher,
    }
    if (report := reused(out, settings, "slim_report.json")) is not None:
        return report
    if make_source is not None:
        make_source()
    stages = [
        {"name": s.get("name", f"stage{n}"), "cuts": s["cuts"], "tokens": s["tokens"]} for n, s in enumerate(plan)
    ]
    start = time.perf_counter()
    result = slim_run(
        source, str(out), SlimConfig(stages=stages, recovery=recovery, seed=seed, teacher=teacher), options=QUIET
    )
    result["seconds"] = time.perf_counter() - start
    result["config"] = json.loads((out / "config.json").read_text())  # the architecture, for scratch_folder
    (out / "slim_report.json").write_text(json.dumps(result, indent=2))
    mark(out, settings, "slim_report.json")
    for weights in out.glob("*.safetensors"):  # the benchmark reads the reports; 30-odd models would fill the disk
        weights.unlink()
    return result


def one_cut(name: str, cut: dict, tokens: int, trained: bool, source: str = MODEL) -> dict:
    """A single cut: one shot (no training), or trained `tokens` (whose report has the cut one shot too)."""
    if trained:
        return slim(f"{name}-trained", [{"cuts": [cut], "tokens": tokens}], tokens, source=source)
    return slim(name, [{"cuts": [cut], "tokens": 0}], 0, source=source)


def curve(name: str, key: str = "val_ppl") -> list[tuple[int, float]]:
    """(tokens, value) of a recovery run's metrics: validation perplexity, or the training `loss` per step."""
    path = RUNS / name / "recovery" / "metrics.jsonl"
    records = [json.loads(line) for line in open(path)] if path.exists() else []
    return [(r["tokens"], r[key]) for r in records if key in r]


def scratch_folder(pruned: Path) -> str:
    """The pruned arm's architecture with random weights (a stock folder), for the from-scratch arm: from
    its folder, or from its report where only that is kept (a run restored from reproduce.py's ledger)."""
    folder = RUNS / "scratch-init"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        if (pruned / "config.json").exists():
            config = AutoConfig.from_pretrained(pruned)
        else:
            kept = json.loads((pruned / "slim_report.json").read_text())["config"]
            config = AutoConfig.for_model(kept.pop("model_type"), **kept)
        model = AutoModelForCausalLM.from_config(config)
        hub.save(model, AutoTokenizer.from_pretrained(hub.builtin_folder(MODEL)), folder, overwrite=True)
    return str(folder)


def criteria_part(tokens: int, trained: bool = True) -> dict:
    """One-shot cost of every criterion; the depth criteria again after `tokens` (when `trained`)."""
    out = {"depth": {}, "width": {}}
    cuts = [("depth", c, f"depth-{c}", {**DEPTH, "criterion": c}) for c in ("last", "block_influence", "angular")]
    cuts += [("width", name, name, cut) for name, (cut, _, _) in WIDTH_CUTS.items()]
    for kind, name, slug, cut in cuts:
        run = one_cut(f"criteria-{slug}", cut, tokens, trained)
        one = run["cuts"][0]
        row = out[kind][name] = {"one_shot_ppl": one["ppl_after"], "kl": one["kl"], "params": one["params_after"]}
        if kind == "depth":
            row["removed"] = one["removed"]["removed_layers"]
        if trained:
            row["ppl_after_tokens"] = run["ppl"]["slim"]
        print(f"{kind} {name}: {row}", flush=True)
    out["teacher_ppl"] = run["ppl"]["source"]
    return out


def recovery_part(tokens: int, seeds: int) -> dict:
    one_shot = [{"name": "cuts", "cuts": [DEPTH, WIDTH], "tokens": tokens}]
    tenth = (tokens // 10) // 2048 * 2048 or 2048
    progressive = [
        {"name": "depth", "cuts": [DEPTH], "tokens": tenth},
        {"name": "width", "cuts": [WIDTH], "tokens": tokens - tenth},
    ]
    arms = {arm: (one_shot, arm.removeprefix("pruned_")) for arm in RECOVERY_ARMS[:4]}
    arms["progressive"] = (progressive, "kd_lm")
    spread = {}
    for arm, (plan, recovery) in arms.items():
        spread[arm] = [
            slim(f"{arm}-s{seed}", plan, tokens, recovery, seed)["ppl"]["slim"]
            for seed in range(1 if arm in ONE_SEED else seeds)
        ]
        print(f"{arm}: {spread[arm]}", flush=True)
    scratch = slim("scratch", [{"cuts": [], "tokens": tokens}], tokens, source=str(RUNS / "scratch-init"),
                   teacher=MODEL, make_source=lambda: scratch_folder(RUNS / "pruned_kd_lm-s0"))  # fmt: skip
    spread["scratch"] = [scratch["ppl"]["slim"]]
    runs = {arm: f"{arm}-s0" for arm in arms} | {"scratch": "scratch"}
    ppl = {arm: statistics.mean(values) for arm, values in spread.items()}
    ppl["one_shot"] = ppl["pruned_kd_lm"]
    # both cuts one shot, before training: the last cut of the one-shot arm reports the model with both
    cuts = json.loads((RUNS / "pruned_kd_lm-s0" / "slim_report.json").read_text())["cuts"]
    return {
        "ppl": ppl,
        "seeds": spread,
        "curves": {arm: curve(run) for arm, run in runs.items()},
        "loss_curves": {arm: curve(run, "loss") for arm, run in runs.items()},
        "both_one_shot_ppl": cuts[-1]["ppl_after"],
        "params": {"source": cuts[0]["params_before"], "slim": cuts[-1]["params_after"]},
    }


def drop_moe(tokens: int) -> Path:
    """The expert test bed: smollm2-135m grown into a stock Mixtral of 8 experts (top-2, k-means router) by
    Drop-Upcycling (half of each expert's neurons re-drawn, so the experts differ and no shared expert
    carries the dense FFN), then trained `tokens` (LM + balance + router z-loss). Returns its folder."""
    grown, final = RUNS / "moe-drop" / "grown", RUNS / "moe-drop" / f"trained-{tokens}" / "final"
    if (final / "config.json").exists():
        return final
    if not (grown / "config.json").exists():
        step = GrowStepOptions(op="moe", family="mixtral", experts=8, top_k=2, mode="drop", drop_ratio=0.5)
        # an initialisation for training, far from the FFN by design
        checks = GrowChecks(max_loss_change=1e9, min_logit_cosine=-1.0, max_router_kl=1e9)
        grow_run(MODEL, str(grown), GrowConfig(), step, checks, QUIET)
    model, tokenizer = hub.load(grown)
    losses = [{"name": "lm"}, {"name": "balance", "weight": 0.01}, {"name": "router_z", "weight": 0.001}]
    train(model, tokenizer, final.parent, tokens, source=str(grown), text=TEXT, losses=losses)
    shutil.rmtree(final.parent / "checkpoints", ignore_errors=True)  # 8 GB of optimizer state nobody resumes
    return final


def experts_part(tokens: int, bed: str = "drop", trained_arms: bool = True) -> dict:
    source = GROWN_MOE if bed == "shared" else drop_moe(tokens)
    if not (source / "config.json").exists():
        return {"skipped": f"{source} is missing: run `python benchmarks/grow.py --part train` first"}
    kept = "shared expert kept" if bed == "shared" else "no shared expert"
    out = {"source": str(source), "cut": f"8 → 4 routed experts per layer (top-2 kept), {kept}"}
    one_shot, trained = {}, {}
    for criterion in ("frequency", "soft", "reap"):
        for mode in ("prune", "merge", "partial"):
            cut, key = {"op": "experts", "experts": 4, "criterion": criterion, "mode": mode}, f"{criterion}/{mode}"
            trains = criterion == "reap" and trained_arms  # REAP also after N tokens
            r = one_cut(
                f"experts-{'' if bed == 'shared' else 'drop-'}{criterion}-{mode}", cut, tokens, trains, str(source)
            )
            if trains:
                trained[key] = r["ppl"]["slim"]
            one = r["cuts"][0]
            one_shot[key] = {
                "ppl": one["ppl_after"],
                "kl": one["kl"],
                "kept": {i: layer["kept"] for i, layer in one["removed"]["layers"].items()},
            }
            out["source_ppl"] = one["ppl_before"]
            print(f"experts {key}: one-shot {one['ppl_after']:.3f}, trained {trained.get(key)}", flush=True)
    return out | {"one_shot": one_shot, "after_tokens": trained}


def blocks_json(tokenizer, split: str, path: Path) -> tuple[Path, torch.Tensor]:
    """The 32 × 256 blocks `upcycle slim` calibrates on (train) or scores (validation), written for a peer."""
    blocks = data.blocks(TEXT, tokenizer, split, 256, max_blocks=32)
    path.write_text(json.dumps({"input_ids": blocks.tolist()}))
    return path, blocks


def reap_peer(python, experts: dict, work: Path) -> dict:
    """llm-compressor's REAP on the expert test bed, scored on upcycle's held-out blocks; kept experts compared."""
    moe = Path(experts["source"])
    tokenizer = AutoTokenizer.from_pretrained(moe)
    calibration, _ = blocks_json(tokenizer, "train", work / "calibration.json")
    _, held = blocks_json(tokenizer, "validation", work / "held.json")
    folder = work / "llmcompressor-reap"
    out = command(python, driver("llmcompressor_reap"), moe, calibration, folder, "--sparsity", 0.5)
    if isinstance(out, dict):
        return out
    run = json.loads(out.strip().splitlines()[-1])
    pruned, _ = hub.load(folder)
    ppl = run["ppl_as_saved"] = perplexity(pruned, held, progress=False).ppl
    if _mixtral_expert_names(folder):  # its folder as transformers 5 can read it: see below
        pruned, _ = hub.load(folder)
        ppl = perplexity(pruned, held, progress=False).ppl
    ours = experts["one_shot"]["reap/prune"]  # upcycle's REAP prune, one shot, on the same blocks
    # Kept experts per layer, theirs (keyed by module name) against ours (by layer index).
    retained = json.loads((folder / "retained.json").read_text())
    theirs = {int(next(p for p in name.split(".") if p.isdigit())): sorted(kept) for name, kept in retained.items()}
    mine = {int(i): sorted(kept) for i, kept in ours["kept"].items()}
    same = sum(len(set(theirs[i]) & set(mine[i])) for i in mine) / sum(len(k) for k in mine.values())
    return {
        "one_shot_ppl": ppl,
        "source_ppl": experts["source_ppl"],
        "experts": pruned.config.num_experts,
        "kept_theirs": theirs,
        "kept_ours": mine,
        "kept_agreement": same,
        "upcycle_reap_prune_ppl": ours["ppl"],
        **run,
    }


def modelopt_peer(python, work: Path) -> dict:
    """NVIDIA Model Optimizer on the dense model: FastNAS's search space is the FFN width, so it is set the
    parameter count of upcycle's own FFN cut (1536 → 1024 by activation importance) and compared with it."""
    tokenizer = AutoTokenizer.from_pretrained(hub.builtin_folder(MODEL))
    calibration, _ = blocks_json(tokenizer, "train", work / "dense_calibration.json")
    held, _ = blocks_json(tokenizer, "validation", work / "dense_held.json")
    ours = one_cut("criteria-ffn_activation_1024", WIDTH_CUTS["ffn_activation_1024"][0], 0, False)["cuts"][0]
    share = f"{ours['params_after'] / ours['params_before']:.4f}"
    out = command(python, driver("modelopt_prune"), hub.builtin_folder(MODEL), calibration, held, "--params", share)
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")] if isinstance(out, str) else [out]
    return {
        "runs": runs,
        "upcycle_ffn_1024": {"ppl": ours["ppl_after"], "params": ours["params_after"], "seconds": ours["seconds"]},
    }


def peers_part(experts: dict, previous: dict | None = None) -> dict:
    """The peers' one-shot results on the same model and text: llm-compressor's REAP expert pruning on the
    expert test bed of `experts` (experts_part's result) and NVIDIA Model Optimizer's pruning on smollm2-135m.
    Where the expert test bed is not on this machine, the REAP row of `previous` is kept as it was measured."""
    try:
        python = peer_python()
    except subprocess.CalledProcessError as e:
        return {"skipped": f"installing the peers failed: {(e.stderr or '').strip().splitlines()[-1:]}"}
    out, work = {}, RUNS / "peers"
    work.mkdir(parents=True, exist_ok=True)
    if "one_shot" in experts and (Path(experts["source"]) / "config.json").exists():
        out["llmcompressor_reap"] = reap_peer(python, experts, work)
        print(f"llm-compressor REAP: {out['llmcompressor_reap']}", flush=True)
    elif "llmcompressor_reap" in (previous or {}):
        out["llmcompressor_reap"] = previous["llmcompressor_reap"]  # its test bed is not here: the row as measured
    out["modelopt"] = modelopt_peer(python, work)
    print(f"modelopt: {out['modelopt']}", flush=True)
    return out


def _mixtral_expert_names(folder: Path) -> bool:
    """llm-compressor 0.14 saves a Mixtral's experts as `block_sparse_moe.experts.N.{gate,up,down}_proj`, names
    transformers 5's Mixtral loader does not map (it reads the original `w1`/`w3`/`w2`): loaded as saved, the
    experts are left at random initialisation. Rename them in place; True when something was renamed."""
    original = {"gate": "w1.", "up": "w3.", "down": "w2."}
    renamed = False
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        names = {
            k: re.sub(r"(\.experts\.\d+\.)(gate|up|down)_proj\.", lambda m: m[1] + original[m[2]], k) for k in tensors
        }
        if any(k != v for k, v in names.items()):
            save_file({names[k]: v for k, v in tensors.items()}, path, metadata={"format": "pt"})
            renamed = True
    return renamed


def claim(better: str, worse: str, ppl: dict, seeds: dict) -> str:
    """How a recovery arm compares (lower perplexity is better): both arms' mean perplexities and the seeds."""
    paired = seed_margin(seeds[better], seeds[worse], higher_better=False, digits=2)
    return f"{ppl[better]:.2f} vs {ppl[worse]:.2f}, {paired}"


def tables(results: dict) -> str:
    """The docs' tables and claims, from the JSON."""
    lines = []
    rec, crit = results.get("recovery", {}), results.get("criteria", {})
    if rec:
        ppl, seeds = rec["ppl"], rec["seeds"]
        lines += [
            f"Recovery, {results['tokens']:,} tokens each ({results['shape']}; teacher ppl {results['ppl']['teacher']:.2f}):",
            "",
            "| arm | held-out ppl (mean) | seeds |",
            "|---|---|---|",
        ]
        lines += [f"| {arm} | {ppl[arm]:.2f} | {', '.join(f'{v:.2f}' for v in seeds[arm])} |" for arm in RECOVERY_ARMS]
        lines += (
            ["", "Arm against arm (figures; the verdicts are claims.json's, docs/claims.md):"]
            + [f"- {text}: {claim(a, b, ppl, seeds)}" for text, a, b in CLAIMS]
            + [""]
        )
    if crit:
        lines += [
            f"Criteria (teacher ppl {crit['teacher_ppl']:.2f}):",
            "",
            "| cut | criterion | parameters | one-shot ppl | after N tokens |",
            "|---|---|---|---|---|",
        ]
        rows = [("10 of 30 layers", name, row) for name, row in crit["depth"].items()]
        rows += [(WIDTH_CUTS[name][1], WIDTH_CUTS[name][2], row) for name, row in crit["width"].items()]
        for cut, criterion, row in rows:
            after = f"{row['ppl_after_tokens']:.4g}" if row.get("ppl_after_tokens") else "—"
            lines.append(f"| {cut} | {criterion} | {row['params'] / 1e6:.1f}M | {row['one_shot_ppl']:.4g} | {after} |")
        lines.append("")
    for exp in (results.get(key, {}) for key in ("experts", "experts_shared")):
        if "one_shot" not in exp:
            continue
        lines += [
            f"Experts ({exp['cut']}; source ppl {exp['source_ppl']:.2f}), one-shot ppl:",
            "",
            "| criterion | prune | merge | partial |",
            "|---|---|---|---|",
        ]
        for c in ("frequency", "soft", "reap"):
            lines.append(
                f"| {c} | "
                + " | ".join(f"{exp['one_shot'][f'{c}/{m}']['ppl']:.3f}" for m in ("prune", "merge", "partial"))
                + " |"
            )
        if exp["after_tokens"]:
            lines += ["", "After N tokens (REAP): " + ", ".join(f"{k} {v:.3f}" for k, v in exp["after_tokens"].items())]
        lines.append("")
    if "seconds" in results:
        lines.append("Seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Training loss per step (left) and validation perplexity (right) of each recovery arm, seed 0."""
    recovery = results.get("recovery", {})
    fig, axes = figure(2, size=(11, 4.5))
    for ax, key in zip(axes, ("loss_curves", "curves")):
        curves(ax, recovery.get(key, {}), log=True)
        ax.set_xlabel("recovery tokens")
    if teacher := results.get("ppl", {}).get("teacher"):
        axes[1].axhline(teacher, color="k", ls="--", lw=1, label="teacher (source)")
    axes[0].set_ylabel("training loss (its recovery loss, log)")
    axes[1].set_ylabel("validation perplexity (log)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"smollm2-135m → {results.get('shape', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PARTS = ("all", "oneshot", "criteria", "recovery", "experts", "experts_shared", "peers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="recovery tokens of every trained arm")
    parser.add_argument("--seeds", type=int, default=2, help="seeds (data orders) of each recovery arm")
    parser.add_argument(
        "--part",
        choices=PARTS,
        default="all",
        help="oneshot: every criterion's one-shot cost only, no training (minutes); "
        "experts_shared: the expert cuts one shot on grow.py's shared-expert MoE (not in all)",
    )
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    results = load("slim") | {"model": MODEL, "shape": SHAPE, "tokens": args.tokens, "text": TEXT}
    seconds = results.setdefault("seconds", {})
    if args.part == "all":  # a fresh timing of the whole benchmark (the shared-expert bed is not part of it)
        seconds = results["seconds"] = {k: v for k, v in seconds.items() if k == "experts_shared"}
    parts = {  # in this order: the MoE test bed first (the heaviest, and the one the peers' REAP reads)
        "oneshot": ("criteria_one_shot", lambda: criteria_part(args.tokens, trained=False)),
        "experts": ("experts", lambda: experts_part(args.tokens)),
        "criteria": ("criteria", lambda: criteria_part(args.tokens)),
        "recovery": ("recovery", lambda: recovery_part(args.tokens, args.seeds)),
        "experts_shared": ("experts_shared", lambda: experts_part(args.tokens, bed="shared", trained_arms=False)),
        "peers": ("peers", lambda: peers_part(results.get("experts", {}), results.get("peers"))),
    }
    chosen = {"all": ("experts", "criteria", "recovery", "peers"), "recovery": ("criteria", "recovery")}
    started = time.perf_counter()
    for part in chosen.get(args.part, (args.part,)):
        key, fn = parts[part]
        t0 = time.perf_counter()
        results[key] = fn()
        seconds[part] = round(time.perf_counter() - t0, 1)
        if part == "recovery":
            results["params"] = results["recovery"]["params"]
            results["ppl"] = {"teacher": results["criteria"]["teacher_ppl"], **results["recovery"]["ppl"]}
        save("slim", results)  # after every part: a long run that stops keeps what it measured
    if args.part == "all":
        seconds["all"] = round(time.perf_counter() - started, 1)
    save("slim", results)
    plot(results, RESULTS / "slim.png")
    print(f"wrote {RESULTS / 'slim.json'}")


if __name__ == "__main__":
    main()
