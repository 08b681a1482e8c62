"""Markdown tables and the run folder's report.md."""

from __future__ import annotations

import json
from pathlib import Path


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def markdown_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class RunFolder:
    """runs/<name>/: report.md (sections appended in order), metrics.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.sections: list[str] = []
        self.metrics: dict = {}

    def section(self, title: str, body: str) -> None:
        self.sections.append(f"## {title}\n\n{body.strip()}\n")

    def write(self, title: str) -> Path:
        report = self.path / "report.md"
        tmp = report.with_suffix(".md.tmp")
        tmp.write_text(f"# {title}\n\n" + "\n".join(self.sections))
        tmp.replace(report)
        (self.path / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
        return report
