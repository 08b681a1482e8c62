"""llm-compressor's one-shot Wanda or SparseGPT on a Hugging Face folder — run inside a throwaway
environment holding llmcompressor (benchmarks/prune_seft.py makes one); upcycle is not importable there.

    python llmcompressor_prune.py MODEL CALIBRATION.json OUT --method wanda|sparsegpt (--sparsity 0.5 | --nm 2:4)

CALIBRATION.json: {"input_ids": [[...], ...]} — the same blocks upcycle's own run reads. Writes OUT (a HF
folder) and prints one JSON line {"seconds": the oneshot call, "peak_rss_mb": the process}.
"""

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calibration")
    parser.add_argument("out")
    parser.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nm", default=None, help="N:M as upcycle means it: at most N nonzeros in every M")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = json.load(open(args.calibration))["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
    options = {"sparsity": args.sparsity, "targets": ["Linear"], "ignore": ["lm_head"]}
    if args.nm:  # llm-compressor's mask_structure "N:M" prunes N of every M; 2:4 and 4:8 mean the same count
        n, m = (int(x) for x in args.nm.split(":"))
        options.update({"sparsity": (m - n) / m, "mask_structure": f"{m - n}:{m}"})
    modifier = (WandaPruningModifier if args.method == "wanda" else SparseGPTModifier)(**options)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier],
        num_calibration_samples=len(ids),
        max_seq_length=len(ids[0]),
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
