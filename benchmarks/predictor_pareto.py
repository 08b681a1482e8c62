"""Which predictor: bytes per token against recall, converted perplexity and FFN speed-up, per kind and setting.

    python benchmarks/predictor_pareto.py                          # every setting (about an hour on 2 cores)
    python benchmarks/predictor_pareto.py --only shadow4 lowrank64 # a subset; results merge into the JSON
    python benchmarks/predictor_pareto.py --speed                  # only the FFN speed table (random weights)

For each predictor of a 16-of-64 bank-sparse smollm2-135m: sparsify (calibration on shakespeare +
pystdlib train splits, 1/8 held out for recall; the low-rank predictor warmed up on the dense oracle),
then optionally the layer-wise conversion (each layer's sparse FFN fitted to the dense FFN's output,
bottom up). No end-to-end training in any row. Measured: predictor bytes read per token per layer,
recall of the oracle's top-16 (held-out calibration tokens), perplexity on 16 held-out blocks x 256
tokens of each corpus. Speed (`--speed`, on an otherwise idle machine): the FFN layer dense vs sparse
with each predictor at SmolLM2's shape and Qwen2.5-7B's, batch 1 / 4 / 16 (upcycle.eval.speed's
microbenchmark: alternating, medians), with the byte limit at batch 1.
Results: benchmarks/results/predictor_pareto.json and predictor_pareto.png.
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import RESULTS, figure, held_out, load, save, score

import upcycle
from upcycle.arch import adapter_for
from upcycle.eval.speed import QWEN7B_FFN, ffn_microbench
from upcycle.modules import BankSparsity

SEQ = 256
BASE = dict(bank=64, keep=16, calibration="shakespeare+pystdlib", calibration_tokens=16384, seq_len=SEQ)
NO_CONVERT = dict(convert_steps=0)  # the settings without CONVERT
CONVERT = dict(convert_steps=60, convert_rows=1024, convert_lr=1e-3, convert_ffn_lr_scale=1.0)
SETTINGS = {"lowrank64": dict(predictor="lowrank", rank=64)}  # name -> sparsify options
for bits, quantizer in ((4, "rtn"), (3, "rtn"), (2, "rtn"), (4, "gptq"), (2, "gptq")):
    name = f"shadow{bits}" + ("-gptq" if quantizer == "gptq" else "")
    SETTINGS[name] = dict(predictor="shadow", bits=bits, group=64, quantizer=quantizer)
SETTINGS |= {f"{name}+convert": options | CONVERT for name, options in SETTINGS.items()}


# 3-bit codes are stored in 4-bit fields: the kernel does the same work as for 4 bits; how the codes were
# rounded (rtn or gptq) changes nothing the kernel does
SAME_KERNEL = {"shadow3": "shadow4", "shadow4-gptq": "shadow4", "shadow2-gptq": "shadow2"}


def speed(results: dict) -> None:
    """FFN layer dense vs sparse for each predictor kind, both shapes, batch 1 / 4 / 16, in one run
    (11 samples of ~0.2 s per row: this machine's timings are noisy)."""
    kinds = {name.split("+")[0] for name in SETTINGS} - set(SAME_KERNEL)
    table = {}
    for kind in sorted(kinds):
        options = SETTINGS[kind]
        kernel_options = {k: v for k, v in options.items() if k in ("rank", "predictor", "bits", "group")}
        sparsity = BankSparsity(BASE["bank"], BASE["keep"], **kernel_options)
        table[kind] = ffn_microbench(
            {"smollm2": (576, 1536), "qwen7b": QWEN7B_FFN}, (1, 4, 16), sparsity, repeats=11, target_seconds=0.2
        )
        for key, row in table[kind].items():
            print(kind, key, f"{row['speedup']:.2f}x", f"(limit {row['limit']:.2f}x)" if row["limit"] else "")
    for kind, same in SAME_KERNEL.items():
        table[kind] = table[same]
    results["speed"] = {"threads": torch.get_num_threads(), "ffn": table, "same_kernel": SAME_KERNEL}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--speed", action="store_true", help="only the FFN speed table")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.speed:
        results = load("predictor_pareto")
        speed(results)
        save("predictor_pareto", results, indent=1)
        plot(results)
        return
    dense, tok = upcycle.load("smollm2-135m")
    val = held_out(tok, blocks=16, seq=SEQ)
    results = load("predictor_pareto")
    if "dense" not in results:
        results["dense"] = {"ppl": score(dense, val)}
    for name in args.only:
        started = time.perf_counter()
        sparse, report = upcycle.sparsify(dense, tok, **BASE, **{**NO_CONVERT, **SETTINGS[name]}, progress=True)
        ffn = adapter_for(sparse).ffn(report.layers[0])
        row = {
            "options": {**BASE, **SETTINGS[name]},
            "predictor_bytes_per_layer": ffn.predictor_bytes(),
            "recall": report.recall_mean,
            "ppl": score(sparse, val),
            "convert_error": {"before": report.convert_error_before, "after": report.convert_error_after},
            "wall_s": round(time.perf_counter() - started, 1),
        }
        row["ppl_vs_dense"] = {k: round(v / results["dense"]["ppl"][k], 3) for k, v in row["ppl"].items()}
        results[name] = row
        print(name, {k: row[k] for k in ("predictor_bytes_per_layer", "recall", "ppl", "ppl_vs_dense", "wall_s")})
        save("predictor_pareto", results, indent=1)
    plot(results)


def plot(results: dict) -> None:
    rows = {k: v for k, v in results.items() if k in SETTINGS}
    ffn = results.get("speed", {}).get("ffn", {})
    fig, axes = figure(2, size=(11, 4))
    for name, r in rows.items():
        kb = r["predictor_bytes_per_layer"] / 1e3
        kind, ratio = name.split("+")[0], r["ppl_vs_dense"]["both"]
        points = [(axes[0], kb)] + ([(axes[1], ffn[kind]["smollm2_b1"]["speedup"])] if kind in ffn else [])
        for ax, x in points:
            ax.scatter(x, ratio)
            ax.annotate(name, (x, ratio), fontsize=7)
    axes[0].set(
        xlabel="predictor KB read per token per layer",
        ylabel="perplexity / dense (both corpora)",
        yscale="log",
        title="quality against predictor bytes (no end-to-end training)",
    )
    axes[1].set(
        xlabel="FFN layer speed-up, batch 1 (SmolLM2 shape)",
        ylabel="perplexity / dense",
        yscale="log",
        title="quality against speed",
    )
    for ax in axes:
        ax.axhline(1.6, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "predictor_pareto.png", dpi=110)


if __name__ == "__main__":
    main()
