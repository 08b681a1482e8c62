"""Is the bank-sparse model really faster? FFN layer and end-to-end greedy decoding on this CPU.

  1. One FFN layer, fp32, dense SwiGLU (three nn.Linear, as Hugging Face runs it) vs the bank-sparse
     module in eval mode (predictor + top-k + kept channels through upcycle.kernels), 16 of 64 kept,
     with the predictor of `--predictor` (default: the 4-bit shadow, sparsify_quality's default; or the
     rank-64 low-rank one); at SmolLM2-135M's shape (576 x 1536) and Qwen2.5-7B's (3584 x 18944); batch
     1, 4 and 16. The limit at batch 1 is bytes(dense) / bytes(kept channels + predictor).
  2. Greedy decoding of smollm2-135m, dense (the stock Hugging Face model) vs sparsified 16-of-64
     (warm-up fitted predictors), same prompt, length and threads; run at 2 threads (this machine's
     all) and at 1, eagerly (as Hugging Face runs), and at 2 threads with both models under
     torch.compile (inductor, C++ wrapper, static KV cache; the kernel is one operator in the graph).
     Two bounds: bytes of weights read per token, dense vs sparse (the attention, the norms and the
     tied 49k x 576 LM head are read in full by both), and measured, the dense model with its FFNs
     skipped (what everything but the FFNs takes: no FFN speed-up can beat it). And both models
     through upcycle's lean decoder (upcycle.infer.decode: one compiled step, static cache, the dense
     layers' single rows through the kernel's row dots, no generate() around it; what `upcycle
     generate` runs). The headline `decode_speedup` is the lean run (both models alike, the fastest
     dense baseline here); `decode_speedup_generate` the compiled generate() run.

Every ratio comes from timings taken in one process, alternating dense and sparse, medians.
Result: benchmarks/results/sparse_decode.json and sparse_decode.png (sparse_decode_lowrank.* for
--predictor lowrank).

    python benchmarks/sparse_decode.py [--predictor shadow|lowrank] [--repeats 7] [--ffn-repeats 11] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import RESULTS, bars, figure, save

from upcycle import hub, kernels
from upcycle.commands.bench import BenchReport, sparse_and_dense
from upcycle.eval import speed
from upcycle.modules import BankSparsity

PREDICTORS = {
    "shadow": {"predictor": "shadow", "bits": 4, "group": 64},
    "lowrank": {"predictor": "lowrank", "rank": 64},
}


def predictor_label(sparsity: BankSparsity) -> str:
    """The predictor as the result files name it."""
    if sparsity.predictor == "shadow":
        return f"shadow {sparsity.bits}-bit, group {sparsity.group}"
    return f"lowrank rank {sparsity.rank}"


def plot(result: dict, path: Path) -> None:
    fig, (left, right) = figure(2, size=(10, 4))
    for shape, colour in (("smollm2", "C0"), ("qwen7b", "C1")):
        rows = [r for k, r in result["ffn"].items() if k.startswith(shape)]
        label = f"{shape} {rows[0]['shape'][0]}×{rows[0]['shape'][1]}"
        left.plot([r["batch"] for r in rows], [r["speedup"] for r in rows], "o-", color=colour, label=label)
        left.axhline(rows[0]["limit"], color=colour, ls=":", lw=1)
    left.axhline(1.0, color="grey", lw=1)
    left.set(xscale="log", xlabel="batch (tokens)", ylabel="speedup over dense")
    left.set(xticks=[1, 4, 16], xticklabels=["1", "4", "16"], title="FFN layer, fp32 (dotted: byte limit at batch 1)")
    left.legend()
    runs = result["decode_runs"]
    names = [
        f"{d['threads']} thread{'s' if d['threads'] > 1 else ''}"
        + (", lean decoder" if d.get("decoder") == "lean" else ", compiled" if d.get("compiled") else "")
        for d in runs
    ]
    series = {"measured": "speedup", "byte limit": "limit", "no FFN at all": "ceiling"}
    bars(right, {label: [d[key] for d in runs] for label, key in series.items()}, names)
    right.axhline(1.0, color="grey", lw=1)
    right.set(ylabel="tokens/s, sparse ÷ dense", title="greedy decoding, smollm2-135m 16-of-64")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="decoding runs per model and setting")
    parser.add_argument(
        "--ffn-repeats",
        type=int,
        default=11,
        help="FFN-layer samples per row (each ~0.2 s of calls; this machine's timings are noisy)",
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--predictor", choices=sorted(PREDICTORS), default="shadow")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"the kernel is unavailable here: {kernels.why_unavailable()}")
    sparsity = BankSparsity(bank=64, keep=16, **PREDICTORS[args.predictor])
    name = "sparse_decode" if args.predictor == "shadow" else f"sparse_decode_{args.predictor}"
    threads = torch.get_num_threads()

    shapes = {"smollm2": (576, 1536), "qwen7b": speed.QWEN7B_FFN}
    ffn = speed.ffn_microbench(shapes, (1, 4, 16), sparsity, repeats=args.ffn_repeats, target_seconds=0.2)
    # the byte limit assumes dense and sparse stream alike; where torch's dense FFN streams slower than
    # the machine can read, the speedup passes the limit. At the plain read rate the dense FFN would take
    # bytes / rate: the speedup against that dense FFN is the conservative figure.
    read_rate, processor = speed.read_rate(), speed.processor_name()
    for row in ffn.values():
        if row["limit"] is not None:
            row["speedup_vs_dense_at_plain_read_rate"] = row["limit"] * row["sparse_gb_per_s"] / read_rate

    model, tokenizer = hub.load("smollm2-135m")
    dense, sparse = sparse_and_dense(model, tokenizer, sparsity, warmup_steps=100)
    runs = []
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        runs.append(speed.decode_bench(dense, sparse, tokenizer, new_tokens=args.new_tokens, repeats=args.repeats))
    torch.set_num_threads(threads)
    for mode in ({"compiled": True}, {"lean": True}):
        runs.append(
            speed.decode_bench(dense, sparse, tokenizer, new_tokens=args.new_tokens, repeats=args.repeats, **mode)
        )

    result = {
        "ffn_speedup": {k: round(r["speedup"], 3) for k, r in ffn.items()},
        "ffn_speedup_vs_dense_at_plain_read_rate": {
            k: round(r["speedup_vs_dense_at_plain_read_rate"], 3) for k, r in ffn.items() if r["limit"] is not None
        },
        "decode_speedup": round(runs[-1]["speedup"], 3),  # lean decoder, all threads
        "decode_speedup_generate": round(runs[-2]["speedup"], 3),  # generate(), compiled, all threads
        "decode_limit": round(runs[-1]["limit"], 3),
        "decode_ceiling": round(runs[-1]["ceiling"], 3),
        "decode_speedup_eager": round(runs[0]["speedup"], 3),
        "ffn": ffn,
        "decode_runs": runs,
        "predictor": predictor_label(sparsity),
        "sparsity": sparsity.to_dict(),
        "machine": {
            "processor": processor,
            "threads": threads,
            "plain_read_gb_per_s": read_rate,
            "torch": torch.__version__,
            "operator": kernels.operator_kind(),
        },
        "command": f"python benchmarks/sparse_decode.py --predictor {args.predictor} --repeats {args.repeats}",
    }
    save(name, result)
    plot(result, RESULTS / f"{name}.png")
    report = BenchReport(model="smollm2-135m", kernel="compiled", ffn=ffn, decode=runs[-1])
    print(report.table())
    print(
        f"plain read {read_rate:.1f} GB/s on {processor}; at batch 1 "
        + ", ".join(
            f"{k}: dense {r['dense_gb_per_s']:.1f} GB/s, sparse {r['sparse_gb_per_s']:.1f} GB/s, "
            f"{r['speedup_vs_dense_at_plain_read_rate']:.2f}× against a dense FFN at the plain read rate"
            for k, r in ffn.items()
            if r["limit"] is not None
        )
    )
    for run in runs[:-1]:
        print(
            f"at {run['threads']} thread(s){', compiled generate()' if run['compiled'] else ''}: {run['speedup']:.2f}× "
            f"({run['dense_tokens_per_s']:.1f} → {run['sparse_tokens_per_s']:.1f} tok/s; limit {run['limit']:.2f}×, "
            f"no FFN {run['ceiling']:.2f}×)"
        )


if __name__ == "__main__":
    main()
