"""NVIDIA Model Optimizer's pruning on a Hugging Face Llama folder — run inside a throwaway environment
holding nvidia-modelopt (benchmarks/slim.py --part peers makes one); upcycle is not importable there.

    python modelopt_prune.py MODEL OUT --params 0.5

Tries the two pruning modes modelopt has: `mcore_minitron` (the Minitron method; needs a Megatron-Core
model) and `fastnas` (its generic search-space pruning, params constraint, scored by the negative loss
on a calibration batch). Prints one JSON line per mode: {"mode", "ok", "error" | "params", "seconds"}.
"""

import argparse
import json
import time
import traceback

import torch
from transformers import AutoModelForCausalLM


def attempt(mode: str, model_dir: str, params: float) -> dict:
    import modelopt.torch.prune as mtp

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))

    def score(m):
        with torch.no_grad():
            return -float(m(input_ids=ids, labels=ids).loss)

    try:
        config = {"score_func": score, "data_loader": [ids], "collect_func": lambda batch: {"input_ids": batch}}
        if mode == "mcore_minitron":
            config = {"forward_loop": lambda m: m(input_ids=ids)}
        pruned, _ = mtp.prune(model, mode=mode, constraints={"params": f"{int(params * 100)}%"},
                              dummy_input=(ids,), config=config)
        n = sum(p.numel() for p in pruned.parameters())
        return {"mode": mode, "ok": True, "params": n, "seconds": round(time.perf_counter() - start, 1)}
    except Exception as e:  # noqa: BLE001 - the exact error is the result
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"mode": mode, "ok": False, "error": last[:500], "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--params", type=float, default=0.5)
    args = parser.parse_args()
    for mode in ("mcore_minitron", "fastnas"):
        print(json.dumps(attempt(mode, args.model, args.params)), flush=True)


if __name__ == "__main__":
    main()
