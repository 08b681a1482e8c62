"""upcycle on a checkpoint larger than this machine's RAM: every streamed verb's time and peak memory.

    python benchmarks/scale.py                       # build the checkpoint, then every row and the curve (hours)
    python benchmarks/scale.py --part build rows     # the ≥ 7B checkpoint and its rows only
    python benchmarks/scale.py --part curve          # prune and grow at four sizes
    python benchmarks/scale.py --part depth-curve    # prune on the 0.5B made 2x, 4x, 8x as deep (same layers)
    python benchmarks/scale.py --size 0.5B --part build rows   # the same rows on a small checkpoint (minutes)

The checkpoint: smollm2-135m grown by upcycle's own exact operators, streamed (`upcycle grow`): the hidden
size ×8 by HyperCloning (576 → 4608), then the FFN width by neuron duplication (1536 → 16896): 7.45B
parameters, fp32, 29.8 GB on disk — more than this machine's RAM. It computes SmolLM2's function, so its
held-out perplexity must be SmolLM2's (measured, streamed). Each row runs `upcycle <verb>` in a process of
its own: wall time, the process's peak resident memory (the kernel's account: imports included), the
bytes written, and the perplexity or the equivalence the verb reports. Outputs are written in bf16 where
fp32 would not fit beside the source (the row says so), deleted once measured; a row whose output cannot
fit on the disk is skipped with that reason. The disk's own read and write speeds are measured first
(a verb that needs no calibration is judged against them). Work folder: /tmp/upcycle-scale (--work).
Results: benchmarks/results/scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import RESULTS, figure, load, measured, provenance, save

from upcycle import data, hub
from upcycle.eval import perplexity

TEXT = "shakespeare+pystdlib"
# name -> (hidden ×, FFN width): the same family (llama) at four sizes
SIZES = {"0.5B": (4, 1536), "1.5B": (4, 6144), "3B": (8, 6144), "7.5B": (8, 16896)}
EVAL = ["--data", TEXT, "--seq-len", "256", "--max-blocks", "8", "--batch-size", "4"]
CALIBRATION = ["--calibration", TEXT, "--calibration-tokens", "1024", "--held-tokens", "1024", "--seq-len", "256"]
# name -> (the command after `upcycle`, with SRC and OUT; bytes per parameter written; what the row checks)
ROWS = {
    "eval": (["eval", "SRC", *EVAL, "--json"], 0),
    "convert": (["convert", "SRC", "OUT", "--dtype", "bf16"], 2),
    "prune_wanda_50": (["prune", "SRC", "OUT", "--method", "wanda", "--sparsity", "0.5", *CALIBRATION, "--dtype", "bf16"], 2),
    "prune_sparsegpt_2of4": (["prune", "SRC", "OUT", "--method", "sparsegpt", "--nm", "2:4", *CALIBRATION, "--dtype", "bf16"], 2),
    # identity layers need no calibration: the held-out text only verifies, and each 1,024 tokens of it cost a
    # forward over the 7.45B twice (source, written model read back): ~30 s each on this CPU, measured
    "grow_depth": (["grow", "SRC", "OUT", "--op", "depth", "--add", "2", "--calibration-tokens", "256", "--dtype", "bf16"], 2),
    "grow_moe_shared_8": (["grow", "SRC", "OUT", "--op", "moe", "--family", "qwen2_moe", "--experts", "8", "--top-k", "2",
                           "--mode", "shared", "--expert-width", "1024", "--calibration-tokens", "1024", "--dtype",
                           "bf16"], 2.85),
    "slim_depth_27": (["slim", "SRC", "OUT", "--op", "depth", "--layers", "8", "--criterion", "block_influence",
                       "--calibration-tokens", "1024", "--dtype", "bf16"], 2),
    "slim_ffn_33": (["slim", "SRC", "OUT", "--op", "ffn_width", "--width", "11264", "--calibration-tokens", "1024",
                     "--dtype", "bf16"], 2),
    # conversion at a budget this machine can give a 7B (4 steps of 256 rows a layer) and a learning rate for
    # its weights, 1/4-1/8 of SmolLM2's scale after growth: the default 1e-3 raised the FFN error on the grown
    # 0.5B (0.063 -> 0.073), 1e-4 lowered it (-> 0.060)
    # the low-rank predictor (the paper's): the shadow's quantizers are the slow part at this width on this
    # CPU (GPTQ of one 16,896 x 4,608 matrix: 19 s, four a layer; rounding to nearest with its step search:
    # about 40 s for the pair, again at every conversion step) — 4 to 8 minutes a layer, measured
    "sparsify_16_of_64": (["sparsify", "SRC", "OUT", "--bank", "64", "--keep", "16", "--calibration-tokens", "2048",
                           "--convert-steps", "4", "--convert-rows", "256", "--convert-lr", "1e-4", "--no-fit-fp32",
                           "--predictor", "lowrank", "--warmup-steps", "50", "--dtype", "bf16"],
                          2.35),
    # the sparsify row's output (kept for this row) made dense again: the stock family, every channel computed
    "densify": (["densify", "OUT:sparsify_16_of_64", "OUT", "--dtype", "bf16"], 2),
}  # fmt: skip
# the cost curve: the verbs measured at every size (the prune and dense -> MoE grow, and depth growth,
# which reads and writes only)
MAPPED_READER = "earlier"  # what the table says of a row measured before rows recorded their commit
CURVE = ("prune_wanda_50", "grow_moe_shared_8", "grow_depth")
NOT_STREAMED: dict = {}  # verbs whose streamed path is still to come: recorded, not run (they would load the model)


def upcycle_cli(*args) -> dict:
    return measured(sys.executable, "-m", "upcycle.cli", *map(str, args), "--no-progress", "--overwrite")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def params_of(folder: Path) -> int:
    """Parameters of a folder's weights, from the bytes of its tensors and the dtype its config states."""
    index = folder / "model.safetensors.index.json"
    total = json.loads(index.read_text())["metadata"]["total_size"] if index.exists() else folder_bytes(folder)
    dtype = json.loads((folder / "config.json").read_text()).get("dtype", "float32")
    return total // (2 if dtype in ("bfloat16", "float16") else 4)


