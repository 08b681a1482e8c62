"""llm-compressor's REAPPruningModifier on a Hugging Face MoE folder — run inside a throwaway environment
holding llmcompressor (benchmarks/slim.py --part peers makes one); upcycle is not importable there.

    python llmcompressor_reap.py MODEL CALIBRATION.json OUT --sparsity 0.5

CALIBRATION.json: {"input_ids": [[...], ...]} — the same calibration blocks upcycle's own cut reads.
Writes OUT (a HF folder), OUT/retained.json (llm-compressor's report of the kept experts per layer) and
prints one JSON line {"seconds": ..., "peak_rss_mb": ...}.
"""

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calibration")
    parser.add_argument("out")
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = json.load(open(args.calibration))["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[REAPPruningModifier(sparsity=args.sparsity, report_path=f"{args.out}/retained.json")],
        num_calibration_samples=len(ids),
        max_seq_length=len(ids[0]),
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
