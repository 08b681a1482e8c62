"""NVIDIA Model Optimizer's pruning on a Hugging Face Llama folder — run inside a throwaway environment
holding nvidia-modelopt (benchmarks/peers makes one); upcycle is not importable there.

    python modelopt_prune.py MODEL CALIBRATION.json HELD.json --params 0.803

Tries both pruning modes modelopt has. `mcore_minitron` (the Minitron method) needs a Megatron-Core
model and its plugin imports transformer_engine (CUDA only): the exact error is the result on a CPU.
`fastnas` (its generic search-space pruning) runs on the Hugging Face model: its search space is the
FFN width of each layer; the constraint is a share of the parameters, the score the negative loss on
the same calibration blocks upcycle's own cut reads (all of them, `--score-blocks` to use fewer: the score
runs for every candidate the search tries); the pruned model's perplexity on the held-out blocks (each block scored on its
own, as upcycle scores) is measured here, since its per-layer widths are not a stock config.
Prints one JSON line per mode: {"mode", "ok", "error" | "params", "ppl", "seconds"}.
"""

import argparse
import json
import math
import time
import traceback

import torch
from transformers import AutoModelForCausalLM


def held_ppl(model, held) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=b.unsqueeze(0), labels=b.unsqueeze(0)).loss) for b in held]
    return math.exp(sum(losses) / len(losses))  # equal-length blocks: the mean over every predicted token


def attempt(mode: str, model_dir: str, params: float, calibration, held, score_blocks: int | None = None) -> dict:
    start = time.perf_counter()
    try:
        import modelopt.torch.prune as mtp

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        batch = calibration[:2]
        loader = list(calibration.split(4))  # every calibration block, four at a time
        scored = list(calibration[:score_blocks].split(4))

        def score(m):
            with torch.no_grad():
                return -sum(float(m(input_ids=b, labels=b).loss) for b in scored) / len(scored)

        config = {"score_func": score, "data_loader": loader, "collect_func": lambda b: {"input_ids": b}}
        if mode == "mcore_minitron":
            import modelopt.torch.prune.plugins.mcore_minitron  # noqa: F401  why the mode is missing, if it is

            config = {"forward_loop": lambda m: m(input_ids=batch)}
        pruned, _ = mtp.prune(
            model, mode=mode, constraints={"params": f"{params * 100:.1f}%"}, dummy_input=(batch[:1],), config=config
        )
        seconds = time.perf_counter() - start
        n = sum(p.numel() for p in pruned.parameters())
        widths = sorted({m.out_features for name, m in pruned.named_modules() if name.endswith("gate_proj")})
        return {
            "mode": mode,
            "ok": True,
            "params": n,
            "ffn_widths": widths,
            "ppl": held_ppl(pruned, held),
            "seconds": round(seconds, 1),
        }
    except Exception as e:  # noqa: BLE001 - the exact error is the result
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"mode": mode, "ok": False, "error": last[:500], "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calibration")
    parser.add_argument("held")
    parser.add_argument("--params", type=float, default=0.8)
    parser.add_argument("--score-blocks", type=int, default=None, help="calibration blocks FastNAS scores on")
    args = parser.parse_args()
    calibration = torch.tensor(json.load(open(args.calibration))["input_ids"])
    held = torch.tensor(json.load(open(args.held))["input_ids"])
    for mode in ("mcore_minitron", "fastnas"):
        print(
            json.dumps(
                {
                    **attempt(mode, args.model, args.params, calibration, held, args.score_blocks),
                    "params_target": args.params,
                    "calibration_blocks": len(calibration),
                    "score_blocks": args.score_blocks or len(calibration),
                }
            ),  # fmt: skip
            flush=True,
        )


if __name__ == "__main__":
    main()
