"""The speed-quality front on this CPU: upcycle's dense and bank-sparse models at fp32, bf16, int8, int4 and
int4a through the lean decoder (upcycle.infer.decode: static KV cache, one compiled step), side by side with
llama.cpp at F32, F16, Q8_0, Q4_K_M, Q4_0 and Q4_1 — its files made by llama.cpp's own quantizer from upcycle's
f32 export of the same model (`upcycle export`) — same prompt tokens, threads and new tokens, the runs
alternating in one process, medians; every row's perplexity on the same held-out blocks (llama.cpp's from
its own logits).

    python benchmarks/reproduce.py --paper sparsify  # trains the sparse model the race uses (~55 min; else done here)
    python benchmarks/cpu_decode.py                  # SmolLM2-135M: about 35 minutes on 2 cores (+4½ to build llama.cpp once)
    python benchmarks/cpu_decode.py --part large     # a grown SmolLM2 of 3.2B at int8 and int4 (~2 h, 38 GB of disk)
    python benchmarks/cpu_decode.py --no-llamacpp    # upcycle only
    python benchmarks/cpu_decode.py --untrained      # the sparse model as converted, without training

int4a is int4 with a minimum per group (Q4_1's grid, 5 bits a weight), facing llama.cpp's Q4_1. SmolLM2's
packaged weights lie on that grid (every linear layer's weights are c d + m with 4-bit c and fp16 d, m
per 32: found while measuring this), so on this model int4a and Q4_1 lose nothing to rounding and
Q4_0's grid does: the int4 quality figures here are not typical of other checkpoints.
upcycle's int4 rows are GPTQ-rounded on 16 blocks of the train split (`to_precision(..., calibration=)`:
Q4_0's grid, bytes and kernel, other codes); llama.cpp's files are made without an importance matrix
(llama-cpp-python has no imatrix tool), so the JSON also holds the dense model's perplexity at int4 by
Q4_0's own rule (`ppl_dense_int4_q4_0_rule`), the like-for-like figure.

Rows: tokens/s; bytes of weights read per token (upcycle: each part in its stored precision, the sparse
FFNs' kept quarter, the predictor; llama.cpp: the GGUF file's bytes, all of which a token reads, its
tied embedding serving as the LM head); the byte limit = this machine's measured read bandwidth ÷
those bytes; held-out perplexity on shakespeare and pystdlib. The model without its FFNs at each
precision shows where a token's time goes. The front: a llama.cpp row is matched where some upcycle row
is at least as fast with perplexity at most 1 % above the llama.cpp row's on both corpora;
`dominated_by_llamacpp` names the llama.cpp rows that no upcycle row matches.

The sparse model is smollm2-135m sparsified 16-of-64 with the default 4-bit shadow predictor and trained
98,304 tokens by the sparsify_quality recipe (the model benchmarks/reproduce.py's sparsify part trains and
keeps, or --sparse FOLDER): its speed is the converted model's, its perplexity the trained one's.

`--part large` measures the front where the FFNs carry the bytes, as in the models users run: smollm2-135m
grown by upcycle's exact operators (hidden x8 by HyperCloning, FFN width 6,656 by neuron duplication: 3.2B
parameters, SmolLM2's perplexity and activation pattern), sparsified 16-of-64 with a 2-bit shadow
predictor (GPTQ-rounded on calibration text; a 4-bit one would read more bytes than the kept rows at
int4, and the low-rank one, untrained, left the grown model at perplexity ~3,000), untrained; dense and sparse at
int8 and int4 against llama.cpp Q8_0 and Q4_0 of the same checkpoint, a precision at a time (memory),
into the `large` key of cpu_decode.json.
llama.cpp comes from `llama-cpp-python` built from source in a throwaway environment
(benchmarks/peers); where it cannot be built the rows say why.
Results: benchmarks/results/cpu_decode.json and cpu_decode.png.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import RESULTS, command, figure, held_out, save, upcycle
from peers import LLAMACPP, driver, llamacpp_python
from reproduce import sparsify_run, trained_sparse

from upcycle import hub
from upcycle import load as upcycle_load
from upcycle.commands.bench import sparse_and_dense
from upcycle.eval import perplexity, speed
from upcycle.infer.calibrate import calibration_blocks
from upcycle.infer.decode import GreedyDecoder
from upcycle.infer.precision import PRECISIONS, to_precision
from upcycle.modules import BankSparseFFN, BankSparsity

RUNS = Path("runs/bench-cpu-decode")
MODEL = "smollm2-135m"
PROMPT = "The king said to the queen:"
# the llama.cpp format each precision faces (int4a: Q4_1, the same grid); Q4_K_M, llama.cpp's usual 4-bit
# file, faces int4 as well
LLAMA_FORMATS = {"fp32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_0", "int4a": "q4_1"}
LLAMA_ROWS = ("f32", "f16", "q8_0", "q4_k_m", "q4_0", "q4_1")
CORPORA = ("shakespeare", "pystdlib")
MARGIN = 1.01  # a llama.cpp row is matched by an upcycle row at least as fast with ppl at most 1 % above its own
# the grown checkpoint of --part large: hidden x8 (576 -> 4608), FFN width 6,656: 3.2B parameters
# its int4 rounded to nearest on both sides (llama.cpp's Q4_0 without an importance matrix does the same):
# GPTQ over every linear of 3.2B parameters would take ~30 min a model here
LARGE = {"factor": 8, "width": 6656, "precisions": ("int8", "int4"), "sparsity": "16 of 64, 2-bit shadow predictor",
         "held_blocks": 4, "new_tokens": 64, "repeats": 3}  # fmt: skip
CALIBRATION_BLOCKS = 16  # int4's GPTQ calibration, 256 tokens each


def exported_gguf(model: str | Path, name: str, kind: str = "f32") -> Path:
    """upcycle's own export of `model` (f32; the large checkpoint's in f16, the half of its 13 GB): the
    file llama.cpp's quantizer makes every format from."""
    out = RUNS / "llamacpp" / f"upcycle-{name}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        run = upcycle("export", model, out, "--type", kind, "--check-tokens", "32")
        if isinstance(run, dict):
            raise SystemExit(f"upcycle export {model} failed: {run['error']}")
    return out


