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


def plot_per_layer(series: dict[str, list[float]], path: str | Path, *, ylabel: str, title: str,
                   layers: list[int] | None = None) -> Path:
    """One line per named series over layer index (e.g. predictor recall per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, values in series.items():
        ax.plot(layers if layers is not None else range(len(values)), values, marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
