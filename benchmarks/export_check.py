"""Does llama.cpp compute what upcycle exported? Every family upcycle writes as GGUF, and SmolLM2-135M at
each type, loaded by llama.cpp (llama-cpp-python, in the benchmarks' throwaway environment) and compared
with transformers on the same token ids.

    python benchmarks/export_check.py        # a few minutes (+4½ to build llama.cpp once)
    python docs/tables.py                    # the table in docs/export.md

Rows: per family (a tiny random model of it with SmolLM2's tokenizer, f32) and per type of SmolLM2-135M
(f32, f16, q8_0): the file's size and export time, the largest |Δlogit| and the top-1 agreement of llama.cpp
against transformers on 128 held-out tokens, and whether llama.cpp's greedy 64 tokens after a prompt equal
transformers' (`generate`, greedy).
Results: benchmarks/results/export_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import command, save
from peers import LLAMACPP, driver, llamacpp_python

from upcycle import data, hub
from upcycle.config import RunOptions
from upcycle.pipelines.export import ExportConfig, export

RUNS = Path("runs/bench-export")
FAMILIES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")
TYPES = ("f32", "f16", "q8_0")
PROMPT = "The king said to the queen:"
QUIET = RunOptions(progress=False, overwrite=True)


def compare(python: Path, gguf_path: Path, model, ids: list[int], prompt: list[int], new_tokens: int) -> dict:
    """llama.cpp (in its environment) against the transformers model on the same ids."""
    with tempfile.TemporaryDirectory() as tmp:
        request, out = Path(tmp) / "in.json", Path(tmp) / "out.npz"
        request.write_text(json.dumps({"ids": ids, "prompt": prompt, "new_tokens": new_tokens}))
        run = command(python, driver("llamacpp_logits"), gguf_path, request, out)
        if isinstance(run, dict):
            return {"error": run["error"]}
        theirs = np.load(out)
        logits, greedy = torch.from_numpy(theirs["logits"]), theirs["greedy"].tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float()
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    return {
        "max_abs_dlogit": float((ours - logits).abs().max()),
        "top1": float((ours.argmax(-1) == logits.argmax(-1)).float().mean()),
        "greedy_equal": generated == greedy,
        "greedy_agree_prefix": next((i for i, (a, b) in enumerate(zip(generated, greedy)) if a != b), len(greedy)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    try:
        python = llamacpp_python()
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"{LLAMACPP[0]} could not be built here: {(e.stderr or '').strip().splitlines()[-1:]}")
    smollm, tokenizer = hub.load("smollm2-135m")
    ids = data.blocks("shakespeare", tokenizer, "validation", 128, max_blocks=1)[0].tolist()
    prompt = tokenizer(PROMPT).input_ids
    result = {
        "held_out_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "prompt": PROMPT,
        "families": {},
        "smollm2": {},
    }
    for family in FAMILIES:
        model = hub.tiny(family, vocab=len(tokenizer), hidden=64, layers=2)
        hub.save(model, tokenizer, RUNS / family, overwrite=True)
        path, report = export(RUNS / family, RUNS / f"{family}.gguf", ExportConfig(type="f32"), QUIET)
        row = {"arch": report.arch, "bytes": report.bytes, "read_back": report.file_matches}
        row |= compare(python, path, model, ids, prompt, args.new_tokens)
        result["families"][family] = row
        print(family, row, flush=True)
    for kind in TYPES:
        started = time.perf_counter()
        path, report = export("smollm2-135m", RUNS / f"smollm2-135m-{kind}.gguf", ExportConfig(type=kind), QUIET)
        row = {"bytes": report.bytes, "seconds": time.perf_counter() - started, "read_back": report.file_matches,
               "max_decoded_error": max(report.max_abs_error.values())}  # fmt: skip
        row |= compare(python, path, smollm, ids, prompt, args.new_tokens)
        result["smollm2"][kind] = row
        print(kind, row, flush=True)
        path.unlink()
    save("export_check", result)


def table(result: dict) -> str:
    lines = [
        f"llama.cpp against transformers on {result['held_out_tokens']} held-out tokens; greedy "
        f"{result['new_tokens']} tokens after “{result['prompt']}”:",
        "",
        "| model | type | file MB | max abs Δlogit | top-1 agreement | greedy tokens equal |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(f"tiny {f} ({r['arch']})", "f32", r) for f, r in result["families"].items()]
    rows += [("SmolLM2-135M", kind, r) for kind, r in result["smollm2"].items()]
    for name, kind, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {kind} | {r['bytes'] / 1e6:.1f} | error: {r['error']} | | |")
            continue
        greedy = "yes" if r["greedy_equal"] else f"no (first {r['greedy_agree_prefix']} equal)"
        lines.append(
            f"| {name} | {kind} | {r['bytes'] / 1e6:.1f} | {r['max_abs_dlogit']:.2g} | {r['top1']:.3f} | {greedy} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