def disk_speed(work: Path, gigabytes: int = 4) -> dict:
    """Sequential write (fsync'd) and read (the file's pages dropped first) of a file of `gigabytes`."""
    path, block = work / "disk-speed.bin", os.urandom(64 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(gigabytes * 16):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - start
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the disk, not the page cache
    start = time.perf_counter()
    while os.read(fd, 64 << 20):
        pass
    read = time.perf_counter() - start
    os.close(fd)
    path.unlink()
    size = gigabytes * (1 << 30)
    return {"write_gb_s": size / write / 1e9, "read_gb_s": size / read / 1e9, "bytes": size}


def build(size: str, work: Path) -> dict:
    """The checkpoint of `size`, grown from smollm2-135m in two streamed steps (each its own process)."""
    factor, width = SIZES[size]
    folder, wide = work / f"smollm2-grown-{size}", work / f"smollm2-hidden-x{factor}"
    if (folder / "config.json").exists():
        return {"folder": str(folder), "reused": True}
    steps = {"hidden": upcycle_cli("grow", "smollm2-135m", wide, "--op", "hidden", "--factor", factor,
                                   "--calibration-tokens", "1024")}  # fmt: skip
    if width > 1536:
        steps["ffn_width"] = upcycle_cli("grow", wide, folder, "--op", "ffn_width", "--width", width,
                                         "--calibration-tokens", "1024")  # fmt: skip
        shutil.rmtree(wide, ignore_errors=True)
    else:
        wide.rename(folder)
    return {"folder": str(folder), "steps": {k: _brief(v) for k, v in steps.items()}}


def _brief(run: dict) -> dict:
    """A row's figures without the command's full output (kept: the lines that state its results)."""
    keep = [line for line in run.get("stdout", "").splitlines() if re.search(r"ppl|streamed|saved|Δlogit", line)]
    return with_pass_peaks({k: v for k, v in run.items() if k != "stdout"} | ({"says": keep} if keep else {}))


def with_pass_peaks(row: dict) -> dict:
    """The process's peak memory: the larger of the kernel's account at exit and every streamed pass's own
    peak. Each pass resets the kernel's high-water mark when it starts (to measure itself), so at exit the
    kernel reports only the last pass (for convert and grow, the pass that reads the output back)."""
    passes = [float(m.replace(",", "")) for line in row.get("says", [])
              for m in re.findall(r"peak resident memory ([0-9,.]+) MB", line)]  # fmt: skip
    if "peak_rss_mb" in row and passes:
        row["peak_rss_mb"] = max([row["peak_rss_mb"], *passes])
    return row


def row(name: str, source: Path, work: Path, *, keep: bool = False) -> dict:
    """Run row `name` on `source` (or on the output of the row its command names as OUT:<row>); its output
    is deleted once measured, unless `keep` (a later row reads it)."""
    args, bytes_per_param = ROWS[name]
    out = work / f"out-{name}"
    read = next((work / f"out-{a[4:]}" for a in args if a.startswith("OUT:")), None)
    if read is not None and not (read / "config.json").exists():
        return {"skipped": f"its source, {read.name}, is another row's output: run that row first"}
    need = params_of(read or source) * bytes_per_param * 1.05
    free = shutil.disk_usage(work).free
    if need > free:
        return {"skipped": f"its output needs {need / 1e9:.1f} GB and the disk has {free / 1e9:.1f} GB free"}
    argv = [str(source) if a == "SRC" else str(out) if a == "OUT" else str(read) if a.startswith("OUT:") else a
            for a in args]  # fmt: skip
    run = upcycle_cli(*argv)
    written = "bf16" if "bf16" in argv else "fp32" if "OUT" in args else None
    result = _brief(run) | {"dtype_written": written, "command": "upcycle " + " ".join(argv)}
    result["commit"] = provenance()["commit"]  # rows are re-run one by one: each says which code it measured
    result["read_bytes"] = folder_bytes(read or source)
    if out.exists():
        result["output_bytes"] = folder_bytes(out)
        report = next((f for f in out.glob("*_report.json")), None)
        if report is not None:
            facts = json.loads(report.read_text())
            result |= {k: facts[k] for k in ("ppl_before", "ppl_after", "kl") if k in facts}
            if "overall" in facts:
                result["max_dlogit"] = facts["overall"]["equivalence"]["max_abs_logit"]
            if "cuts" in facts:  # slim: the cut's one-shot cost
                cut = facts["cuts"][0]
                result |= {"ppl_before": cut["ppl_before"], "ppl_after": cut["ppl_after"], "kl": cut["kl"]}
            if "equivalence" in facts and facts["equivalence"]:  # sparsify: the sparse model against the dense
                result |= {"kl": facts["equivalence"]["mean_kl"], "top1": facts["equivalence"]["top1_agreement"]}
        if not keep:
            shutil.rmtree(out)
    if read is not None:  # a row's output read by this one: done with
        shutil.rmtree(read, ignore_errors=True)
    if "stdout" in run and name == "eval":
        result["ppl"] = json.loads(run["stdout"][run["stdout"].index("{") :])["ppl"]
    # convert, sparsify: the written model read back vs the one held; densify: the dense model (every channel
    # computed) vs the sparse one, which differ by design
    dlogit = re.search(r"(?:reloaded|random tokens): max \|Δlogit\| ([0-9.e+-]+)", run.get("stdout", ""))
    if dlogit:
        result["max_dlogit"] = float(dlogit.group(1))
    return result


# ---- peers on the same checkpoints ------------------------------------------------------------------------
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
MERGEKIT = "mergekit==0.1.5"
# llm-compressor prunes the fp32 model and measures nothing; so does upcycle here (--held-tokens 0: no one-shot
# cost measured on the way, which is two more forwards of the held-out text); both outputs are scored apart
PRUNE_FP32 = ["--sparsity", "0.5", "--calibration", TEXT, "--calibration-tokens", "1024", "--seq-len", "256",
              "--held-tokens", "0", "--dtype", "fp32"]  # fmt: skip


def watched(args: list, limit_mb: float) -> dict:
    """Run a command, sampling its resident memory; stopped when it passes `limit_mb` (before the kernel's
    OOM killer picks a process): {"seconds", "peak_rss_mb", "stdout"} or {"error", "seconds", "peak_rss_mb"}."""
    start, peak = time.perf_counter(), 0.0
    stdout = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty peer cannot fill it and stall
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen([str(a) for a in args], stdout=stdout, stderr=devnull, text=True)
    while proc.poll() is None:
        try:
            rss = next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmRSS"))
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            rss = 0
        peak = max(peak, rss / 1024)
        if peak > limit_mb:
            proc.kill()
            proc.wait()
            return {"error": f"resident memory passed {limit_mb / 1024:.0f} GiB (this machine has "
                             f"{ram_gib():.1f}): stopped", "seconds": time.perf_counter() - start,
                    "peak_rss_mb": peak}  # fmt: skip
        time.sleep(0.5)
    stdout.seek(0)
    seconds, out = time.perf_counter() - start, stdout.read()
    if proc.returncode:
        return {"error": f"exit code {proc.returncode}", "seconds": seconds, "peak_rss_mb": peak}
    return {"seconds": seconds, "peak_rss_mb": peak, "stdout": out}


def ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def held_ppl(folder: Path) -> float | None:
    """The eval row's perplexity (the same held-out blocks), streamed: any output, ours or a peer's."""
    run = upcycle_cli("eval", folder, *EVAL, "--json")
    return json.loads(run["stdout"][run["stdout"].index("{") :])["ppl"] if "stdout" in run else None


def peer_prune(size: str, folder: Path, work: Path, method: str) -> dict:
    """llm-compressor's oneshot (its sequential pipeline: the model in CPU RAM, a layer at a time computed) and
    upcycle's streamed prune, each a whole process on the same checkpoint and calibration blocks, fp32."""
    from peers import driver, peer_python

    _, tokenizer = hub.folder_for(folder)
    blocks = data.blocks(TEXT, tokenizer, "train", 256, max_blocks=1024 // 256)  # what CALIBRATION reads
    calibration = work / "calibration.json"
    calibration.write_text(json.dumps({"input_ids": blocks.tolist()}))
    out = work / f"peer-{method}"
    limit = (ram_gib() - 2) * 1024
    theirs = watched([peer_python("upcycle-bench-llmcompressor", (LLMCOMPRESSOR,)), driver("llmcompressor_prune"),
                      folder, calibration, out, "--method", method, "--sparsity", "0.5"], limit)  # fmt: skip
    point = {"size": size, "parameters": params_of(folder), "tool": LLMCOMPRESSOR}
    point |= {k: v for k, v in theirs.items() if k != "stdout"}
    if "error" not in theirs:
        point["oneshot_seconds"] = json.loads(theirs["stdout"].strip().splitlines()[-1])["seconds"]
        point["ppl"] = held_ppl(out)
    shutil.rmtree(out, ignore_errors=True)
    if "error" in theirs:  # nothing to set ours beside (ours at this size: the prune row)
        return point
    ours = upcycle_cli("prune", folder, out, "--method", method, *PRUNE_FP32)
    point["upcycle"] = {k: v for k, v in _brief(ours).items() if k in ("seconds", "peak_rss_mb", "error")}
    if "error" not in ours:
        point["upcycle"]["ppl"] = held_ppl(out)
    shutil.rmtree(out, ignore_errors=True)
    return point


def peer_moe(size: str, folder: Path, work: Path, *, shard: str | None = None, ours: bool = True) -> dict:
    """mergekit-moe (its lazy loader: tensor by tensor from memory-mapped shards) against upcycle's streamed
    grow, both 8 copies of the FFN with top-2 routing into Mixtral, bf16, each a whole process. `shard`:
    mergekit's --out-shard-size (it holds a shard in memory until it writes it; its default is 5B)."""
    import yaml
    from peers import peer_python

    exe = peer_python("upcycle-bench-mergekit", (MERGEKIT,)).parent / "mergekit-moe"
    out = work / "peer-moe"
    config = {"base_model": str(folder), "gate_mode": "random", "dtype": "bfloat16", "experts_per_token": 2,
              "experts": [{"source_model": str(folder)} for _ in range(8)]}  # fmt: skip
    (work / "moe.yaml").write_text(yaml.safe_dump(config))
    theirs = watched([exe, work / "moe.yaml", out, "--i-understand-this-is-not-useful-without-training", "--quiet",
                      "--lazy-unpickle", *(["--out-shard-size", shard] if shard else [])],
                     (ram_gib() - 2) * 1024)  # fmt: skip
    point = {"size": size, "parameters": params_of(folder), "tool": MERGEKIT, "out_shard_size": shard or "5B"}
    point |= {k: v for k, v in theirs.items() if k != "stdout"}
    if "error" not in theirs:
        point["ppl"] = held_ppl(out)
    shutil.rmtree(out, ignore_errors=True)
    if not ours:
        return point
    ours = upcycle_cli("grow", folder, out, "--op", "moe", "--mode", "copy", "--family", "mixtral", "--experts", "8",
                       "--top-k", "2", "--calibration-tokens", "1024", "--dtype", "bf16")  # fmt: skip
    point["upcycle"] = {k: v for k, v in _brief(ours).items() if k in ("seconds", "peak_rss_mb", "error", "says")}
    if "error" not in ours:
        point["upcycle"]["ppl"] = held_ppl(out)
    shutil.rmtree(out, ignore_errors=True)
    return point


def sparsify_lr(work: Path, lrs=("1e-3", "1e-4", "1e-5")) -> dict:
    """The sparsify row's conversion learning rate, chosen on the grown 0.5B (same recipe, bf16): the mean
    relative FFN error before and after conversion, and the sparse model's KL to the dense one."""
    folder = Path(build("0.5B", work)["folder"])
    out, points = work / "out-sparsify-lr", {}
    recipe = ROWS["sparsify_16_of_64"][0][3:]
    recipe = [a for n, a in enumerate(recipe) if a != "--convert-lr" and recipe[n - 1] != "--convert-lr"]
    for lr in lrs:
        run = upcycle_cli("sparsify", folder, out, *recipe, "--convert-lr", lr)
        if "error" in run:
            points[lr] = {"error": run["error"]}
            continue
        facts = json.loads((out / "sparsify_report.json").read_text())
        mean = statistics.fmean
        points[lr] = {"error_before": mean(facts["convert_error_before"]),
                      "error_after": mean(facts["convert_error_after"]), "kl": facts["equivalence"]["mean_kl"],
                      "seconds": run["seconds"]}  # fmt: skip
        shutil.rmtree(out)
    return {"size": "0.5B", "parameters": params_of(folder), "lrs": points}


DEPTHS = (30, 60, 120, 240)  # the grown 0.5B's layers, and the same layers stacked 2x, 4x and 8x as deep


def depth_curve(work: Path) -> list[dict]:
    """The Wanda prune row on the grown 0.5B made 2x, 4x and 8x as deep by identity layers (written in bf16):
    the model grows, its layers do not — what a streamed pass promises is memory that does not grow with the
    number of layers. (The width curve's family grows its layers too: 12x from 0.5B to 7.45B.)"""
    base = Path(build("0.5B", work)["folder"])
    points = []
    for layers in DEPTHS:
        folder = base if layers == DEPTHS[0] else work / f"smollm2-grown-0.5B-{layers}-layers"
        if folder != base:
            grown = upcycle_cli("grow", base, folder, "--op", "depth", "--add", layers - DEPTHS[0],
                                "--calibration-tokens", "256", "--dtype", "bf16")  # fmt: skip
            if "error" in grown:
                points.append({"layers": layers, "error": grown["error"]})
                continue
        point = row("prune_wanda_50", folder, work)
        points.append({"layers": layers, "parameters": params_of(folder)} | point)
        print(f"depth curve {layers} layers: {points[-1]}", flush=True)
        if folder != base:
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    return points


def first_layer(source: Path) -> dict:
    """SparseGPT 2:4 on the checkpoint's first layer alone, in a process of its own (as the prune row would
    do it: bf16, 1,024 calibration tokens carried to the layer): its seconds and the process's peak memory,
    for a row too long to run whole here."""
    run = measured(sys.executable, __file__, "--child-first-layer", source)
    if "error" in run:
        return run
    return json.loads(run["stdout"].strip().splitlines()[-1]) | {"peak_rss_mb": run["peak_rss_mb"]}


def _child_first_layer(source: str) -> None:
    from upcycle.checkpoint import LazyModel
    from upcycle.ops.calibrate import LayerStream
    from upcycle.ops.prune import PruneReport, PruneSpec, prune_layer

    lazy = LazyModel(source, dtype=torch.bfloat16)
    _, tokenizer = hub.folder_for(source)
    lazy.load_outer()
    stream = LayerStream(lazy.model, data.blocks(TEXT, tokenizer, "train", 256, max_blocks=4))
    lazy.load_layer(0)
    spec = PruneSpec(method="sparsegpt", nm="2:4")
    report = PruneReport(spec.describe(), 0.0)
    start = time.perf_counter()
    prune_layer(lazy.adapter, 0, spec, stream, report)
    seconds = time.perf_counter() - start
    print(json.dumps({"layer_seconds": seconds, "layers": lazy.num_layers, "estimate_s": seconds * lazy.num_layers,
                      "pattern_holds": report.pattern_holds}))  # fmt: skip


def _largest_run(runs: list[dict]) -> dict:
    """A peer's entry: the figures at the largest size it ran (the keys the docs read), every size under
    `sizes`, and the error at any size it could not run."""
    ran = [p for p in runs if "error" not in p]
    top = max(ran, key=lambda p: p["parameters"]) if ran else runs[-1]
    failed = {p["size"]: p["error"] for p in runs if "error" in p}
    return {k: v for k, v in top.items()} | {"sizes": sorted(runs, key=lambda p: p["parameters"])} | (
        {"failed": failed} if failed else {})  # fmt: skip


def source_ppl() -> float:
    """SmolLM2-135M's perplexity on the blocks the eval row scores (in memory: it is small)."""
    model, tokenizer = hub.load("smollm2-135m")
    blocks = data.blocks(TEXT, tokenizer, "validation", 256, max_blocks=8)
    return perplexity(model, blocks, batch_size=4, progress=False).ppl


def table(results: dict) -> str:
    """The docs' table: one row per verb on the large checkpoint, and the cost curve, from the JSON."""
    ck, disk = results.get("checkpoint", {}), results.get("disk", {})
    lines = [
        f"Checkpoint: {ck.get('parameters', 0) / 1e9:.2f}B parameters, {ck.get('bytes_on_disk', 0) / 1e9:.1f} GB "
        f"on disk (fp32), this machine's RAM {ck.get('ram_bytes', 0) / 2**30:.1f} GiB; held-out perplexity "
        f"{ck.get('ppl', float('nan')):.3f} (SmolLM2-135M: {ck.get('source_ppl', float('nan')):.3f}). "
        f"Disk: write {disk.get('write_gb_s', 0):.2f} GB/s, read {disk.get('read_gb_s', 0):.2f} GB/s.",
        "",
        "| row | s | × read + write | peak resident MB | written | ppl / one-shot ppl | max \\|Δlogit\\| | code |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.get("rows", {}).items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {name} | — | — | — | {r.get('skipped') or 'error: ' + r['error']} | — | — | — |")
            continue
        written = f"{r['output_bytes'] / 1e9:.1f} GB ({r['dtype_written']})" if r.get("output_bytes") else "—"
        quality = f"{r['ppl']:.3f}" if "ppl" in r else (
            f"{r['ppl_before']:.3f} → {r['ppl_after']:.3f}" if "ppl_after" in r else
            f"KL {r['kl']:.3f} vs dense" if "kl" in r else "—")  # fmt: skip
        dlogit = f"{r['max_dlogit']:.3g}" if "max_dlogit" in r else "—"
        ratio = io_ratio(r, ck, disk)
        lines.append(
            f"| {name} | {r['seconds']:.0f} | {ratio} | {r['peak_rss_mb']:,.0f} | {written} | {quality} | {dlogit} "
            f"| {r.get('commit', MAPPED_READER)} |"
        )
    for name in ROWS:
        if name not in results.get("rows", {}):
            lines.append(f"| {name} | — | — | — | not run for these results | — | — | — |")
    lines += [
        "",
        "max \\|Δlogit\\|: the written model read back against the model as held (convert, sparsify, grow: 0 is "
        "exact); densify: the dense model against the sparse one, which differ by design.",
        "",
        "× read + write: the row's wall time over the time this disk takes to read the checkpoint and write the "
        "output (its measured speeds); in brackets, the streamed pass that writes, without the process start, "
        "the held-out forward before it and the pass that reads the output back.",
        "",
        f"code: the commit each row was measured at ({MAPPED_READER}: before b4a83fb, whose reader stopped mapping "
        "tensor files — a mapped fp32 layer counted in resident memory beside its bf16 copy).",
    ]
    lr = results.get("sparsify_lr")
    if lr:
        cells = "; ".join(f"{k}: FFN error {v['error_before']:.3f} → {v['error_after']:.3f}, KL {v['kl']:.3f}"
                          for k, v in lr["lrs"].items() if "kl" in v)  # fmt: skip
        lines += ["", f"The sparsify row's conversion learning rate, on the grown {lr['size']} (same recipe): {cells}."]
    first = results.get("first_layer", {}).get("prune_sparsegpt_2of4")
    if first and "layer_seconds" in first:
        lines += ["", f"SparseGPT 2:4 on the {first['size']} checkpoint's first layer alone (bf16, 1,024 calibration "
                  f"tokens): {first['layer_seconds']:.0f} s, peak {first['peak_rss_mb']:,.0f} MB; "
                  f"× {first['layers']} layers ≈ {first['estimate_s'] / 3600:.1f} h."]  # fmt: skip
    peers = results.get("peers", {})
    if peers:
        lines += ["", "| peer, size | peer s | peer peak MB | peer ppl | upcycle s | upcycle peak MB | upcycle ppl |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, entry in peers.items():
            for p in entry.get("sizes", [entry]):
                ours = p.get("upcycle", {})
                if "error" in p:
                    theirs = f"{p['error']} after {p['seconds']:.0f} s | {p['peak_rss_mb']:,.0f} | —"
                else:
                    theirs = f"{p['seconds']:.0f} | {p['peak_rss_mb']:,.0f} | {_num(p.get('ppl'))}"
                mine = (f"{ours['seconds']:.0f} | {ours['peak_rss_mb']:,.0f} | {_num(ours.get('ppl'))}"
                        if "seconds" in ours else "— | — | —")  # fmt: skip
                lines.append(f"| {name}, {p['parameters'] / 1e9:.2f}B | {theirs} | {mine} |")
    for verb, points in results.get("curve", {}).items():
        cells = ", ".join(
            f"{p['parameters'] / 1e9:.2f}B: {p['peak_rss_mb']:,.0f} MB, {p['seconds']:.0f} s"
            for p in points
            if "peak_rss_mb" in p
        )
        lines += ["", f"Cost curve, {verb}: {cells}"]
        measured_ = [p for p in points if "peak_rss_mb" in p]
        if len(measured_) > 1:
            first, last = measured_[0], measured_[-1]
            per_param = (last["seconds"] / last["parameters"]) / (first["seconds"] / first["parameters"])
            lines[-1] += (f" — from the smallest to the largest: peak memory ×{last['peak_rss_mb'] / first['peak_rss_mb']:.2f}"
                          f", seconds per parameter ×{per_param:.2f}")  # fmt: skip
    for verb, points in results.get("depth_curve", {}).items():
        cells = ", ".join(f"{p['layers']} layers ({p['parameters'] / 1e9:.2f}B): {p['peak_rss_mb']:,.0f} MB, "
                          f"{p['seconds']:.0f} s" for p in points if "peak_rss_mb" in p)  # fmt: skip
        lines += ["", f"Deeper, not wider (the grown 0.5B with identity layers, bf16), {verb}: {cells}"]
    return "\n".join(lines)


def _num(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def io_ratio(r: dict, checkpoint: dict, disk: dict) -> str:
    """The row's time over reading the checkpoint and writing its output at this disk's speeds, and the
    writing pass's alone (from the pass line the command printed)."""
    if not disk or not checkpoint:
        return "—"
    read = r.get("read_bytes", checkpoint["bytes_on_disk"])
    io = read / disk["read_gb_s"] / 1e9 + r.get("output_bytes", 0) / disk["write_gb_s"] / 1e9
    passes = [float(m) for line in r.get("says", []) if "wrote" in line
              for m in re.findall(r"streamed \d+ layers on \S+ in \S+: ([0-9.]+) s", line)]  # fmt: skip
    return f"{r['seconds'] / io:.1f}" + (f" ({passes[-1] / io:.1f})" if passes else "")


def plot(results: dict, path: Path) -> None:
    curve = results.get("curve", {})
    if not curve:
        return
    fig, (left, right) = figure(2, size=(11, 4))
    for verb, points in curve.items():
        points = [p for p in points if "peak_rss_mb" in p]
        xs = [p["parameters"] / 1e9 for p in points]
        left.plot(xs, [p["peak_rss_mb"] / 1024 for p in points], "o-", label=verb)
        right.plot(xs, [p["seconds"] / (p["parameters"] / 1e9) for p in points], "o-", label=verb)
    for verb, points in results.get("depth_curve", {}).items():
        points = [p for p in points if "peak_rss_mb" in p]
        xs = [p["parameters"] / 1e9 for p in points]
        # memory only: its seconds were taken at low priority beside another row (see docs/large.md)
        left.plot(xs, [p["peak_rss_mb"] / 1024 for p in points], "s--", label=f"{verb}, deeper (same layer)")
    ram = results.get("checkpoint", {}).get("ram_bytes")
    if ram:
        left.axhline(ram / 2**30, color="k", ls="--", lw=1, label="this machine's RAM")
    left.set(xlabel="parameters (billions)", ylabel="peak resident memory (GiB)", title="memory against model size")
    right.set(xlabel="parameters (billions)", ylabel="seconds per billion parameters", title="time per parameter")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if sys.argv[1:2] == ["--child-first-layer"]:
        return _child_first_layer(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="*", default=["disk", "build", "rows", "curve", "peers"],
                        choices=("disk", "build", "rows", "curve", "depth-curve", "peers", "peers-moe", "first-layer",
                                 "sparsify-lr"))  # fmt: skip
    parser.add_argument(
        "--peer-sizes",
        nargs="*",
        default=["0.5B", "1.5B", "7.5B"],
        choices=list(SIZES),
        help="the sizes llm-compressor is run at (where it cannot hold a model, how it fails)",
    )
    parser.add_argument("--size", default="7.5B", choices=list(SIZES), help="the checkpoint the rows run on")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES), help="the curve's sizes")
    parser.add_argument("--verbs", nargs="*", default=list(CURVE), choices=list(CURVE), help="the curve's verbs")
    parser.add_argument("--keep", nargs="*", default=[], choices=list(ROWS),
                        help="rows whose output stays for a later run's rows (e.g. sparsify for densify, when the "
                             "disk holds the source or both outputs, not all three)")  # fmt: skip
    parser.add_argument("--work", default="/tmp/upcycle-scale", help="where checkpoints and outputs go")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = load("scale")
    rows = results.setdefault("rows", {})
    for name in [n for n, r in rows.items() if n not in ROWS and n not in NOT_STREAMED]:
        del rows[name]  # a row of an earlier version of this script
    for name, why in NOT_STREAMED.items():
        rows.setdefault(name, {"skipped": why})
    for row_ in rows.values():
        with_pass_peaks(row_)
    if "disk" in args.part:
        results["disk"] = disk_speed(work)
        print(f"disk: {results['disk']}", flush=True)
        save("scale", results)
    source = work / f"smollm2-grown-{args.size}"
    if "build" in args.part:
        made = build(args.size, work)
        results["build"] = made
        results["checkpoint"] = {
            "size": args.size,
            "parameters": params_of(source),
            "bytes_on_disk": folder_bytes(source),
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "source_ppl": source_ppl(),
        }
        if rows.get("eval", {}).get("size") == args.size and "ppl" in rows["eval"]:
            results["checkpoint"]["ppl"] = rows["eval"]["ppl"]  # the eval row's streamed figure on it
        print(f"checkpoint: {results['checkpoint']}", flush=True)
        save("scale", results)
    if "rows" in args.part:
        for name in args.rows:
            print(f"{name} ...", flush=True)
            read_later = name in args.keep or any(f"OUT:{name}" in ROWS[later][0] for later in args.rows)
            rows[name] = row(name, source, work, keep=read_later) | {"size": args.size}
            print(f"  {rows[name]}", flush=True)
            if name == "eval" and "ppl" in rows[name]:
                results["checkpoint"]["ppl"] = rows[name]["ppl"]
            save("scale", results)
        save("scale", results)
    if "curve" in args.part:
        curve = results.setdefault("curve", {})
        for verb in CURVE:
            curve.setdefault(verb, [])
        for size in args.sizes:  # each size measured again; the rows' own size takes the rows' figures
            from_rows = {
                verb for verb in args.verbs if rows.get(verb, {}).get("size") == size and "seconds" in rows[verb]
            }
            folder = work / f"smollm2-grown-{size}"
            if set(args.verbs) - from_rows:
                folder = Path(build(size, work)["folder"])
            for verb in args.verbs:
                point = rows[verb] if verb in from_rows else row(verb, folder, work)
                curve[verb] = [p for p in curve[verb] if p.get("size") != size]
                curve[verb].append({"size": size, "parameters": params_of(folder)} | point)
                curve[verb].sort(key=lambda p: p["parameters"])
                print(f"curve {verb} {size}: {point}", flush=True)
                save("scale", results)
            if size != args.size:  # the rows' checkpoint stays for re-runs; the others are rebuilt in minutes
                shutil.rmtree(folder, ignore_errors=True)
    if "depth-curve" in args.part:
        results["depth_curve"] = {"prune_wanda_50": depth_curve(work)}
        save("scale", results)
    if "sparsify-lr" in args.part:
        results["sparsify_lr"] = sparsify_lr(work)
        print(f"sparsify lr: {results['sparsify_lr']}", flush=True)
        save("scale", results)
    if "first-layer" in args.part:  # SparseGPT 2:4's cost on one layer, where the whole row is too long here
        results["first_layer"] = {"prune_sparsegpt_2of4": first_layer(source) | {"size": args.size}}
        print(f"first layer: {results['first_layer']}", flush=True)
        save("scale", results)
    if "peers" in args.part:
        peers = results.setdefault("peers", {})
        for size in args.peer_sizes:
            folder = Path(build(size, work)["folder"])
            for method in ("wanda", "sparsegpt"):
                point = peer_prune(size, folder, work, method)
                runs = [
                    p for p in peers.setdefault(f"llmcompressor_{method}_50", {}).get("sizes", []) if p["size"] != size
                ]
                runs.append(point)
                peers[f"llmcompressor_{method}_50"] = _largest_run(runs)
                print(f"peer llm-compressor {method} {size}: {point}", flush=True)
                save("scale", results)
            if size != args.size:
                shutil.rmtree(folder, ignore_errors=True)
    if "peers-moe" in args.part:  # at 0.5B: 8 copies of every FFN, at 7.45B, would be 56B parameters
        folder = Path(build("0.5B", work)["folder"])
        point = peer_moe("0.5B", folder, work)
        results.setdefault("peers", {})["mergekit_moe"] = _largest_run([point])
        print(f"peer mergekit-moe 0.5B: {point}", flush=True)
        # its shards held in memory no larger than the 2 GB upcycle writes (which holds one tensor at a time)
        point = peer_moe("0.5B", folder, work, shard="2B", ours=False) | {"upcycle": point.get("upcycle", {})}
        results["peers"]["mergekit_moe_2gb_shards"] = _largest_run([point])
        print(f"peer mergekit-moe 0.5B, 2 GB shards: {point}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    save("scale", results)
    plot(results, RESULTS / "scale.png")
    print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    main()
