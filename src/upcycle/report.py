"""Markdown tables and the run folder's report.md."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in the user's process


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def markdown_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
    )


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class RunFolder:
    """The folder a verb reports into: a markdown report (sections in order), a JSON of its metrics,
    and plots beside them. Every verb writes through this, each file in one rename (never half-written).

        folder = RunFolder(out, report="repair.md", metrics="repair.json")
        folder.section("Result", table); folder.metrics.update(result); folder.write("upcycle repair")
    """

    def __init__(self, path: str | Path, *, report: str = "report.md", metrics: str | None = "metrics.json"):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.report_name, self.metrics_name = report, metrics
        self.sections: list[str] = []
        self.metrics: dict = {}

    def section(self, title: str | None, body: str) -> None:
        """A titled section (## title), or a paragraph under the report's title when title is None."""
        self.sections.append((f"## {title}\n\n" if title else "") + body.strip() + "\n")

    def figure(self, name: str) -> Path:
        """Where a plot named `name` goes (plot functions write it there)."""
        return self.path / name

    def write(self, title: str) -> Path:
        report = self.path / self.report_name
        write_atomic(report, f"# {title}\n\n" + "\n".join(self.sections))
        if self.metrics_name:
            write_atomic(self.path / self.metrics_name, json.dumps(self.metrics, indent=2) + "\n")
        return report


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot_per_layer(
    series: dict[str, list[float]], path: str | Path, *, ylabel: str, title: str, layers: list[int] | None = None
) -> Path:
    """One line per named series over layer index (e.g. predictor recall per layer)."""
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for name, values in series.items():
        ax.plot(layers if layers is not None else range(len(values)), values, marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
