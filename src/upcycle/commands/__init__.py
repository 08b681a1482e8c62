"""One module per verb. Each has `run(<sources>, config)`: what `upcycle <verb>` calls, and what a
Python user can call too. The CLI's options are generated from `run`'s signature and its config
dataclass (see upcycle.cli); a verb's data flows load -> calibrate -> transform -> verify -> train ->
evaluate -> save -> report, through the shared pieces (hub, ops, train, eval, report)."""

import contextlib
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging


def quiet_transformers() -> None:
    """No transformers progress bars or warnings in a command's output."""
    logging.disable_progress_bar()
    logging.set_verbosity_error()


@contextlib.contextmanager
def training_run(out: Path):
    """A fresh folder beside OUT for a pipeline's training run (checkpoints, metrics), removed on the way
    out whatever happens: beside OUT, so that keeping part of it is a copy on the same file system."""
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.run.", dir=parent))
    try:
        yield run_dir
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def keep_run(run_dir: Path, folder: Path, name: str) -> None:
    """The training run's metrics, report and curves into folder/name; its checkpoints and final copy
    are left out (the model is OUT itself)."""
    for heavy in ("checkpoints", "final"):
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    shutil.copytree(run_dir, folder / name)
