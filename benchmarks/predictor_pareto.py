"""Which predictor: bytes per token against recall, converted perplexity and FFN speed-up, per kind and setting.

    python benchmarks/predictor_pareto.py                          # every setting (about an hour on 2 cores)
    python benchmarks/predictor_pareto.py --only shadow4 lowrank64 # a subset; results merge into the JSON

For each predictor of a 16-of-64 bank-sparse smollm2-135m: sparsify (calibration on shakespeare +
pystdlib train splits, 1/8 held out for recall; the low-rank predictor warmed up on the dense oracle),
then optionally the layer-wise conversion (each layer's sparse FFN fitted to the dense FFN's output,
bottom up). No end-to-end training in any row. Measured: predictor bytes read per token per layer,
recall of the oracle's top-16 (held-out calibration tokens), perplexity on 16 held-out blocks x 256
tokens of each corpus, and the FFN layer's batch-1 speed-up over dense at SmolLM2's shape (the same
weights, alternating, medians) with its byte limit.
Results: benchmarks/results/predictor_pareto.json and predictor_pareto.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import upcycle
from upcycle import data
from upcycle.arch import adapter_for
from upcycle.eval import perplexity
from upcycle.eval.speed import ffn_limit, median_pair

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "predictor_pareto.json"
SEQ = 256
BASE = dict(bank=64, keep=16, calibration="shakespeare+pystdlib", calibration_tokens=16384, seq_len=SEQ)
CONVERT = dict(convert_steps=60, convert_rows=1024, convert_lr=1e-3)
SETTINGS = {  # name -> sparsify options
    "lowrank64": dict(predictor="lowrank", rank=64),
    "lowrank64+convert": dict(predictor="lowrank", rank=64, **CONVERT),
    "shadow4": dict(predictor="shadow", bits=4, group=64, warmup_steps=0),
    "shadow4+convert": dict(predictor="shadow", bits=4, group=64, warmup_steps=0, **CONVERT),
    "shadow3": dict(predictor="shadow", bits=3, group=64, warmup_steps=0),
    "shadow3+convert": dict(predictor="shadow", bits=3, group=64, warmup_steps=0, **CONVERT),
    "shadow2": dict(predictor="shadow", bits=2, group=64, warmup_steps=0),
    "shadow2+convert": dict(predictor="shadow", bits=2, group=64, warmup_steps=0, **CONVERT),
}


def score(model, val: dict[str, torch.Tensor]) -> dict:
    out, nll, tokens = {}, 0.0, 0
    for name, blocks in val.items():
        r = perplexity(model, blocks, batch_size=8, progress=False)
        out[name] = round(r.ppl, 3)
        nll, tokens = nll + r.nll * r.tokens, tokens + r.tokens
    out["both"] = round(float(torch.tensor(nll / tokens).exp()), 3)
    return out


@torch.no_grad()
def ffn_speedup(sparse, layer: int = 15, repeats: int = 7) -> dict:
    """One real layer of the model: dense SwiGLU (its weights, three matrix products) vs the sparse module."""
    ffn = adapter_for(sparse).ffn(layer)
    x = torch.randn(1, 1, ffn.gate_proj.weight.shape[1])

    def dense():
        return ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))

    def sparse_call():
        return ffn(x)

    dense(), sparse_call()
    dense_s, sparse_s = median_pair(dense, sparse_call, repeats, calls=200)
    width, hidden = ffn.gate_proj.weight.shape
    return {"dense_ms": dense_s * 1e3, "sparse_ms": sparse_s * 1e3, "speedup": dense_s / sparse_s,
            "limit": ffn_limit(hidden, width, ffn.sparsity)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tok = upcycle.load("smollm2-135m")
    val = {name: data.blocks(name, tok, "validation", SEQ, max_blocks=16) for name in data.BUILTIN_CORPORA}
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if "dense" not in results:
        results["dense"] = {"ppl": score(dense, val)}
    for name in args.only:
        started = time.perf_counter()
        sparse, report = upcycle.sparsify(dense, tok, **BASE, **SETTINGS[name], progress=True)
        ffn = adapter_for(sparse).ffn(report.layers[0])
        row = {"options": {**BASE, **SETTINGS[name]}, "predictor_bytes_per_layer": ffn.predictor_bytes(),
               "recall": report.recall_mean, "ppl": score(sparse, val), "ffn": ffn_speedup(sparse),
               "convert_error": {"before": report.convert_error_before, "after": report.convert_error_after},
               "wall_s": round(time.perf_counter() - started, 1)}
        row["ppl_vs_dense"] = {k: round(v / results["dense"]["ppl"][k], 3) for k, v in row["ppl"].items()}
        results[name] = row
        print(name, {k: row[k] for k in ("predictor_bytes_per_layer", "recall", "ppl", "ppl_vs_dense")},
              f"FFN {row['ffn']['speedup']:.2f}x (limit {row['ffn']['limit']:.2f}x)", f"{row['wall_s']} s", flush=True)
        OUT.write_text(json.dumps(results, indent=1) + "\n")
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in results.items() if k != "dense"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in rows.items():
        kb = r["predictor_bytes_per_layer"] / 1e3
        axes[0].scatter(kb, r["ppl_vs_dense"]["both"], label=name)
        axes[0].annotate(name, (kb, r["ppl_vs_dense"]["both"]), fontsize=7)
        axes[1].scatter(r["ffn"]["speedup"], r["ppl_vs_dense"]["both"])
        axes[1].annotate(name, (r["ffn"]["speedup"], r["ppl_vs_dense"]["both"]), fontsize=7)
    axes[0].set(xlabel="predictor KB read per token per layer", ylabel="perplexity / dense (both corpora)",
                yscale="log", title="quality against predictor bytes (no end-to-end training)")
    axes[1].set(xlabel="FFN layer speed-up, batch 1 (SmolLM2 shape)", ylabel="perplexity / dense", yscale="log",
                title="quality against speed")
    for ax in axes:
        ax.axhline(1.6, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "predictor_pareto.png", dpi=110)


if __name__ == "__main__":
    main()
