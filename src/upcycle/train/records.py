"""What a run writes besides checkpoints: metrics.jsonl, loss_curve.png and report.md."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in the user's process

from upcycle.report import RunFolder, markdown_table


class MetricsLog:
    """Append-only JSONL. On resume, records after the checkpoint's step are dropped, so the log of
    a resumed run reads exactly like the log of an uninterrupted one."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], out: Path, title: str) -> Path | None:
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    for before, after in zip(train, train[1:]):  # stage boundaries
        if before["stage"] != after["stage"]:
            ax.axvline(before["tokens"], color="grey", ls=":", lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def write_report(out: Path, config_yaml: str, summary: dict, stages: list[dict], plot: Path | None) -> Path:
    rows = [
        [s["name"], s["steps"], s["tokens"], s.get("train_loss"), s.get("val_loss"), s.get("val_ppl")] for s in stages
    ]
    folder = RunFolder(out, metrics=None)  # metrics.jsonl is the run's log, written as it goes
    folder.section("Summary", markdown_table(["", ""], [[k, v] for k, v in summary.items()]))
    folder.section(
        "Stages",
        markdown_table(["stage", "steps", "tokens", "final train loss", "val loss", "val ppl"], rows)
        + (f"\n\n![loss curve]({plot.name})" if plot is not None else ""),
    )
    folder.section("Configuration", "```yaml\n" + config_yaml + "```")
    return folder.write(f"Training run: {out.name}")
