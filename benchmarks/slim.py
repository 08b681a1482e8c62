"""slim on smollm2-135m: cut to about half its non-embedding parameters and recovered by distillation —
does it beat the same architecture from scratch, which recovery losses help, is progressive better
than one-shot, which criteria cut best, and how do expert cuts compare on a grown MoE?

    python benchmarks/slim.py                 # everything (under 90 minutes on 2 CPU cores)
    python benchmarks/slim.py --tokens 8192   # shorter (default 16384 a trained arm)
    python benchmarks/slim.py --part oneshot  # every criterion's one-shot cost, no training (minutes)

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
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from harness import RESULTS, figure, load, save
from peers import driver, peer_python

RUNS = Path("runs/bench-slim")
MODEL = "smollm2-135m"
TEXT = "shakespeare+pystdlib"
DEPTH = {"op": "depth", "layers": 10, "criterion": "block_influence"}
WIDTH = {"op": "hidden", "hidden": 432}
SHAPE = "20 layers × hidden 432 (9 query / 3 key-value heads, FFN 1536)"
GROWN_MOE = Path("runs/bench-grow/train-grown-65536/final")


def slim(
    name: str,
    plan: list[dict],
    tokens: int,
    recovery: str = "kd_lm",
    seed: int = 0,
    source: str = MODEL,
    teacher: str | None = None,
) -> dict:
    """One arm through `upcycle slim` (reused when its folder holds the same settings)."""
    from upcycle.commands.slim import RunOptions, SlimConfig, run

    out = RUNS / name
    settings = {
        "plan": plan,
        "tokens": tokens,
        "recovery": recovery,
        "seed": seed,
        "source": source,
        "teacher": teacher,
    }
    marker = out / "bench_settings.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return json.loads((out / "slim_report.json").read_text())
    stages = [
        {"name": s.get("name", f"stage{n}"), "cuts": s["cuts"], "tokens": s["tokens"]} for n, s in enumerate(plan)
    ]
    config = SlimConfig(stages=stages, recovery=recovery, seed=seed, teacher=teacher)
    start = time.perf_counter()
    result = run(source, str(out), config, options=RunOptions(progress=False, overwrite=True))
    result["seconds"] = time.perf_counter() - start
    (out / "slim_report.json").write_text(json.dumps(result, indent=2))
    marker.write_text(json.dumps(settings))
    for weights in out.glob("*.safetensors"):  # the benchmark reads the reports; 30-odd models would fill the disk
        weights.unlink()
    return result


def curve(name: str, key: str = "val_ppl") -> list[tuple[int, float]]:
    """(tokens, value) of a recovery run's metrics: validation perplexity, or the training `loss` per step."""
    path = RUNS / name / "recovery" / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in open(path)]
    return [(r["tokens"], r[key]) for r in records if key in r]


