"""write a model as one GGUF file for llama.cpp and Ollama (f32, f16 or q8_0), checked on the way out"""

from __future__ import annotations

from pathlib import Path

from upcycle.commands import quiet_transformers
from upcycle.config import RunOptions
from upcycle.pipelines.export import ExportConfig, ExportReport, export


def run(
    model: str, out: str, config: ExportConfig = ExportConfig(), options: RunOptions = RunOptions()
) -> tuple[Path, ExportReport]:
    """Stream MODEL layer by layer into the GGUF file OUT (llama.cpp's names, layouts and metadata, the
    tokenizer and chat template carried), then read it back; where llama-cpp-python is installed, compare
    llama.cpp's logits on held-out text with MODEL's. A bank-sparse MODEL is written as its dense twin."""
    quiet_transformers()
    path, report = export(model, out, config, options)
    if report.densified:
        print("a bank-sparse model: written as its dense twin (every channel computed; llama.cpp has no predictor)")
    print(f"saved {path}: {report.line()}")
    return path, report
