"""The FFN kernel with its weights cold, as inside a model: 30 distinct SmolLM2-sized layers in turn.

The FFN microbenchmark repeats one layer, whose 10 MB stay in cache; in a model every layer's
weights come from memory. Here 30 layers of 576 x 1536 (16 of 64 kept, rank 64, fp32, batch 1) are
run one after the other, dense (three nn.Linear) vs the bank-sparse kernel (called directly: the C
time only), alternating, medians of 15. Two more kernel runs separate the costs: with the predictor
logits passed in (no predictor read) and selections random, and with the kept channels of every
bank made contiguous (the first 16), which the hardware prefetcher streams like a dense read.
Result: benchmarks/results/ffn_cold_stream.json.

    python benchmarks/ffn_cold_stream.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from upcycle import kernels
from upcycle.modules import BankSparseFFN, BankSparsity

RESULTS = Path(__file__).parent / "results"
LAYERS, HIDDEN, WIDTH, BANK, KEEP = 30, 576, 1536, 64, 16


@torch.no_grad()
def main() -> None:
    if not kernels.available():
        raise SystemExit(f"the kernel is unavailable here: {kernels.why_unavailable()}")
    torch.manual_seed(0)
    ffns = []
    for _ in range(LAYERS):
        ffn = BankSparseFFN(HIDDEN, WIDTH, BankSparsity(BANK, KEEP, 64)).eval()
        for p in ffn.parameters():
            torch.nn.init.normal_(p, std=HIDDEN ** -0.5)
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

    runs = {"dense": dense, "sparse_with_predictor": lambda: sparse([None] * LAYERS),
            "sparse_random_selection": lambda: sparse(random_logits),
            "sparse_contiguous_selection": lambda: sparse([contiguous] * LAYERS)}
    times = {name: [] for name in runs}
    for _ in range(15):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    result = {"layers": LAYERS, "shape": [HIDDEN, WIDTH], "bank": BANK, "keep": KEEP, "threads": torch.get_num_threads(),
              "ms_per_pass": ms, "speedup": {n: ms["dense"] / v for n, v in ms.items() if n != "dense"},
              "command": "python benchmarks/ffn_cold_stream.py"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ffn_cold_stream.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, v in ms.items():
        print(f"{name:28s} {v:6.2f} ms per {LAYERS} layers  ({ms['dense'] / v:.2f}×)")


if __name__ == "__main__":
    main()
