"""What every benchmark shares: held-out text and its scoring, a child process per measurement (its
peak memory read one way), results JSON that records the command, commit and machine that made it,
and figures.

    val = held_out(tokenizer)                        # {corpus: validation blocks}
    ppl = score(model, val)                          # {corpus: ppl, "both": token-weighted ppl}
    row = child(__file__, "wanda", "50")             # this script's --child run, in its own process
    save("prune_seft", results)                      # benchmarks/results/prune_seft.json + "run": provenance
    fig, ax = figure()                               # matplotlib's Figure API: no pyplot state
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from matplotlib.figure import Figure

from upcycle import data
from upcycle.eval import perplexity
from upcycle.eval.peak_memory import peak_rss_mb
from upcycle.eval.speed import processor_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def held_out(tokenizer, corpora=data.BUILTIN_CORPORA, blocks: int = 16, seq: int = 256) -> dict[str, torch.Tensor]:
    """Each corpus's validation blocks (the documents no run trains or calibrates on)."""
    return {name: data.blocks(name, tokenizer, "validation", seq, max_blocks=blocks) for name in corpora}


def score(model, val: dict[str, torch.Tensor], *, digits: int = 3) -> dict:
    """Perplexity on each held-out corpus and on all of them together (token-weighted)."""
    out, nll, tokens = {}, 0.0, 0
    for name, blocks in val.items():
        r = perplexity(model, blocks, batch_size=8, progress=False)
        out[name] = round(r.ppl, digits)
        nll, tokens = nll + r.nll * r.tokens, tokens + r.tokens
    if len(val) > 1:
        out["both"] = round(math.exp(nll / tokens), digits)
    return out


def child(script: str, *args: str, python: str = sys.executable) -> dict:
    """Run `script --child ARGS OUT_JSON` in a fresh process (so its memory is its own) and return the
    JSON it wrote, or {"error": its last line of stderr}."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run([python, script, "--child", *args, out], capture_output=True, text=True)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def child_done(out_json: str, result: dict) -> None:
    """The child's side: its result and the process's peak resident memory so far, in MB."""
    Path(out_json).write_text(json.dumps({**result, "peak_rss_mb": result.get("peak_rss_mb", peak_rss_mb())}))


def provenance() -> dict:
    """How a result was made: the command, the commit (and whether the tree had changes), the machine."""

    def git(*args):
        proc = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": " ".join(["python", *sys.argv]),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "machine": processor_name(),
        "threads": torch.get_num_threads(),
    }


def save(name: str, results: dict, *, indent: int = 2) -> Path:
    """benchmarks/results/<name>.json: the results and, under "run", how they were made."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**results, "run": provenance()}, indent=indent) + "\n")
    return path


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def figure(cols: int = 1, size: tuple[float, float] = (7, 4), **subplots):
    """(fig, axes): a figure of `cols` panels side by side; fig.savefig(path) writes it."""
    fig = Figure(figsize=size)
    axes = fig.subplots(1, cols, **subplots)
    return fig, axes
