"""lm-evaluation-harness on any model upcycle reads, offline, with a task pack of its own.

    results = harness(model, tokenizer, ["upcycle_shakespeare_next_line"], limit=100)
    results["upcycle_shakespeare_next_line"]["acc,none"]

The pack is built from text upcycle fetches without a hub (its corpora: the Shakespeare plays and
Python's standard library), written once into the cache as lm-eval YAML + JSONL, and handed to lm-eval's
TaskManager beside its own tasks, so a task a user has locally runs the same way (`--harness
my_task --harness-include my/tasks/`). The model goes to lm-eval as the loaded instance (lm-eval's HFLM
wraps it), so a bank-sparse model scores as it computes, predictor and all.

Each pack task is multiple choice: a few consecutive lines of a held-out document, and which of four
lines comes next — the true one, or three drawn from elsewhere in the same document (seeded). Chance is
0.25; documents come from the validation split, which no upcycle run trains or calibrates on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from upcycle import data
from upcycle.cache import building, cache_dir
from upcycle.errors import ConfigError

PACK_VERSION = 1
PACK = {  # task -> (corpus, lines of context)
    "upcycle_shakespeare_next_line": ("shakespeare", 3),
    "upcycle_python_next_line": ("pystdlib", 4),
}
EXAMPLES = 200
CHOICES = 4


def task_pack() -> Path:
    """The pack's folder (YAML + JSONL per task), built on first use from the corpora."""
    folder = cache_dir() / "harness" / f"pack-v{PACK_VERSION}"
    if not all((folder / f"{task}.yaml").exists() for task in PACK):
        with building(folder) as tmp:
            for task, (corpus, context) in PACK.items():
                examples = next_line_examples(corpus, context)
                (tmp / f"{task}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
                (tmp / f"{task}.yaml").write_text(_yaml(task, folder / f"{task}.jsonl", corpus))
    return folder


def next_line_examples(corpus: str, context: int, *, n: int = EXAMPLES, seed: int = 0) -> list[dict]:
    """`n` examples from the corpus's validation documents: `context` lines, four candidate next lines."""
    _, held = data.split_documents(data.documents(corpus))
    rng = random.Random(seed)
    lines_of = {}
    for doc in held:
        lines = [line.rstrip() for line in doc.text.splitlines()]
        lines = [line for line in lines if len(line.strip()) >= 12]  # lines that say something
        if len(lines) >= context + CHOICES + 1:
            lines_of[doc.name] = lines
    if not lines_of:
        raise ConfigError(f"{corpus}: no held-out document is long enough for a next-line task")
    examples, names = [], sorted(lines_of)
    while len(examples) < n:
        lines = lines_of[rng.choice(names)]
        start = rng.randrange(len(lines) - context)
        true = lines[start + context]
        others = [line for line in lines if line != true]
        distractors = rng.sample(others, CHOICES - 1)
        choices = distractors + [true]
        rng.shuffle(choices)
        examples.append({
            "context": "\n".join(lines[start : start + context]) + "\n",
            "choices": choices,
            "label": choices.index(true),
        })  # fmt: skip
    return examples


def _yaml(task: str, jsonl: Path, corpus: str) -> str:
    # written by hand, not yaml.dump: lm-eval's own key order and Jinja templates, easy to read and copy
    return f"""# upcycle's task pack (built from the {corpus} corpus's held-out documents): which line comes next
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(jsonl))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {PACK_VERSION}.0
"""


def harness(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
            include: list[str] | None = None) -> dict:  # fmt: skip
    """lm-eval's scores of the loaded model on `tasks` (the pack's, lm-eval's own, or a user's under
    `include`): {task: {metric: value}} and the configuration under "_config"."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"--harness needs lm-eval: pip install 'upcycle[harness]' ({e})") from e
    paths = [str(task_pack()), *(include or [])]
    manager = TaskManager(include_path=paths, include_defaults=False)  # the pack and the user's tasks alone
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths)  # lm-eval's own tasks too (indexing them takes seconds)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"no lm-eval task {', '.join(unknown)}: the pack has {', '.join(PACK)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    scores = {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}
    return scores | {"_config": {"limit": limit, "batch_size": batch_size, "lm_eval": lm_eval.__version__}}


def _device(model):
    return next(model.parameters()).device
