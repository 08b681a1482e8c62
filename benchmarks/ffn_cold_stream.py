"""The FFN kernel with its weights cold, as inside a model: 30 distinct SmolLM2-sized layers in turn.

The FFN microbenchmark repeats one layer, whose 10 MB stay in cache; in a model every layer's
weights come from memory. Here 30 layers of 576 x 1536 (16 of 64 kept, fp32, batch 1; the default
4-bit shadow predictor, or `--predictor lowrank`, rank 64) are run one after the other, dense (three
nn.Linear) vs the bank-sparse kernel (called directly: the C time only), alternating, medians of 15.
Two more kernel runs separate the costs: with the predictor logits passed in (no predictor read) and
selections random, and with the kept channels of every bank made contiguous (the first 16), which the
hardware prefetcher streams like a dense read. Each row's bytes and read rate are reported against
the machine's own ceiling, a plain sum over a buffer of the sparse run's size and over one of 400 MB
(past any cache: this VM reports a 480 MB last-level cache, of which a process gets far less).
Result: benchmarks/results/ffn_cold_stream.json (ffn_cold_stream_lowrank.json for the low-rank one).

    python benchmarks/ffn_cold_stream.py [--predictor lowrank]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from harness import save
from sparse_decode import PREDICTORS, predictor_label

from upcycle import kernels
from upcycle.eval.speed import read_rate
from upcycle.modules import BankSparseFFN, BankSparsity

LAYERS, HIDDEN, WIDTH, BANK, KEEP = 30, 576, 1536, 64, 16


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", choices=sorted(PREDICTORS), default="shadow")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"the kernel is unavailable here: {kernels.why_unavailable()}")
    torch.manual_seed(0)
    ffns = []
    for _ in range(LAYERS):
        ffn = BankSparseFFN(HIDDEN, WIDTH, BankSparsity(BANK, KEEP, **PREDICTORS[args.predictor])).eval()
        for p in ffn.parameters():
            torch.nn.init.normal_(p, std=HIDDEN**-0.5)
        ffns.append(ffn)
    plans = [kernels.plan_for(f) for f in ffns]
    kernel = kernels.load().upcycle_bank_sparse_ffn_f32
    x, out = torch.randn(1, HIDDEN), torch.empty(1, HIDDEN)
    random_logits = [torch.randn(1, WIDTH) for _ in range(LAYERS)]
    contiguous = torch.zeros(1, WIDTH)
    contiguous.view(-1, BANK)[:, :KEEP] = 1.0

    def dense():
        for f in ffns:
            f.down_proj(F.silu(f.gate_proj(x)) * f.up_proj(x))

    def sparse(logits):
        for plan, z in zip(plans, logits):
            kernel(plan.ref, x.data_ptr(), 1, None if z is None else z.data_ptr(), BANK, KEEP, 0, out.data_ptr())

    runs = {
        "dense": dense,
        "sparse_with_predictor": lambda: sparse([None] * LAYERS),
        "sparse_random_selection": lambda: sparse(random_logits),
        "sparse_contiguous_selection": lambda: sparse([contiguous] * LAYERS),
    }
    dense_bytes = LAYERS * 3 * HIDDEN * WIDTH * 4
    kept_bytes = dense_bytes * KEEP // BANK
    nbytes = {
        "dense": dense_bytes,
        "sparse_with_predictor": kept_bytes + LAYERS * ffns[0].predictor_bytes(),
        "sparse_random_selection": kept_bytes,
        "sparse_contiguous_selection": kept_bytes,
    }
    times = {name: [] for name in runs}
    for _ in range(15):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    rate = {name: nbytes[name] / ms[name] / 1e6 for name in ms}
    ceiling = {"same_size": read_rate(nbytes["sparse_with_predictor"]), "400MB": read_rate(400 << 20)}
    result = {
        "layers": LAYERS,
        "shape": [HIDDEN, WIDTH],
        "bank": BANK,
        "keep": KEEP,
        "threads": torch.get_num_threads(),
        "predictor": predictor_label(ffns[0].sparsity),
        "ms_per_pass": ms,
        "speedup": {n: ms["dense"] / v for n, v in ms.items() if n != "dense"},
        "mb_per_pass": {n: b / 1e6 for n, b in nbytes.items()},
        "gb_per_s": rate,
        "plain_read_gb_per_s": ceiling,
        "command": f"python benchmarks/ffn_cold_stream.py --predictor {args.predictor}",
    }
    name = "ffn_cold_stream" if args.predictor == "shadow" else f"ffn_cold_stream_{args.predictor}"
    save(name, result)
    for n, v in ms.items():
        print(
            f"{n:28s} {v:6.2f} ms per {LAYERS} layers  ({ms['dense'] / v:.2f}×)  {nbytes[n] / 1e6:6.1f} MB at {rate[n]:5.1f} GB/s"
        )
    print(
        f"plain read: {ceiling['same_size']:.1f} GB/s over {nbytes['sparse_with_predictor'] / 1e6:.0f} MB, "
        f"{ceiling['400MB']:.1f} GB/s over 400 MB"
    )


if __name__ == "__main__":
    main()
