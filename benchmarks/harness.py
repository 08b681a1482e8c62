"""What every benchmark shares: held-out text and its scoring, a child process per measurement (its
peak memory read one way), results JSON that records the command, commit and machine that made it,
and figures.

    val = held_out(tokenizer)                        # {corpus: validation blocks}
    ppl = score(model, val)                          # {corpus: ppl, "both": token-weighted ppl}
    row = child(__file__, "wanda", "50")             # this script's --child run, in its own process
    save("prune_seft", results)                      # benchmarks/results/prune_seft.json + "run": provenance
    fig, ax = figure()                               # matplotlib's Figure API: no pyplot state
    out = command(python, driver, folder, "--sparsity", 0.5)  # stdout, or {"error": its last stderr line}
    report = reused(folder, settings, "slim_report.json")     # a finished run made with the same settings
    seed_margin(seeds_a, seeds_b)                    # "ahead in 2 of 2 seeds (per seed +0.12, +0.30)"
    paired(seeds_a, seeds_b)                         # {"verdict", "diffs", "mean", "spread", "agree"}
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
from upcycle.train import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
# BENCH_RESULTS=folder: a check run writes there, leaving the committed results as they are
RESULTS = Path(os.environ.get("BENCH_RESULTS", HERE / "results"))


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


def command(*args, **kwargs) -> str | dict:
    """Run a command (arguments made strings); its stdout, or {"error": the last line of its stderr}."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if proc.returncode:
        tail = (proc.stderr or "").strip().splitlines()[-1:]
        return {"error": tail[0] if tail else f"exit code {proc.returncode}, no output"}
    return proc.stdout


# runs a command and prints its exit code, wall seconds and peak resident memory (the kernel's account of
# the finished child: the whole process, imports included), then exits with the command's code
_MEASURE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(r.stdout[-4000:]); print(r.returncode, time.perf_counter() - t, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.stderr.write(r.stderr[-2000:]); sys.exit(r.returncode)"
)


def measured(*args) -> dict:
    """Run a command in a process of its own: {"seconds", "peak_rss_mb", "stdout"} or {"error": ...}."""
    out = command(sys.executable, "-c", _MEASURE, *args)
    if isinstance(out, dict):
        return out
    *text, last = out.rstrip("\n").splitlines()
    _, seconds, peak_kb = last.split()
    return {"seconds": float(seconds), "peak_rss_mb": int(peak_kb) / 1024, "stdout": "\n".join(text)}


def upcycle(*args) -> str | dict:
    """`upcycle ARGS --no-progress --overwrite` in a fresh process: its stdout, or {"error": ...}."""
    return command(sys.executable, "-m", "upcycle.cli", *args, "--no-progress", "--overwrite")


# A committed record of finished runs' reports (set by a script whose parts outlast one machine, e.g.
# reproduce.py): runs/ is not committed, so without it a fresh checkout would run every finished run again.
LEDGER: Path | None = None


def _ledger() -> dict:
    return json.loads(LEDGER.read_text()) if LEDGER is not None and LEDGER.exists() else {}


def _ledger_key(folder: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(folder), HERE.parent)).as_posix()  # a symlinked runs/ too


def reused(folder: Path, settings: dict, report: str) -> dict | None:
    """The report of a finished run in `folder` made with the same settings (written by `mark`), else None.
    A run the ledger holds (same settings, same report) is restored into `folder` first: report, no weights."""
    marker = folder / "bench_settings.json"
    if marker.exists() and json.loads(marker.read_text()) == settings and (folder / report).exists():
        return json.loads((folder / report).read_text())
    entry = _ledger().get(_ledger_key(folder))
    if entry is not None and entry["settings"] == settings and entry["report"] == report:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / report).write_text(json.dumps(entry["result"], indent=2))
        mark(folder, settings)
        return entry["result"]
    return None


def mark(folder: Path, settings: dict, report: str | None = None) -> None:
    """Record the settings a run in `folder` is made with (what `reused` compares); with `report`, the run
    is finished and its report goes into the ledger too (where one is kept)."""
    (folder / "bench_settings.json").write_text(json.dumps(settings))
    if report is not None and LEDGER is not None:
        ledger = _ledger()
        result = json.loads((folder / report).read_text())
        ledger[_ledger_key(folder)] = {"settings": settings, "report": report, "result": result}
        LEDGER.parent.mkdir(parents=True, exist_ok=True)
        LEDGER.write_text(json.dumps(dict(sorted(ledger.items())), indent=1) + "\n")


