"""How good is a 16-of-64 bank-sparse smollm2-135m, against every baseline, on the same tokens.

    python benchmarks/sparsify_quality.py                 # the full run (about an hour on 2 CPU cores)
    python benchmarks/sparsify_quality.py --budget 32768  # shorter

Trains on shakespeare + pystdlib (train splits, interleaved) and scores held-out documents of both.
Every trained model gets the same recipe (LM + KD from the original dense model, AdamW, cosine LR,
embeddings frozen) and the same token budget:
  dense            the original, untrained
  dense_companion  the dense model continued on the same tokens
  sparse           sparsify with the default predictor (PREDICTOR below: the 4-bit shadow of each
                   FFN's own gate/up weights, GPTQ-rounded), the layer-wise conversion (each layer's sparse FFN fitted
                   to the dense FFN's output, bottom up), then end-to-end training at k = 16
                   ("sparse_converted": after the conversion, before any end-to-end training)
  sparse_shadow2   the same pipeline with 2-bit copies (SHADOW2): the fastest shadow, at what quality
  sparse_lowrank   the paper's rank-64 low-rank predictor (SVD init + warm-up on the dense oracle),
                   a predictor-only stage and an end-to-end stage, the `router` loss keeping each
                   predictor on its own FFN's top-16 as the FFN trains
  oracle           the true top-16 of every bank (an upper bound for a predictor; untrained)
  teal75           TEAL-style per-layer magnitude thresholds at 75% sparsity (training-free)
  dense4x          FFN width cut to 1/4 by activation importance, then trained like the others
Then ablations: rank and initialisation / warm-up (read after the warm-up), gate mode and KD
(trained at a shorter budget).
Runs are kept in runs/bench-sparsify/ and reused when the script is run again.
Results: benchmarks/results/sparsify_quality.json, and plots next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from harness import RESULTS, figure, held_out, save, score

import upcycle
from upcycle import data, sparsify
from upcycle.eval.selection import selection_stats
from upcycle.ops import narrow_ffn
from upcycle.report import markdown_table, plot_per_layer
from upcycle.train import TrainConfig, Trainer

RUNS = Path("runs/bench-sparsify")
MODEL = "smollm2-135m"
DATA = "shakespeare+pystdlib"
SEQ = 256
BATCH = 8  # sequences per optimizer step: 2048 tokens
# the default predictor of sparsify, and the layer-wise conversion before training
PREDICTOR = {"predictor": "shadow", "bits": 4, "group": 64, "quantizer": "gptq"}
CONVERT = {"convert_steps": 60, "convert_rows": 1024, "convert_lr": 1e-3, "convert_ffn_lr_scale": 1.0}
LOWRANK = {"predictor": "lowrank", "rank": 64}
# the fastest shadow: 2-bit copies (byte limit 3.31x instead of 2.91x), GPTQ-rounded
SHADOW2 = {"predictor": "shadow", "bits": 2, "group": 64, "quantizer": "gptq"}
# key in the JSON, run folder, sparsify options, the suffix of the key of its perplexity before training
SPARSE_ARMS = (
    ("sparse", "sparse", PREDICTOR | CONVERT, "converted"),
    ("sparse_shadow2", "sparse-2bit-gptq", SHADOW2 | CONVERT, "converted"),
    ("sparse_lowrank", "sparse_lowrank", LOWRANK, "untrained"),
)
# the default predictor's figures kept at the top level too: key -> its name in the run
TOP_LEVEL = {"predictor": "predictor", "recall_per_layer": "recall_warmup", "recall_mean": "recall_warmup_mean"}
TOP_LEVEL |= {"recall_trained_per_layer": "recall_trained", "recall_trained_mean": "recall_trained_mean"}


def predictor_name(options: dict) -> str:
    if options.get("predictor") == "shadow":
        name = f"shadow {options['bits']}-bit, group {options['group']}, {options.get('quantizer', 'rtn')}"
    else:
        name = f"lowrank rank {options.get('rank', 64)}"
    return name + (f", layer-wise conversion {options['convert_steps']} steps" if options.get("convert_steps") else "")


def recipe(name: str, stages: list[dict], kd: bool = True, sparse: bool = False, lr: float = 2e-4) -> TrainConfig:
    """sparse: the model has trained predictors (low-rank), which get the router loss and their own group."""
    losses = [{"name": "lm", "weight": 1.0}] + ([{"name": "kd", "weight": 1.0}] if kd else [])
    if sparse:  # keeps each predictor ranking like its own FFN's top-k while the FFN trains
        losses.append({"name": "router", "weight": 1.0})
    return TrainConfig(
        model=MODEL,
        data=DATA,
        out=str(RUNS / name),
        seq_len=SEQ,
        global_batch=BATCH,
        micro_batch=4,
        lr=lr,
        warmup_steps=2,
        schedule="cosine",
        min_lr_ratio=0.1,
        clip=1.0,
        losses=losses,
        teacher="self" if kd else None,
        groups=[{"name": "embeddings", "parts": ["embeddings", "lm_head"], "frozen": True}]
        + ([{"name": "predictor", "lr_mult": 5.0}] if sparse else []),
        stages=stages,
        val_every=8,
        val_blocks=8,
        ckpt_every=8,  # a run killed mid-way (a session's end) resumes from its last checkpoint
        progress=True,
    )


def train(name: str, model, tok, teacher, stages: list[dict], kd=True, sparse=False, sparsified=None):
    """Train (or reuse a finished run made from the same sparsify options: `sparsified`) and return
    (model, validation curve [(tokens, val_loss)])."""
    config = recipe(name, stages, kd, sparse)
    out = Path(config.out)
    marker = out / "sparsified_with.json"
    if (out / "final" / "config.json").exists():
        if sparsified != (json.loads(marker.read_text()) if marker.exists() else None):
            raise SystemExit(f"{out} holds a run from other settings; delete it to re-run this row")
    else:
        resume = marker.exists() and json.loads(marker.read_text()) == sparsified
        resume = resume and (out / "checkpoints" / "latest").exists()
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(sparsified, sort_keys=True))
        Trainer(config, model=model, tokenizer=tok, teacher=teacher if kd else None).fit(resume=resume)
    trained, _ = upcycle.load(out / "final")
    records = map(json.loads, (out / "metrics.jsonl").open())
    return trained.eval(), [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]


def sparse_stages(budget: int, anneal: bool = False, predictor_stage: bool = True) -> list[dict]:
    if not predictor_stage:  # a shadow predictor has nothing of its own to train
        return [{"name": "end-to-end", "tokens": budget}]
    first = max(BATCH * SEQ, budget // 8)
    e2e = {"name": "end-to-end", "tokens": budget - first}
    if anneal:
        e2e["callbacks"] = [{"name": "anneal_keep", "options": {"fraction": 0.3}}]
    return [{"name": "predictor", "tokens": first, "train": ["predictor"]}, e2e]


def sparse_run(name, dense, tok, val, budget, *, kd=True, **options) -> dict:
    t0 = time.perf_counter()
    options = {
        "bank": 64,
        "keep": 16,
        "rank": 64,
        "calibration": DATA,
        "calibration_tokens": 16384,
        "convert_steps": 0,
        "progress": True,
        **options,
    }
    model, report = sparsify(dense, tok, **options)
    trained_predictor = options.get("predictor", "lowrank") == "lowrank"
    result = {
        "options": {k: v for k, v in options.items() if k != "progress"},
        "kd": kd,
        "tokens": budget,
        "predictor": predictor_name(options),
        "recall_warmup": report.recall,
        "recall_warmup_mean": report.recall_mean,
        "recall_init_mean": sum(report.recall_init) / len(report.recall_init) if report.recall_init else None,
        "convert_error": {"before": report.convert_error_before, "after": report.convert_error_after},
        "ppl_untrained": score(model, val),
    }
    if budget:  # 0: the warm-up only
        stages = sparse_stages(budget, predictor_stage=trained_predictor)
        trained, curve = train(name, model, tok, dense, stages, kd, trained_predictor, result["options"])
        recall = selection_stats(trained, val["shakespeare"][:4])["recall"]
        result |= {
            "ppl": score(trained, val),
            "recall_trained": recall,
            "recall_trained_mean": sum(recall) / len(recall),
        }
        result["curve"] = curve
    return {**result, "wall_s": round(time.perf_counter() - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=98304, help="training tokens of every trained model")
    parser.add_argument("--ablation-budget", type=int, default=16384)
    parser.add_argument("--val-blocks", type=int, default=16, help="held-out blocks of 256 tokens per corpus")
    parser.add_argument(
        "--skip-ablations", action="store_true", help="skip the low-rank predictor's ablations (rank, init, gate, KD)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    RESULTS.mkdir(exist_ok=True)
    partial = RESULTS / "sparsify_quality.partial.json"
    res = json.loads(partial.read_text()) if partial.exists() else {}

    def save():
        partial.write_text(json.dumps(res, indent=1))

    dense, tok = upcycle.load(MODEL)
    val = held_out(tok, blocks=args.val_blocks)
    calib = data.blocks(DATA, tok, "train", SEQ, max_blocks=64)
    res |= {"model": MODEL, "data": DATA, "tokens": args.budget, "threads": torch.get_num_threads()}
    res["held_out_tokens"] = {k: v.numel() for k, v in val.items()}
    ppl = res.setdefault("ppl", {})
    if "dense" not in ppl:
        ppl["dense"] = score(dense, val)
        save()
    if "oracle" not in ppl:
        ppl["oracle"] = score(sparsify(dense, tok, selection="oracle", warmup_steps=0, convert_steps=0).model, val)
        save()
    for key, run_name, options, untrained in SPARSE_ARMS:
        if key in ppl:
            continue
        run = sparse_run(run_name, dense, tok, val, args.budget, **options)
        ppl[key], ppl[f"{key}_{untrained}"], res[f"{key}_run"] = run["ppl"], run["ppl_untrained"], run
        res.setdefault("curves", {})[key] = run["curve"]
        save()
    if "sparse_run" in res:  # the default predictor's figures, also at the top level
        res |= {key: res["sparse_run"][field] for key, field in TOP_LEVEL.items()}
    if "teal75" not in ppl:
        teal, report = sparsify(
            dense, tok, selection="threshold", calibration=DATA, calibration_tokens=16384, convert_steps=0
        )
        ppl["teal75"], res["teal75_density"] = score(teal, val), report.density
        save()
    for key, start in (
        ("dense_companion", lambda: copy.deepcopy(dense)),
        ("dense4x", lambda: narrow_ffn(dense, calib, fraction=0.25)[0]),
    ):
        if key not in ppl:
            model = start()
            if key == "dense4x":
                res["dense4x_untrained"] = score(model, val)
            model, curve = train(key, model, tok, dense, [{"name": "end-to-end", "tokens": args.budget}])
            ppl[key], res.setdefault("curves", {})[key] = score(model, val), curve
            save()
    if not args.skip_ablations:
        ablations = res.setdefault("ablations", {})
        # (label, sparsify options, trained?, kd): rank and initialisation are read after the warm-up;
        # gate mode and KD only show in training, so those variants also train (shorter budget)
        variants = [
            ("r64 hard svd+warm-up (reference)", {}, True, True),
            ("gate sigmoid", {"gate": "sigmoid"}, True, True),
            ("gate softmax", {"gate": "softmax"}, True, True),
            ("no KD (LM only)", {}, True, False),
            ("r32", {"rank": 32}, False, True),
            ("r128", {"rank": 128}, False, True),
            ("init random + warm-up", {"init": "random"}, False, True),
            ("svd init, no warm-up", {"warmup_steps": 0}, False, True),
        ]
        for label, opts, trained, kd in variants:
            if label in ablations:
                continue
            slug = "abl-" + "".join(c if c.isalnum() else "_" for c in label)
            budget = args.ablation_budget if trained else 0
            ablations[label] = sparse_run(slug, dense, tok, val, budget, kd=kd, **opts)
            save()
    res["ratios"] = {k: round(ppl[k]["both"] / ppl["dense_companion"]["both"], 3) for k in ppl}
    write_outputs(res)
    partial.unlink(missing_ok=True)


def write_outputs(res: dict) -> None:
    save("sparsify_quality", res, indent=1)
    lowrank = res.get("sparse_lowrank_run", {})
    plot_per_layer(
        {
            f"{res.get('predictor', 'default')}: calibration (dense oracle)": res["recall_per_layer"],
            "... after training (own oracle)": res["recall_trained_per_layer"],
            "lowrank r64 after warm-up": lowrank.get("recall_warmup", []),
            "lowrank r64 after training": lowrank.get("recall_trained", []),
        },
        RESULTS / "sparsify_recall.png",
        ylabel="recall of oracle top-16 of 64",
        title="smollm2-135m 16-of-64: predictor recall per layer",
    )
    fig, ax = figure(size=(7, 3.5))
    for name, curve in res.get("curves", {}).items():
        ax.plot([t for t, _ in curve], [v for _, v in curve], marker="o", ms=3, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("smollm2-135m on shakespeare+pystdlib: same recipe, same tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "sparsify_val_loss.png", dpi=120)
    rows = [[k, v["shakespeare"], v["pystdlib"], v["both"], res["ratios"].get(k, "")] for k, v in res["ppl"].items()]
    print(markdown_table(["model", "shakespeare", "pystdlib", "both", "× companion"], rows))


if __name__ == "__main__":
    main()
