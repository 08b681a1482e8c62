"""Where a compiled decoding step's time goes: the sparse FFN operator against everything else.

    python benchmarks/decode_profile.py        # about 4 minutes on 2 CPU cores

smollm2-135m dense and sparsified 16-of-64 (the default shadow predictor; speed only, so no
conversion), both compiled as in sparse_decode.py (inductor, C++ wrapper, static KV cache). Greedy
decoding tokens/s (3 runs each, alternating), then one profiled run of each (torch.profiler): the
bank-sparse operator's time per call and per token, and the rest of the sparse token. The dense
model with its FFNs removed gives the dense token's time outside the FFNs.
Result: benchmarks/results/decode_profile.json.
"""

from __future__ import annotations

import argparse
import json

import torch
from harness import save

from upcycle import hub
from upcycle.commands.bench import sparse_and_dense
from upcycle.eval import speed
from upcycle.modules import BankSparsity

NEW_TOKENS = 64
OPERATOR = "upcycle::bank_sparse_ffn_shadow"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    model, tok = hub.load("smollm2-135m")
    dense, sparse = sparse_and_dense(model, tok, BankSparsity(64, 16, predictor="shadow"), warmup_steps=0)
    no_ffn = speed.without_ffns(dense).eval()
    ids = tok("The king said to the queen:", return_tensors="pt").input_ids
    compiled = speed.compile_kwargs()
    models = {"dense": dense, "sparse": sparse, "no_ffn": no_ffn}
    for m in models.values():  # kernel plans built eagerly, then the graphs compiled
        speed._greedy_tokens_per_second(m, ids, 8)
        speed._greedy_tokens_per_second(m, ids, NEW_TOKENS, **compiled)
    rates = {name: [] for name in models}
    for _ in range(3):
        for name, m in models.items():
            rates[name].append(speed._greedy_tokens_per_second(m, ids, NEW_TOKENS, **compiled)[0])
    ms = {name: 1e3 / sorted(r)[1] for name, r in rates.items()}  # median ms per token
    with torch.profiler.profile() as prof:
        speed._greedy_tokens_per_second(sparse, ids, NEW_TOKENS, **compiled)
    op = next(e for e in prof.key_averages() if e.key == OPERATOR)
    layers = len(speed._ffn_modules(sparse))
    op_ms_per_token = op.cpu_time_total / 1e3 / op.count * layers
    result = {
        "model": "smollm2-135m",
        "new_tokens": NEW_TOKENS,
        "threads": torch.get_num_threads(),
        "ms_per_token": {k: round(v, 2) for k, v in ms.items()},
        "speedup": round(ms["dense"] / ms["sparse"], 3),
        "operator_us_per_call": round(op.cpu_time_total / op.count, 1),
        "sparse_ffn_ms_per_token": round(op_ms_per_token, 2),
        "sparse_other_ms_per_token": round(ms["sparse"] - op_ms_per_token, 2),
        "dense_ffn_ms_per_token": round(ms["dense"] - ms["no_ffn"], 2),
        "dense_other_ms_per_token": round(ms["no_ffn"], 2),
    }
    result["ffn_speedup_in_model"] = round(result["dense_ffn_ms_per_token"] / op_ms_per_token, 2)
    result["speedup_if_the_sparse_ffn_were_free"] = round(ms["dense"] / result["sparse_other_ms_per_token"], 2)
    save("decode_profile", result, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
