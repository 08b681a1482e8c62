"""continued training from a run config (see upcycle.train.TrainConfig)"""

from __future__ import annotations

import json
import os

from upcycle.commands import quiet_transformers
from upcycle.train import TrainConfig, Trainer


def run(config: TrainConfig, *, resume: bool = False) -> dict:
    """Train as the config says (`upcycle train --config RUN.yaml [--lr ...]`); with resume, continue
    from the last checkpoint in the run's out folder. Under torchrun, every process runs this."""
    quiet_transformers()
    summary = Trainer(config).fit(resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return summary