def scratch_folder(pruned: Path) -> str:
    """The architecture of the pruned arm in folder `pruned` with random weights (a stock folder), for the
    from-scratch arm (only the pruned folder's config and tokenizer are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from upcycle import hub

    folder = RUNS / "scratch-init"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pruned))
        hub.save(model, AutoTokenizer.from_pretrained(pruned), folder, overwrite=True)
    return str(folder)


def criteria_part(tokens: int, trained: bool = True) -> dict:
    """One-shot cost of every criterion; the depth criteria again after `tokens` (when `trained`)."""
    out = {"depth": {}, "width": {}}
    for criterion in ("last", "block_influence", "angular"):
        cut = {**DEPTH, "criterion": criterion}
        # a trained arm reports its cut one shot before training: no separate one-shot run is needed
        run = (
            slim(f"criteria-depth-{criterion}-trained", [{"cuts": [cut], "tokens": tokens}], tokens)
            if trained
            else slim(f"criteria-depth-{criterion}", [{"cuts": [cut], "tokens": 0}], 0)
        )
        one = run["cuts"][0]
        out["depth"][criterion] = {
            "one_shot_ppl": one["ppl_after"],
            "kl": one["kl"],
            "removed": one["removed"]["removed_layers"],
            "params": one["params_after"],
        }
        if trained:
            out["depth"][criterion]["ppl_after_tokens"] = run["ppl"]["slim"]
        print(f"depth {criterion}: {out['depth'][criterion]}", flush=True)
    for name, cut in (
        ("hidden_rmsnorm_432", WIDTH),
        ("ffn_activation_1024", {"op": "ffn_width", "width": 1024}),
        ("heads_output_norm_6", {"op": "heads", "heads": 6}),
    ):
        run = (
            slim(f"criteria-{name}-trained", [{"cuts": [cut], "tokens": tokens}], tokens)
            if trained
            else slim(f"criteria-{name}", [{"cuts": [cut], "tokens": 0}], 0)
        )
        one = run["cuts"][0]
        out["width"][name] = {"one_shot_ppl": one["ppl_after"], "kl": one["kl"], "params": one["params_after"]}
        if trained:
            out["width"][name]["ppl_after_tokens"] = run["ppl"]["slim"]
        print(f"width {name}: {out['width'][name]}", flush=True)
    out["teacher_ppl"] = run["ppl"]["source"]
    return out


# Arms whose margin over their comparison was tens of per cent with two seeds: one seed is enough.
ONE_SEED = ("pruned_kd_lm_mtp",)


def recovery_part(tokens: int, seeds: int) -> dict:
    one_shot = [{"name": "cuts", "cuts": [DEPTH, WIDTH], "tokens": tokens}]
    tenth = (tokens // 10) // 2048 * 2048 or 2048
    progressive = [
        {"name": "depth", "cuts": [DEPTH], "tokens": tenth},
        {"name": "width", "cuts": [WIDTH], "tokens": tokens - tenth},
    ]
    arms = {
        "pruned_kd_lm": (one_shot, "kd_lm"),
        "pruned_kd": (one_shot, "kd"),
        "pruned_lm": (one_shot, "lm"),
        "pruned_kd_lm_mtp": (one_shot, "kd_lm_mtp"),
        "progressive": (progressive, "kd_lm"),
    }
    ppl, spread, curves, losses = {}, {}, {}, {}
    for arm, (plan, recovery) in arms.items():
        values = []
        for seed in range(1 if arm in ONE_SEED else seeds):
            result = slim(f"{arm}-s{seed}", plan, tokens, recovery, seed)
            values.append(result["ppl"]["slim"])
            print(f"{arm} seed {seed}: {values[-1]:.3f}", flush=True)
        ppl[arm], spread[arm] = statistics.mean(values), values
        curves[arm], losses[arm] = curve(f"{arm}-s0"), curve(f"{arm}-s0", "loss")
    scratch = slim(
        "scratch",
        [{"cuts": [], "tokens": tokens}],
        tokens,
        "kd_lm",
        0,
        source=scratch_folder(RUNS / "pruned_kd_lm-s0"),
        teacher=MODEL,
    )
    ppl["scratch"], spread["scratch"], curves["scratch"] = (
        scratch["ppl"]["slim"],
        [scratch["ppl"]["slim"]],
        curve("scratch"),
    )
    losses["scratch"] = curve("scratch", "loss")
    ppl["one_shot"] = ppl["pruned_kd_lm"]
    # both cuts one shot, before training: the last cut of the one-shot arm reports the model with both
    cuts = json.loads((RUNS / "pruned_kd_lm-s0" / "slim_report.json").read_text())["cuts"]
    return {
        "ppl": ppl,
        "seeds": spread,
        "curves": curves,
        "loss_curves": losses,
        "both_one_shot_ppl": cuts[-1]["ppl_after"],
        "params": {"source": cuts[0]["params_before"], "slim": cuts[-1]["params_after"]},
    }


DROP_MOE = RUNS / "moe-drop"


def drop_moe(tokens: int) -> Path:
    """The expert test bed: smollm2-135m grown into a stock Mixtral of 8 experts (top-2, k-means router) by
    Drop-Upcycling (half of each expert's neurons re-drawn, so the experts differ and no shared expert
    carries the dense FFN), then trained `tokens` (LM + balance + router z-loss). Returns its folder."""
    from upcycle import hub
    from upcycle.commands.grow import GrowChecks, GrowConfig, GrowStepOptions, RunOptions
    from upcycle.commands.grow import run as grow_run
    from upcycle.train import TrainConfig, Trainer

    final = DROP_MOE / f"trained-{tokens}" / "final"
    if (final / "config.json").exists():
        return final
    grown = DROP_MOE / "grown"
    if not (grown / "config.json").exists():
        grow_run(
            MODEL,
            str(grown),
            GrowConfig(),
            GrowStepOptions(op="moe", family="mixtral", experts=8, top_k=2, mode="drop", drop_ratio=0.5),
            # an initialisation for training, far from the FFN by design
            GrowChecks(max_loss_change=1e9, min_logit_cosine=-1.0, max_router_kl=1e9),
            RunOptions(progress=False, overwrite=True),
        )
    model, tokenizer = hub.load(grown)
    cfg = TrainConfig.from_dict(
        dict(
            model=str(grown),
            data=TEXT,
            out=str(final.parent),
            seq_len=256,
            global_batch=8,
            micro_batch=4,
            lr=3e-4,
            warmup_steps=2,
            stages=[{"name": "main", "tokens": tokens}],
            ckpt_every=10_000,
            progress=False,
            losses=[{"name": "lm"}, {"name": "balance", "weight": 0.01}, {"name": "router_z", "weight": 0.001}],
        )
    )
    Trainer(cfg, model=model, tokenizer=tokenizer).fit()
    shutil.rmtree(final.parent / "checkpoints", ignore_errors=True)  # 8 GB of optimizer state nobody resumes
    return final


def experts_part(tokens: int, bed: str = "drop", trained_arms: bool = True) -> dict:
    source = GROWN_MOE if bed == "shared" else drop_moe(tokens)
    if not (source / "config.json").exists():
        return {"skipped": f"{source} is missing: run `python benchmarks/grow.py --part train` first"}
    kept = "shared expert kept" if bed == "shared" else "no shared expert"
    out = {"source": str(source), "cut": f"8 → 4 routed experts per layer (top-2 kept), {kept}"}
    tag = "" if bed == "shared" else "drop-"
    one_shot, trained = {}, {}
    for criterion in ("frequency", "soft", "reap"):
        for mode in ("prune", "merge", "partial"):
            cut = {"op": "experts", "experts": 4, "criterion": criterion, "mode": mode}
            if criterion == "reap" and trained_arms:  # trained after N tokens; its report has the cut one shot
                r = slim(
                    f"experts-{tag}reap-{mode}-trained", [{"cuts": [cut], "tokens": tokens}], tokens, source=str(source)
                )
                trained[f"reap/{mode}"] = r["ppl"]["slim"]
                print(f"experts reap/{mode} after {tokens}: {trained[f'reap/{mode}']:.3f}", flush=True)
            else:
                r = slim(f"experts-{tag}{criterion}-{mode}", [{"cuts": [cut], "tokens": 0}], 0, source=str(source))
            one_shot[f"{criterion}/{mode}"] = {
                "ppl": r["cuts"][0]["ppl_after"],
                "kl": r["cuts"][0]["kl"],
                "kept": {i: layer["kept"] for i, layer in r["cuts"][0]["removed"]["layers"].items()},
            }
            out["source_ppl"] = r["cuts"][0]["ppl_before"]
            print(f"experts {criterion}/{mode}: one-shot {one_shot[f'{criterion}/{mode}']['ppl']:.3f}", flush=True)
    out.update({"one_shot": one_shot, "after_tokens": trained})
    return out


def peers_part(experts: dict) -> dict:
    """The peers' one-shot results on the same model and text: llm-compressor's REAP expert pruning on the
    expert test bed of `experts` (experts_part's result; perplexity on the held-out blocks of upcycle's own
    cut, kept experts compared with ours), and
    NVIDIA Model Optimizer's pruning on smollm2-135m (its outcome, or the exact error)."""
    from upcycle import data, hub
    from upcycle.eval import perplexity

    try:
        python = peer_python()
    except subprocess.CalledProcessError as e:
        return {"skipped": f"installing the peers failed: {(e.stderr or '').strip().splitlines()[-1:]}"}
    out, work = {}, RUNS / "peers"
    work.mkdir(parents=True, exist_ok=True)
    moe = Path(experts.get("source", "-"))
    if "one_shot" in experts and (moe / "config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(moe)  # the model itself is not needed here
        # The same 32 × 256 calibration and held-out blocks `upcycle slim` reads (its defaults).
        calibration = data.blocks(TEXT, tokenizer, "train", 256, max_blocks=32)
        held = data.blocks(TEXT, tokenizer, "validation", 256, max_blocks=32)
        (work / "calibration.json").write_text(json.dumps({"input_ids": calibration.tolist()}))
        folder = work / "llmcompressor-reap"
        proc = subprocess.run(
            [
                str(python),
                driver("llmcompressor_reap"),
                str(moe),
                str(work / "calibration.json"),
                str(folder),
                "--sparsity",
                "0.5",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            out["llmcompressor_reap"] = {"error": proc.stderr.strip().splitlines()[-1]}
        else:
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            pruned, _ = hub.load(folder)
            ppl = run["ppl_as_saved"] = perplexity(pruned, held, progress=False).ppl
            if _mixtral_expert_names(folder):  # its folder as transformers 5 can read it: see below
                pruned, _ = hub.load(folder)
                ppl = perplexity(pruned, held, progress=False).ppl
            retained = json.loads((folder / "retained.json").read_text())
            ours = experts["one_shot"]["reap/prune"]  # upcycle's REAP prune, one shot, on the same blocks
            # Kept experts per layer, theirs (keyed by module name) against ours (by layer index).
            theirs = {
                int(next(p for p in name.split(".") if p.isdigit())): sorted(kept) for name, kept in retained.items()
            }
            mine = {int(i): sorted(kept) for i, kept in ours["kept"].items()}
            same = sum(len(set(theirs[i]) & set(mine[i])) for i in mine) / sum(len(k) for k in mine.values())
            out["llmcompressor_reap"] = {
                "one_shot_ppl": ppl,
                "source_ppl": experts["source_ppl"],
                "experts": pruned.config.num_experts,
                "kept_theirs": theirs,
                "kept_ours": mine,
                "kept_agreement": same,
                "upcycle_reap_prune_ppl": ours["ppl"],
                **run,
            }
        print(f"llm-compressor REAP: {out['llmcompressor_reap']}", flush=True)
    # NVIDIA Model Optimizer on the dense model: FastNAS's search space is the FFN width, so it is set the
    # parameter count of upcycle's own FFN cut (1536 → 1024 by activation importance) and compared with it
    model, tokenizer = hub.load(MODEL)
    calibration = data.blocks(TEXT, tokenizer, "train", 256, max_blocks=32)
    held = data.blocks(TEXT, tokenizer, "validation", 256, max_blocks=32)
    (work / "dense_calibration.json").write_text(json.dumps({"input_ids": calibration.tolist()}))
    (work / "dense_held.json").write_text(json.dumps({"input_ids": held.tolist()}))
    ours = slim("criteria-ffn_activation_1024", [{"cuts": [{"op": "ffn_width", "width": 1024}], "tokens": 0}], 0)
    share = ours["cuts"][0]["params_after"] / ours["cuts"][0]["params_before"]
    proc = subprocess.run(
        [
            str(python),
            driver("modelopt_prune"),
            str(hub.builtin_folder(MODEL)),
            str(work / "dense_calibration.json"),
            str(work / "dense_held.json"),
            "--params",
            f"{share:.4f}",
        ],
        capture_output=True,
        text=True,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    out["modelopt"] = {
        "runs": lines or [{"error": proc.stderr.strip().splitlines()[-1:]}],
        "upcycle_ffn_1024": {
            "ppl": ours["cuts"][0]["ppl_after"],
            "params": ours["cuts"][0]["params_after"],
            "seconds": ours["cuts"][0]["seconds"],
        },
    }
    print(f"modelopt: {out['modelopt']}", flush=True)
    return out


def _mixtral_expert_names(folder: Path) -> bool:
    """llm-compressor 0.14 saves a Mixtral's experts as `block_sparse_moe.experts.N.{gate,up,down}_proj`, names
    transformers 5's Mixtral loader does not map (it reads the original `w1`/`w3`/`w2`): loaded as saved, the
    experts are left at random initialisation. Rename them in place; True when something was renamed."""
    import re

    from safetensors.torch import load_file, save_file

    renamed = False
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        names = {
            k: re.sub(
                r"(\.experts\.\d+\.)(gate|up|down)_proj\.",
                lambda m: m.group(1) + {"gate": "w1.", "up": "w3.", "down": "w2."}[m.group(2)],
                k,
            )
            for k in tensors
        }
        if any(k != v for k, v in names.items()):
            save_file({names[k]: v for k, v in tensors.items()}, path, metadata={"format": "pt"})
            renamed = True
    return renamed


def _verdict(better: str, worse: str, ppl: dict, seeds: dict) -> str:
    """Reproduced when `better`'s perplexity is lower seed by seed (the same data order for both arms:
    a paired comparison) — or, with one seed on a side, lower by more than the other side's seed spread."""
    a, b = seeds.get(better, [ppl[better]]), seeds.get(worse, [ppl[worse]])
    margin = ppl[worse] - ppl[better]
    if len(a) == len(b) > 1:
        diffs = [y - x for x, y in zip(a, b)]
        word = (
            "reproduced"
            if all(d > 0 for d in diffs)
            else "not reproduced"
            if all(d < 0 for d in diffs)
            else "mixed across seeds"
        )
        return (
            f"{word}: {ppl[better]:.2f} vs {ppl[worse]:.2f} (margin {margin:+.2f}; per seed "
            f"{', '.join(f'{d:+.2f}' for d in diffs)}; seed-to-seed spread of an arm ≤ "
            f"{max(max(a) - min(a), max(b) - min(b)):.2f})"
        )
    spread = max(max(a) - min(a), max(b) - min(b))
    word = "reproduced" if margin > spread else ("not reproduced" if margin < 0 else "within the seed spread")
    return f"{word}: {ppl[better]:.2f} vs {ppl[worse]:.2f} (margin {margin:+.2f}, seed spread ≤ {spread:.2f})"


def tables(results: dict) -> str:
    """The README's tables and claims, from the JSON."""
    lines = []
    rec, crit = results.get("recovery", {}), results.get("criteria", {})
    if rec:
        ppl, seeds = rec["ppl"], rec["seeds"]
        lines += [
            f"Recovery, {results['tokens']:,} tokens each ({results['shape']}; teacher ppl "
            f"{results['ppl']['teacher']:.2f}):",
            "",
            "| arm | held-out ppl (mean) | seeds |",
            "|---|---|---|",
        ]
        for arm in ("pruned_kd_lm", "pruned_kd", "pruned_lm", "pruned_kd_lm_mtp", "progressive", "scratch"):
            lines.append(f"| {arm} | {ppl[arm]:.2f} | {', '.join(f'{v:.2f}' for v in seeds[arm])} |")
        lines += [
            "",
            "Claims:",
            f"- pruned + KD + LM beats the same architecture from scratch: {_verdict('pruned_kd_lm', 'scratch', ppl, seeds)}",
            f"- KD + LM beats KD alone: {_verdict('pruned_kd_lm', 'pruned_kd', ppl, seeds)}",
            f"- KD + LM beats LM alone: {_verdict('pruned_kd_lm', 'pruned_lm', ppl, seeds)}",
            f"- + MTP helps: {_verdict('pruned_kd_lm_mtp', 'pruned_kd_lm', ppl, seeds)}",
            f"- progressive beats one-shot: {_verdict('progressive', 'pruned_kd_lm', ppl, seeds)}",
            "",
        ]
    if crit:
        lines += [
            f"Criteria (teacher ppl {crit['teacher_ppl']:.2f}):",
            "",
            "| cut | criterion | parameters | one-shot ppl | after N tokens |",
            "|---|---|---|---|---|",
        ]
        for name, row in crit["depth"].items():
            lines.append(
                f"| 10 of 30 layers | {name} | {row['params'] / 1e6:.1f}M | {row['one_shot_ppl']:.4g} | "
                f"{row.get('ppl_after_tokens', float('nan')):.4g} |"
            )
        for name, row in crit["width"].items():
            cut, criterion = {
                "hidden_rmsnorm_432": ("hidden 576 → 432", "rmsnorm"),
                "ffn_activation_1024": ("FFN 1536 → 1024", "activation"),
                "heads_output_norm_6": ("query heads 9 → 6", "output_norm"),
            }[name]
            after = row.get("ppl_after_tokens")
            lines.append(
                f"| {cut} | {criterion} | {row['params'] / 1e6:.1f}M | {row['one_shot_ppl']:.4g} | {after:.4g} |"
                if after
                else f"| {cut} | {criterion} | {row['params'] / 1e6:.1f}M | {row['one_shot_ppl']:.4g} | — |"
            )
        lines.append("")
    for key in ("experts", "experts_shared"):
        exp = results.get(key, {})
        if "one_shot" not in exp:
            continue
        lines += [
            f"Experts ({exp['cut']}; source ppl {exp['source_ppl']:.2f}), one-shot ppl:",
            "",
            "| criterion | prune | merge | partial |",
            "|---|---|---|---|",
        ]
        for criterion in ("frequency", "soft", "reap"):
            lines.append(
                f"| {criterion} | "
                + " | ".join(f"{exp['one_shot'][f'{criterion}/{m}']['ppl']:.3f}" for m in ("prune", "merge", "partial"))
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
    for ax, curves in zip(axes, (recovery.get("loss_curves", {}), recovery.get("curves", {}))):
        for arm, points in curves.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", ms=3, label=arm)
        ax.set_yscale("log")
        ax.set_xlabel("recovery tokens")
    teacher = results.get("ppl", {}).get("teacher")
    if teacher:
        axes[1].axhline(teacher, color="k", ls="--", lw=1, label="teacher (source)")
    axes[0].set_ylabel("training loss (its recovery loss, log)")
    axes[1].set_ylabel("validation perplexity (log)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"smollm2-135m → {results.get('shape', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="recovery tokens of every trained arm")
    parser.add_argument("--seeds", type=int, default=2, help="seeds (data orders) of each recovery arm")
    parser.add_argument(
        "--part",
        choices=("all", "oneshot", "criteria", "recovery", "experts", "experts_shared", "peers"),
        default="all",
        help="oneshot: every criterion's one-shot cost only, no training (minutes); "
        "experts_shared: the expert cuts one shot on grow.py's shared-expert MoE (not in all)",
    )
    parser.add_argument("--table", action="store_true", help="print the README tables from the JSON and stop")
    args = parser.parse_args()
    if args.table:
        print(tables(load("slim")))
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    results = load("slim")
    results.update({"model": MODEL, "shape": SHAPE, "tokens": args.tokens, "text": TEXT})
    started = time.perf_counter()
    results.setdefault("seconds", {})
    if args.part == "all":  # a fresh timing of the whole benchmark (the shared-expert bed is not part of it)
        results["seconds"] = {k: v for k, v in results["seconds"].items() if k == "experts_shared"}

    def done(part=None):  # after every part: a long run that stops keeps what it measured
        if part:
            results["seconds"][part] = round(
                time.perf_counter() - started - sum(v for k, v in results["seconds"].items() if k in finished), 1
            )
            finished.append(part)
        save("slim", results)

    finished: list = []

    if args.part == "oneshot":
        results["criteria_one_shot"] = criteria_part(args.tokens, trained=False)
        done("oneshot")
    # experts first: the MoE test bed is the heaviest (and the one the peers' REAP reads)
    if args.part in ("all", "experts"):
        results["experts"] = experts_part(args.tokens)
        done("experts")
    if args.part in ("all", "criteria", "recovery"):
        results["criteria"] = criteria_part(args.tokens)
        done("criteria")
    if args.part in ("all", "recovery"):
        recovery = recovery_part(args.tokens, args.seeds)
        results["recovery"] = recovery
        results["params"] = recovery["params"]
        results["ppl"] = {"teacher": results["criteria"]["teacher_ppl"], **recovery["ppl"]}
        done("recovery")
    if args.part == "experts_shared":  # its cuts cost < 0.1 %: training them tells nothing
        results["experts_shared"] = experts_part(args.tokens, bed="shared", trained_arms=False)
        done("experts_shared")
    if args.part in ("all", "peers"):
        results["peers"] = peers_part(results.get("experts", {}))
        done("peers")
    if args.part == "all":
        results["seconds"]["all"] = round(time.perf_counter() - started, 1)
    done()
    plot(results, RESULTS / "slim.png")
    print(f"wrote {RESULTS / 'slim.json'}")


if __name__ == "__main__":
    main()
