"""family, sizes, parameter counts and a per-layer FFN/MoE table"""

from __future__ import annotations

import json
from dataclasses import dataclass

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import Config, RunOptions, option
from upcycle.summary import ModelSummary, format_summary, summarize


@dataclass
class InspectConfig(Config):
    json: bool = option(False, "print the summary as JSON")


def run(model: str, config: InspectConfig = InspectConfig(), options: RunOptions = RunOptions()) -> ModelSummary:
    """Load MODEL (a built-in name, HF folder, .gguf file or hub id) and print its summary."""
    quiet_transformers()
    loaded, _ = hub.load(model, trust_remote_code=options.trust_remote_code)
    summary = summarize(loaded)
    print(json.dumps(summary.as_dict(), indent=2) if config.json else format_summary(summary))
    return summary
