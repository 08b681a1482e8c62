"""find the layer behind a long-context failure of a bank-sparse model and retrain it alone

`upcycle repair`: measure, localise, repair one layer, measure again; write the report
(upcycle.pipelines.repair has the method).
"""

from __future__ import annotations

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import RunOptions
from upcycle.errors import ConfigError
from upcycle.eval.localise import plot_heatmap
from upcycle.pipelines import repair as pipeline
from upcycle.pipelines.repair import RepairConfig, report_markdown
from upcycle.report import RunFolder


def run(
    model: str,
    config: RepairConfig = RepairConfig(),
    *,
    reference: str,
    out: str | None = None,
    options: RunOptions = RunOptions(),
) -> dict:
    """Load the bank-sparse MODEL and its dense REFERENCE, localise, repair, measure; with OUT, write
    the repaired model, repair.json/.md and the heat map there."""
    quiet_transformers()
    if out is not None:
        hub.check_out(out, options.overwrite)
    sparse, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    if tokenizer is None:
        raise ConfigError(f"{model}: no tokenizer in the folder; CWE prompts need one")
    dense, _ = hub.load(reference, trust_remote_code=options.trust_remote_code)
    repaired, result = pipeline.run(sparse, tokenizer, config, reference=dense, progress=options.progress)
    print(report_markdown(result))
    if out is not None:
        write_folder(out, repaired, tokenizer, result)
        print(f"wrote {out}/model (layer {result['chosen_layer']} repaired), repair.json, repair.md, localisation.png")
    return result


def write_folder(out, repaired, tokenizer, result: dict) -> None:
    """OUT/model (the repaired model), repair.md, repair.json and localisation.png."""
    folder = RunFolder(out, report="repair.md", metrics="repair.json")
    hub.save(repaired, tokenizer, folder.path / "model")
    plot_heatmap(result["localisation"], folder.figure("localisation.png"))
    folder.section(None, report_markdown(result, title=False))
    folder.metrics.update(result)
    folder.write("upcycle repair")