_plain_buffers: dict[str, str] = {}  # format -> how it failed with llama.cpp's extra buffer types


def llamacpp_run(
    python: Path, source: Path, prompt: list[int], new_tokens: int, threads: int, quantize_only: bool = False,
    ppl_blocks=None, formats=LLAMA_ROWS,
) -> dict:  # fmt: skip
    """Every format made (quantize_only; scored on `ppl_blocks` where given) or decoded: one process per format (llama-cpp-python 0.3.36
    crashed decoding a second model in the same process). A format whose process fails is run again
    without llama.cpp's extra buffer types (Q8_0 segfaults with them here: see the driver), the first
    failure kept in its row; failing again, its row holds the error."""
    result = {"formats": {}}
    for fmt in formats:
        first_error = _plain_buffers.get(fmt)
        for extra in ([] if quantize_only or first_error else [[]]) + [["--no-extra-buffers"]]:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                ids, flags = ",".join(map(str, prompt)), (["--quantize-only"] if quantize_only else []) + extra
                flags += ["--ppl-blocks", ppl_blocks] if ppl_blocks else []
                run = command(
                    python, driver("llamacpp_decode"), source, RUNS / "llamacpp", f.name, "--formats", fmt,
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


def models(dense, sparse, calibration: torch.Tensor, precisions=PRECISIONS) -> dict:
    """Every upcycle row: dense, sparse and FFN-free at each precision (copies: conversion is in place); at
    int4 the weights GPTQ-rounded on `calibration` (the FFN-free row, a speed row only, by Q4_0's rule: the
    same bytes) and also the sparse model with its shadow re-derived at 2 bits (`sparse2bit_int4`)."""
    no_ffn = speed.without_ffns(dense)
    out = {}
    for precision in precisions:
        blocks = calibration if precision == "int4" else None
        for kind, model in (("dense", dense), ("sparse", sparse), ("no_ffn", no_ffn)):
            out[f"{kind}_{precision}"] = to_precision(
                copy.deepcopy(model), precision, blocks if kind != "no_ffn" else None
            )
        if precision in ("int4", "int4a"):
            out[f"sparse2bit_{precision}"] = to_precision(shadow_at(copy.deepcopy(sparse), 2), precision, blocks)
    return {name: model.eval() for name, model in out.items()}


def shadow_at(model, bits: int):
    """The model's shadow predictors re-derived at `bits` from the FFN weights (GPTQ with the input moments
    they saved). Why at int4: a 4-bit shadow reads 2 x 576 x 1536 / 2 bytes a SmolLM2 layer, more than the
    kept int4 rows it selects (373 KB); at 2 bits it reads half. The selection changes, so its perplexity is
    measured like every row's."""
    for module in model.modules():
        if isinstance(module, BankSparseFFN) and module.sparsity.predictor == "shadow":
            module.predictor.bits, module.predictor.source = bits, None
    return model


def llamacpp_files(source: Path, prompt: list[int], held: dict, args, formats=LLAMA_ROWS) -> tuple[Path | None, dict]:
    """llama.cpp's environment and every format made from `source`, each scored on the held-out blocks:
    (its python, {"ppl": {row: {corpus: ppl}}, "llamacpp": version and file bytes, or the error})."""
    try:
        llama = llamacpp_python()
    except subprocess.CalledProcessError as e:
        tail = ((e.stderr or "") + (e.stdout or "")).strip().splitlines()[-3:]
        error = f"{LLAMACPP[0]}: {' | '.join(tail) or e}"
        print(f"llama.cpp skipped: {error}", flush=True)
        return None, {"ppl": {}, "llamacpp": {"error": error}}
    blocks = RUNS / f"held_out_blocks_{source.stem}.json"  # the same blocks every upcycle row is scored on
    blocks.parent.mkdir(parents=True, exist_ok=True)
    blocks.write_text(json.dumps({c: b.tolist() for c, b in held.items()}))
    made = llamacpp_run(llama, source, prompt, args.new_tokens, args.threads, quantize_only=True, ppl_blocks=blocks,
                        formats=formats)  # fmt: skip
    rows = made["formats"]
    return llama, {
        "ppl": {f"llamacpp_{fmt}": row["ppl"] for fmt, row in rows.items() if "ppl" in row},
        "llamacpp": {"version": made.get("llama_cpp_python"),
                     "file_bytes": {fmt: row["file_bytes"] for fmt, row in rows.items() if "file_bytes" in row}},
    }  # fmt: skip


def race(rows: dict, llama, source: Path, prompt: torch.Tensor, args, formats=LLAMA_ROWS) -> dict:
    """Every upcycle row through the lean decoder and every llama.cpp format, alternating in each round:
    {"tok_s_runs", "tokens", and what llama.cpp reported failing}. upcycle's prompts run through sdpa
    (see GreedyDecoder: eager attention's bf16 bmm is slow on a CPU without native bf16)."""
    max_len = prompt.shape[1] + args.new_tokens + 8
    decoders = {name: GreedyDecoder(m, max_len, prompt_attention="sdpa") for name, m in rows.items()}
    for name, decoder in decoders.items():  # kernel plans built eagerly, then each step compiled
        started = time.perf_counter()
        with torch.no_grad():
            rows[name](prompt[:, :1])
        decoder.generate(prompt, 4)
        decoder.generate(prompt, args.new_tokens)
        print(f"compiled {name} in {time.perf_counter() - started:.0f} s", flush=True)
    rates, tokens, out = {name: [] for name in decoders}, {}, {}
    for _ in range(args.repeats):  # alternate every row, llama.cpp's included, in each round
        if llama is not None:
            run = llamacpp_run(llama, source, prompt[0].tolist(), args.new_tokens, args.threads, formats=formats)
            for fmt, row in run["formats"].items():
                if "error" in row:
                    out.setdefault("llamacpp_errors", {})[fmt] = row["error"]
                    continue
                if "extra_buffers_error" in row:
                    out.setdefault("llamacpp_without_extra_buffers", {})[fmt] = row["extra_buffers_error"]
                rates.setdefault(f"llamacpp_{fmt}", []).append(row["tok_s"])
                tokens[f"llamacpp_{fmt}"] = row["tokens"]
        for name, decoder in decoders.items():
            rate, generated = decoder.tokens_per_second(prompt, args.new_tokens)
            rates[name].append(rate)
            tokens[name] = generated.tolist()
        print({k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
    return {"tok_s_runs": rates, "tokens": tokens, **out}


def measure(rows: dict, tokenizer, source: Path, args, precisions=PRECISIONS, formats=LLAMA_ROWS) -> dict:
    """The whole front for one model: llama.cpp's files and perplexities, upcycle's rows (`models`) and
    theirs, the race, the byte limits and which llama.cpp rows upcycle's front matches."""
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    held = held_out(tokenizer, CORPORA, args.held_blocks)
    result = {"prompt": PROMPT, "new_tokens": args.new_tokens, "threads": args.threads, "repeats": args.repeats}
    llama, made = (
        (None, {"ppl": {}}) if args.no_llamacpp else llamacpp_files(source, prompt[0].tolist(), held, args, formats)
    )
    result |= made
    for name, row in made["ppl"].items():
        print(f"{name}: ppl {row}", flush=True)
    for name, model in rows.items():
        if not name.startswith("no_ffn"):
            with torch.no_grad():
                result["ppl"][name] = {c: perplexity(model, b, progress=False).ppl for c, b in held.items()}
            print(f"{name}: ppl {result['ppl'][name]}", flush=True)
    result["bytes_per_token"] = {name: speed.weight_bytes(m)["total"] for name, m in rows.items()}
    # llama.cpp maps its file: with less memory free than that beside upcycle's models it reads the disk at
    # every token (seen at 3.2B int4: Q4_0 0.8 tok/s against Q8_0's 4.1, ~1 GB/s read from disk), a race of the disk
    largest = max(result.get("llamacpp", {}).get("file_bytes", {}).values(), default=0)
    meminfo = Path("/proc/meminfo")  # Linux; elsewhere the race runs unchecked
    lines = meminfo.read_text().splitlines() if largest and meminfo.exists() else []
    available = next((int(x.split()[1]) * 1024 for x in lines if x.startswith("MemAvailable:")), largest)
    if largest > available:
        raise SystemExit(f"cpu_decode: {available / 1e9:.1f} GB available beside upcycle's models, llama.cpp's "
                         f"{largest / 1e9:.1f} GB file would be read from disk every token: not raced")  # fmt: skip
    raced = race(rows, llama, source, prompt, args, formats)
    rates, tokens = raced.pop("tok_s_runs"), raced.pop("tokens")
    result |= raced | {"tok_s_runs": rates}
    result["tok_s"] = {
        (k if k.startswith("llamacpp") else f"upcycle_{k}"): statistics.median(v) for k, v in rates.items()
    }
    for fmt, nbytes in result.get("llamacpp", {}).get("file_bytes", {}).items():
        result["bytes_per_token"][f"llamacpp_{fmt}"] = nbytes
    result["bandwidth_gb_s"] = speed.read_rate(2**30, repeats=7)  # a sum over 1 GiB
    result["limit_tok_s"] = {k: result["bandwidth_gb_s"] * 1e9 / v for k, v in result["bytes_per_token"].items()}
    reference = tokens.get(f"dense_{precisions[0]}")
    result[f"same_tokens_as_dense_{precisions[0]}"] = {
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
        for p in precisions
    }
    result |= front(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("smollm2", "large"), default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--held-blocks", type=int, default=16, help="held-out blocks of 256 tokens per corpus")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument(
        "--sparse", type=Path, help="the trained sparse model (default: reproduce.py's sparsify part's)"
    )
    parser.add_argument("--untrained", action="store_true", help="the sparse model as converted, untrained")
    parser.add_argument("--work", type=Path, default=Path("/tmp/upcycle-front"), help="--part large: its checkpoints")
    parser.add_argument("--factor", type=int, default=LARGE["factor"], help="--part large: hidden size x this")
    parser.add_argument("--width", type=int, default=LARGE["width"], help="--part large: FFN width grown to")
    parser.add_argument("--precision", choices=LARGE["precisions"], help="--part large: only this precision")
    args = parser.parse_args()
    args.threads = torch.get_num_threads()
    if args.part == "large":
        return large(args)
    trained = args.sparse or trained_sparse()
    if not args.untrained and not (trained / "config.json").exists():
        print(f"no trained sparse model at {trained}: training it (reproduce.py's sparse arm, ~55 min)", flush=True)
        sparsify_run("sparse", 0, weights=True)
    dense, tokenizer = hub.load(MODEL)
    if args.untrained:
        dense, sparse = sparse_and_dense(dense, tokenizer, BankSparsity(64, 16, predictor="shadow"), warmup_steps=0)
    else:
        sparse = upcycle_load(trained)[0]
    result = {
        "model": MODEL,
        "sparsity": f"16 of 64, 4-bit shadow predictor, {'untrained' if args.untrained else 'trained'}",
    }
    result["sparse_model"] = "converted here" if args.untrained else str(trained)
    calibration = calibration_blocks(tokenizer, CALIBRATION_BLOCKS * 256)
    held = held_out(tokenizer, CORPORA, args.held_blocks)
    with torch.no_grad():  # Q4_0's own rule on the dense model: llama.cpp's Q4_0 values, the head int8
        rtn = to_precision(copy.deepcopy(dense), "int4").eval()
        result["ppl_dense_int4_q4_0_rule"] = {c: perplexity(rtn, b, progress=False).ppl for c, b in held.items()}
    del rtn
    rows = models(dense.eval(), sparse.eval(), calibration)
    del dense, sparse
    result |= measure(rows, tokenizer, exported_gguf(MODEL, MODEL), args)
    result["int4_calibration"] = f"GPTQ on {CALIBRATION_BLOCKS} blocks of 256 tokens of the train split"
    result["criteria"] = criteria(result)
    previous = RESULTS / "cpu_decode.json"
    kept = json.loads(previous.read_text()).get("large") if previous.exists() else None
    if kept:
        result["large"] = kept  # measured by its own part
    save("cpu_decode", result)
    plot(result, RESULTS / "cpu_decode.png")
    print(table(result))


def large(args) -> None:
    """--part large: the grown 3.2B checkpoint (built here once, streamed), its sparse twin and f16 export,
    then a precision at a time: dense and sparse against llama.cpp's format of that precision."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    name = f"smollm2-x{args.factor}-ffn{args.width}"
    grown, wide, sparse_folder = work / name, work / f"smollm2-x{args.factor}", work / f"{name}-sparse"
    # grown in fp32 (13 GB on disk): in bf16 HyperCloning's check fails (max |dlogit| 0.84 at x2, measured);
    # sparsified in fp32 too: bf16 matmuls on a CPU without native bf16 made the pass ~10x slower
    steps = [
        (wide, ("grow", MODEL, wide, "--op", "hidden", "--factor", args.factor, "--calibration-tokens", "256")),
        (grown, ("grow", wide, grown, "--op", "ffn_width", "--width", args.width, "--calibration-tokens", "256")),
        (sparse_folder, ("sparsify", grown, sparse_folder, "--bank", "64", "--keep", "16", "--predictor", "shadow",
                         "--bits", "2", "--warmup-steps", "0", "--convert-steps", "0", "--calibration-tokens", "2048")),
    ]  # fmt: skip
    for folder, cli in steps:
        if not (folder / "config.json").exists() and not (folder == wide and (grown / "config.json").exists()):
            print("upcycle " + " ".join(map(str, cli)), flush=True)
            run = upcycle(*cli)
            if isinstance(run, dict):
                raise SystemExit(f"upcycle {cli[0]} failed: {run['error']}")
    shutil.rmtree(wide, ignore_errors=True)
    source = exported_gguf(grown, grown.name, "f16")
    out = {"checkpoint": str(grown), "sparsity": LARGE["sparsity"] + ", untrained", "rows": {},
           "int4_calibration": "none: rounded to nearest (Q4_0's rule) on both sides"}  # fmt: skip
    path = RESULTS / "cpu_decode.json"
    kept = (json.loads(path.read_text()) if path.exists() else {}).get("large", {})
    if kept.get("checkpoint") == out["checkpoint"] and kept.get("int4_calibration") == out["int4_calibration"]:
        out = kept  # resumable: a precision measured by an earlier run is kept (each takes ~40 min here)
    for setting in ("held_blocks", "new_tokens", "repeats"):
        setattr(args, setting, min(getattr(args, setting), LARGE[setting]))
    todo = [p for p in LARGE["precisions"] if p not in out["rows"] and args.precision in (None, p)]
    if args.precision is None:
        # each precision in a process of its own, so that the one before's models, compiled decoders and
        # packed copies leave nothing behind (int4 after int8 in one process was killed for memory at 20.6 GB)
        for precision in todo:
            print(f"--part large --precision {precision}", flush=True)
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--precision", precision], check=True)
        print(json.dumps(json.loads(path.read_text())["large"].get("ratios", {})))
        return
    for precision in todo:  # one precision's models in memory, each converted in place
        dense, tokenizer = upcycle_load(grown, dtype=torch.bfloat16)
        out["parameters"] = sum(p.numel() for p in dense.parameters())
        rows = {f"no_ffn_{precision}": to_precision(speed.without_ffns(dense), precision).eval()}
        rows[f"dense_{precision}"] = to_precision(dense, precision).eval()  # before the sparse one is loaded
        sparse = upcycle_load(sparse_folder, dtype=torch.bfloat16)[0]
        rows[f"sparse_{precision}"] = to_precision(sparse, precision).eval()
        del dense, sparse
        formats = (LLAMA_FORMATS[precision],)
        out["rows"][precision] = measure(rows, tokenizer, source, args, (precision,), formats)
        del rows
        gc.collect()
        tok = {k: v for r in out["rows"].values() for k, v in r["tok_s"].items()}
        out["ratios"] = {p: tok[f"upcycle_sparse_{p}"] / tok[f"llamacpp_{LLAMA_FORMATS[p]}"] for p in out["rows"]
                         if f"llamacpp_{LLAMA_FORMATS[p]}" in tok}  # fmt: skip
        out["targets"] = {"int8": 1.3, "int4": 1.15}
        result = json.loads(path.read_text()) if path.exists() else {}
        result.pop("run", None)
        save("cpu_decode", result | {"large": out})  # after each precision: a stopped run keeps what it measured
        print(json.dumps(out["ratios"]), flush=True)


def front(result: dict) -> dict:
    """Each llama.cpp row against upcycle's rows: matched by those at least as fast with perplexity at most
    1 % above its own on every corpus; `dominated_by_llamacpp` lists the llama.cpp rows none matches, and
    whether upcycle's sparse model decodes faster than llama.cpp's fastest row."""
    tok, ppl = result["tok_s"], result["ppl"]
    ours = [k for k in ppl if not k.startswith("llamacpp") and f"upcycle_{k}" in tok]
    matched = {}
    for theirs in (k for k in ppl if k.startswith("llamacpp") and k in tok):
        matched[theirs] = [
            k for k in ours
            if tok[f"upcycle_{k}"] >= tok[theirs] and all(ppl[k][c] <= MARGIN * ppl[theirs][c] for c in ppl[theirs])
        ]  # fmt: skip
    fastest = max((tok[k] for k in tok if k.startswith("llamacpp")), default=None)
    sparse = max((tok[k] for k in tok if k.startswith("upcycle_sparse")), default=None)
    return {
        "matched_by": matched,
        "dominated_by_llamacpp": [k for k, v in matched.items() if not v],
        "sparse_past_fastest_llamacpp": None if fastest is None or sparse is None else sparse > fastest,
    }


def criteria(result: dict) -> dict:
    """Issue 18's targets: sparse ÷ llama.cpp at each precision against 1.2, 1.0, 1.0 (int4 against Q4_0 and
    int4a against Q4_1: 1.0)."""
    tok, out = result["tok_s"], {}
    for precision, target in (("fp32", 1.2), ("bf16", 1.0), ("int8", 1.0), ("int4", 1.0), ("int4a", 1.0)):
        theirs, ours = tok.get(f"llamacpp_{LLAMA_FORMATS[precision]}"), tok.get(f"upcycle_sparse_{precision}")
        if theirs and ours:
            out[precision] = {"ratio": ours / theirs, "target": target, "met": ours / theirs >= target}
    return out


def _rows(result: dict) -> list[tuple[str, str]]:
    """(key, label) of every row measured, by precision: llama.cpp's format(s) facing it, then upcycle's."""
    out = []
    for precision in PRECISIONS:
        facing = [LLAMA_FORMATS[precision]] + (["q4_k_m"] if precision == "int4" else [])
        out += [(f"llamacpp_{fmt}", f"llama.cpp dense {fmt.upper()}") for fmt in facing]
        out += [(f"dense_{precision}", f"upcycle dense {precision}"), (f"sparse_{precision}", f"upcycle sparse {precision}"),
                (f"sparse2bit_{precision}", f"upcycle sparse {precision}, 2-bit shadow"),
                (f"no_ffn_{precision}", f"(upcycle, FFNs skipped, {precision})")]  # fmt: skip
    return [(k, label) for k, label in out if k in result["tok_s"] or f"upcycle_{k}" in result["tok_s"]]


def table(result: dict) -> str:
    tok, nbytes, limit, ppl = result["tok_s"], result["bytes_per_token"], result["limit_tok_s"], result.get("ppl", {})
    lines = [
        f"Greedy decoding of {result['model']}, {result['new_tokens']} new tokens, {result['threads']} threads, "
        f"median of {result['repeats']} alternating runs; read bandwidth {result['bandwidth_gb_s']:.1f} GB/s:",
        "",
        "| row | tokens/s | MB read / token | byte limit tokens/s | ppl shakespeare | ppl pystdlib |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in _rows(result):
        rate = tok.get(key) or tok.get(f"upcycle_{key}")
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
    if "matched_by" in result:
        for theirs, ours in result["matched_by"].items():
            name = theirs.replace("llamacpp_", "llama.cpp ").upper().replace("LLAMA.CPP", "llama.cpp")
            lines += [f"- {name}: " + (f"matched by upcycle {', '.join(ours)} (as fast or faster, ppl within 1 %)"
                                       if ours else "no upcycle row as fast with ppl within 1 % (it dominates)")]  # fmt: skip
        if result.get("sparse_past_fastest_llamacpp") is not None:
            lines += [f"- upcycle's sparse model {'decodes faster than' if result['sparse_past_fastest_llamacpp'] else 'does not pass'} "
                      "llama.cpp's fastest row"]  # fmt: skip
    for fmt, why in result.get("llamacpp_without_extra_buffers", {}).items():
        lines += [
            f"- llama.cpp {fmt.upper()} ran without its extra CPU buffer types (repacking/AMX): with them it "
            f"failed ({why})"
        ]
    if "ppl_dense_int4_q4_0_rule" in result:
        rule = result["ppl_dense_int4_q4_0_rule"]
        lines += [f"- upcycle's int4 rows: {result['int4_calibration']}; by Q4_0's own rule instead (llama.cpp's "
                  f"Q4_0 values, the head int8) the dense model's ppl is {rule['shakespeare']:.2f} / {rule['pystdlib']:.2f}"]  # fmt: skip
    split = result.get("ms_split", {})
    if split:
        lines += [
            "- ms a token, sparse model: "
            + "; ".join(f"{p} FFNs {v['sparse_ffn_ms']:.1f} + rest {v['other_ms']:.1f}" for p, v in split.items())
        ]
    if "error" in result.get("llamacpp", {}):
        lines += ["", f"- llama.cpp not run: {result['llamacpp']['error']}"]
    if "large" in result:
        lines += ["", large_table(result["large"])]
    return "\n".join(lines)


def large_table(large: dict) -> str:
    """--part large: each precision's rows, and sparse ÷ llama.cpp against the issue's targets."""
    lines = [
        f"A grown SmolLM2 of {large['parameters'] / 1e9:.2f}B parameters ({large['sparsity']}), "
        f"{next(iter(large['rows'].values()))['threads']} threads:",
        "",
        "| row | tokens/s | MB read / token | byte limit tokens/s | ppl shakespeare | ppl pystdlib |",
        "|---|---|---|---|---|---|",
    ]
    for precision, r in large["rows"].items():
        names = [(f"llamacpp_{LLAMA_FORMATS[precision]}", f"llama.cpp dense {LLAMA_FORMATS[precision].upper()}"),
                 (f"dense_{precision}", f"upcycle dense {precision}"), (f"sparse_{precision}", f"upcycle sparse {precision}"),
                 (f"no_ffn_{precision}", f"(upcycle, FFNs skipped, {precision})")]  # fmt: skip
        for key, name in names:
            rate = r["tok_s"].get(key) or r["tok_s"].get(f"upcycle_{key}")
            if rate is None:
                continue
            p = r["ppl"].get(key, {})
            quality = " | ".join(f"{p[c]:.2f}" if c in p else "—" for c in CORPORA)
            lines.append(f"| {name} | {rate:.2f} | {r['bytes_per_token'][key] / 1e6:.0f} | "
                         f"{r['limit_tok_s'][key]:.2f} | {quality} |")  # fmt: skip
    lines.append("")
    for precision, ratio in large.get("ratios", {}).items():
        target = large["targets"][precision]
        lines.append(f"- {precision}: upcycle sparse ÷ llama.cpp {LLAMA_FORMATS[precision].upper()} = {ratio:.2f}× "
                     f"(target ≥ {target}: {'met' if ratio >= target else 'not met'})")  # fmt: skip
    for precision, r in large["rows"].items():
        for p, v in r.get("ms_split", {}).items():
            lines.append(f"- ms a token, sparse {p}: FFNs {v['sparse_ffn_ms']:.1f} + the rest {v['other_ms']:.1f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Tokens/s against perplexity (shakespeare, pystdlib), every row that has both: up and left is better."""
    fig, axes = figure(2, size=(11, 4.5))
    styles = {"llamacpp": ("x", "C3", "llama.cpp"), "dense": ("o", "C0", "upcycle dense"),
              "sparse": ("^", "C2", "upcycle sparse"), "sparse2bit": ("v", "C4", "upcycle sparse, 2-bit shadow")}  # fmt: skip
    for ax, corpus in zip(axes, CORPORA):
        for kind, (marker, colour, label) in styles.items():
            points = []
            for key, _ in _rows(result):
                if key.split("_")[0] != kind or corpus not in result.get("ppl", {}).get(key, {}):
                    continue
                rate = result["tok_s"].get(key) or result["tok_s"].get(f"upcycle_{key}")
                points.append((result["ppl"][key][corpus], rate, key.split("_", 1)[1]))
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color=colour, label=label)
                for x, y, name in points:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set(xlabel=f"held-out perplexity, {corpus}", ylabel="tokens / s", xscale="log")
        ax.set_title(f"{result['model']}, {result['threads']} CPU threads", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