def seed_margin(a: list[float], b: list[float], *, higher_better: bool = True, digits: int = 3) -> str:
    """How `a` compares with `b` — figures, not a verdict (verdicts are claims.json's, made by `paired` at the
    budgets benchmarks/reproduce.py runs). Seed by seed where both have the same seeds (the same data order in
    both arms); otherwise the margin of the means against the larger seed spread."""
    sign = 1 if higher_better else -1
    if len(a) == len(b) > 1:
        diffs = [sign * (x - y) for x, y in zip(a, b)]
        ahead = sum(d > 0 for d in diffs)
        word = "equal in every seed" if all(d == 0 for d in diffs) else f"ahead in {ahead} of {len(diffs)} seeds"
        return f"{word} (per seed {', '.join(f'{d:+.{digits}f}' for d in diffs)})"
    margin = sign * (sum(a) / len(a) - sum(b) / len(b))
    spread = max(max(a) - min(a), max(b) - min(b))
    word = "ahead" if margin > spread else ("behind" if margin < -spread else "within the seed spread")
    return f"{word} (margin {margin:+.{digits}f}, seed spread {spread:.{digits}f})"


VERDICTS = {  # paired's words and what each means (docs/claims.md's legend is generated from this)
    "reproduced": "every seed favours the claim, by a mean above twice the spread",
    "narrowly": "every seed favours it, by less",
    "mixed": "the seeds disagree",
    "not reproduced": "no seed favours it",
    "tied": "every paired difference is zero",
}


def paired(a: list[float], b: list[float], *, higher_better: bool = True) -> dict:
    """Is `a` better than `b`, judged seed by seed (the same seed: the same data order and evaluation draw in
    both arms)? The paired differences (signed so that > 0 favours `a`), their mean and spread (sample
    standard deviation), how many seeds agree, and the verdict: "reproduced" when every seed favours `a` by
    a mean above two spreads, "narrowly" when every seed favours it by less, "mixed" when the seeds
    disagree, "not reproduced" when none favours it."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired seeds: {len(a)} against {len(b)}")
    sign = 1 if higher_better else -1
    diffs = [sign * (x - y) for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    spread = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else 0.0
    favour = sum(d > 0 for d in diffs)
    if favour == len(diffs):
        word = "reproduced" if mean > 2 * spread else "narrowly"
    elif favour == 0:
        word = "tied" if all(d == 0 for d in diffs) else "not reproduced"
    else:
        word = "mixed"
    return {"verdict": word, "diffs": diffs, "mean": mean, "spread": spread, "agree": f"{favour}/{len(diffs)}"}


def train(model, tokenizer, out: Path, tokens: int, *, source: str, text: str, losses=None, **overrides):
    """The benchmarks' recovery recipe (seq 256, batch 8, AdamW 3e-4 cosine, 2 warm-up steps) through
    upcycle's Trainer, which trains `model` in place; `overrides` are TrainConfig fields."""
    recipe = dict(seq_len=256, global_batch=8, micro_batch=4, lr=3e-4, warmup_steps=2, ckpt_every=10_000)
    config = TrainConfig.from_dict(
        dict(
            recipe,
            model=source,
            data=text,
            out=str(out),
            losses=losses or [{"name": "lm"}],
            stages=[{"name": "main", "tokens": tokens}],
            progress=False,
            **overrides,
        )
    )
    return Trainer(config, model=model, tokenizer=tokenizer).fit()


def curves(ax, series: dict[str, list], *, log: bool = False, **plot) -> None:
    """One line per named series of (x, y) points."""
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=3, label=name, **plot)
    if log:
        ax.set_yscale("log")


def bars(ax, groups: dict[str, list[float]], ticks: list[str]) -> list[list[float]]:
    """Grouped bars: one colour per named group, one cluster per tick. Returns each group's x positions."""
    width = 0.8 / len(groups)
    positions = []
    for n, (label, values) in enumerate(groups.items()):
        xs = [i + (n - len(groups) / 2 + 0.5) * width for i in range(len(ticks))]
        ax.bar(xs, values, width, label=label, color=f"C{n}")
        positions.append(xs)
    ax.set_xticks(range(len(ticks)), ticks)
    return positions


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
