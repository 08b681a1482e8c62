"""The measured tables in docs/, generated from the benchmarks' results JSON — never typed by hand.

    python docs/tables.py           # rewrite every marked block in docs/*.md from benchmarks/results/
    python docs/tables.py --check   # exit 1, naming each block that differs from its JSON

A block in a page is

    <!-- table: NAME -->
    ...generated...
    <!-- /table -->

and NAME is a key of TABLES: the results file and the function that renders it (most are the
benchmark's own `--table` rendering, so a benchmark and its page cannot drift apart).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from functools import cache
from pathlib import Path

from upcycle.pipelines.repair import cwe_table

ROOT = Path(__file__).resolve().parents[1]
DOCS, RESULTS, BENCHMARKS = ROOT / "docs", ROOT / "benchmarks" / "results", ROOT / "benchmarks"
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


@cache
def benchmark(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    if str(BENCHMARKS) not in sys.path:  # the scripts import their shared helpers (benchmarks/peers/) by name
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() or name != "claims" else {}  # claims: made part by part


def slim_peers(r: dict) -> str:
    """The slim benchmark's peers, side by side with upcycle's own cut of the same kind."""
    reap, mo = r["peers"]["llmcompressor_reap"], r["peers"]["modelopt"]
    rows = [
        "| peer (one shot; same model, calibration and held-out blocks) | upcycle | peer |",
        "|---|---|---|",
        f"| llm-compressor `REAPPruningModifier` on the Drop-Upcycled Mixtral, 8 → {reap['experts']} experts "
        f"(source ppl {reap['source_ppl']:,.1f}) | ppl {reap['upcycle_reap_prune_ppl']:,.1f} | ppl "
        f"{reap['one_shot_ppl']:,.1f} (its folder as saved: {reap['ppl_as_saved']:.3g}); {reap['seconds']:.1f} s the "
        f"whole process, {reap['peak_rss_mb']:,} MB peak; the same experts kept in "
        f"{100 * reap['kept_agreement']:.1f} % of the layer slots |",
    ]
    ours = mo["upcycle_ffn_1024"]
    cannot = [run for run in mo["runs"] if not run["ok"]]
    for run in mo["runs"]:
        if not run["ok"]:
            continue  # not a row: said under the table
        widths = run.get("ffn_widths") or []
        rows.append(
            f"| Model Optimizer `{run['mode']}`, parameters ≤ {100 * run['params_target']:.1f} % | FFN 1536 → 1024 by "
            f"activation: {ours['params'] / 1e6:.1f}M, ppl {ours['ppl']:.1f}, {ours['seconds']:.1f} s | "
            f"{run['params'] / 1e6:.1f}M"
            + (f" (widths {min(widths)}–{max(widths)} per layer)" if widths else "")
            + f", ppl {run['ppl']:,.0f}, {run['seconds']:.1f} s |"
        )
    for run in cannot:  # e.g. Minitron: Megatron-Core and Transformer Engine, which need an NVIDIA GPU
        rows += ["", f"Model Optimizer's `{run['mode']}` cannot run on a CPU: `{run['error']}`."]
    return "\n".join(rows)


def repair_table(r: dict) -> str:
    """The repair command's own table (pipelines.repair.cwe_table), and the sparse model's recall."""
    lines = [cwe_table(r)]
    recall = re.search(r"recall ([0-9.]+)", r.get("sparse_model", ""))
    if recall:
        lines += [
            "",
            f"The sparse model: {r['sparse_model'].split(' (recall')[0]}, predictor recall "
            f"{float(recall.group(1)):.3f}.",
        ]
    return "\n".join(lines)


def int4_grid(r: dict) -> str:
    """benchmarks/int4_grid.py: held-out perplexity of each int4 choice beside fp32."""
    rows = ["| smollm2-135m, dense | ppl shakespeare | ppl pystdlib |", "|---|---|---|"]
    rows += [f"| {name} | {ppl['shakespeare']:.2f} | {ppl['pystdlib']:.2f} |" for name, ppl in r["ppl"].items()]
    return "\n".join(rows + ["", f"({r['held_out_blocks']} held-out blocks of 256 tokens a corpus.)"])


TABLES = {
    "int4_grid": ("int4_grid", int4_grid),
    "grow": ("grow", lambda r: benchmark("grow").table(r)),
    "slim": ("slim", lambda r: benchmark("slim").tables(r)),
    "slim-peers": ("slim", slim_peers),
    "prune_seft": ("prune_seft", lambda r: benchmark("prune_seft").tables(r)),
    "cpu_decode": ("cpu_decode", lambda r: benchmark("cpu_decode").table(r)),
    "repair": ("repair", repair_table),
    "scale": ("scale", lambda r: benchmark("scale").table(r)),
    "export_check": ("export_check", lambda r: benchmark("export_check").table(r)),
    "claims": ("claims", lambda r: benchmark("reproduce").table(r)),
    "claims-legend": ("claims", lambda r: benchmark("reproduce").legend(r)),
    "grow-lineage": ("claims", lambda r: benchmark("reproduce").lineage_table(r)),
    "slim-experts": ("claims", lambda r: benchmark("reproduce").slim_experts_table(r)),
    **{
        f"claims.{paper}": ("claims", lambda r, paper=paper: benchmark("reproduce").table(r, paper))
        for paper in ("seft", "grow", "slim", "repair", "sparsify")
    },
}


def render(name: str) -> str:
    if name not in TABLES:
        raise SystemExit(f"docs/tables.py: no table {name!r}; known: {', '.join(TABLES)}")
    source, fn = TABLES[name]
    return fn(results(source)).strip() + "\n"


def blocks(page: Path):
    """(name, body as written, body as generated) for each marked block of a page."""
    return [(m["name"], m["body"], render(m["name"])) for m in BLOCK.finditer(page.read_text())]


def rewrite(page: Path) -> bool:
    text = page.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + render(m["name"]) + m.group(4), text)
    if new != text:
        page.write_text(new)
    return new != text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table differs from its JSON")
    args = parser.parse_args()
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        if args.check:
            stale += [f"{page.name}: {name}" for name, written, generated in blocks(page) if written != generated]
        elif rewrite(page):
            print(f"rewrote {page.relative_to(ROOT)}")
    for line in stale:
        print(f"stale table {line} (run python docs/tables.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
