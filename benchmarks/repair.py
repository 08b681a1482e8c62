"""Find and repair a layer-local long-context failure of a sparsified smollm2-135m.

The sparse model: smollm2-135m sparsified with upcycle.sparsify (bank 64, --keep of every bank,
predictor rank 64, warm-up fitted; or --sparse PATH, e.g. a trained checkpoint). Measured for the dense
reference and the sparse model: CWE (RULER-style common-words extraction: the most common word of a
numbered list, holding 15 % of the entries, every other word once; the model's chat template; 8
prompts per length) at 512, 1024, 2048 and 4096 tokens; the
long-context probe (KL to the dense model and loss per position bucket on 2048 tokens of held-out
Shakespeare); short-context perplexity. Then per-layer localisation (restore one layer's dense FFN /
keep only it sparse), a repair of the top-ranked layer and, as the control, of a randomly drawn other
layer (its predictor and FFN, 300 steps of layer-local KD from the reference's dense FFN on the rows
the layer sees in 16 sequences of 1024 tokens, + router loss, all else frozen), and the same
measurements after each.

Result: benchmarks/results/repair.json and repair_localisation.png.

    python benchmarks/repair.py [--keep 32] [--sparse PATH] [--samples 8] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from harness import RESULTS, save

from upcycle import hub, sparsify
from upcycle.commands.repair import write_folder
from upcycle.pipelines.repair import RepairConfig, report_markdown
from upcycle.pipelines.repair import run as repair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, default=32)
    parser.add_argument("--sparse", default=None, help="a bank-sparse model folder to use instead of sparsifying")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--probe-tokens", type=int, default=2048)
    parser.add_argument("--out", default="runs/bench-repair")
    args = parser.parse_args()

    reference, tokenizer = hub.load("smollm2-135m")
    if args.sparse:
        model, _ = hub.load(args.sparse)
        made = f"loaded from {args.sparse}"
    else:
        model, report = sparsify(
            reference,
            tokenizer,
            bank=64,
            keep=args.keep,
            rank=64,
            warmup_steps=args.warmup_steps,
            convert_steps=0,
            progress=True,
        )
        made = f"sparsify bank 64 keep {args.keep} rank 64, warm-up {args.warmup_steps} steps (recall {report.recall_mean})"
    options = RepairConfig(
        lengths=tuple(int(v) for v in args.lengths.split(",")),
        samples=args.samples,
        steps=args.steps,
        probe_tokens=args.probe_tokens,
    )
    repaired, result = repair(model, tokenizer, options, reference=reference)
    write_folder(args.out, repaired, tokenizer, result)
    result["sparse_model"] = made
    result["command"] = "python benchmarks/repair.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"
    )
    save("repair", result)
    shutil.copy(Path(args.out) / "localisation.png", RESULTS / "repair_localisation.png")
    print(report_markdown(result))
    print("gap closed:", json.dumps(result["gap_closed"]))


if __name__ == "__main__":
    main()
