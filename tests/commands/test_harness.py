"""upcycle eval --harness: lm-evaluation-harness on any upcycle model, offline, with upcycle's task pack —
its accuracy checked against the same choice made by hand from the model's own log-likelihoods."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from upcycle import data, hub
from upcycle.eval.harness import CHOICES, PACK, harness, next_line_examples, task_pack

pytest.importorskip("lm_eval")
TASK = "upcycle_shakespeare_next_line"


def test_each_example_holds_the_true_next_line_among_four():
    examples = next_line_examples("shakespeare", 3, n=40)
    assert examples == next_line_examples("shakespeare", 3, n=40)  # seeded
    _, held = data.split_documents(data.documents("shakespeare"))
    texts = [doc.text for doc in held]
    for example in examples:
        choices = example["choices"]
        assert len(choices) == CHOICES == len(set(choices))
        # the context and the labelled line follow each other in a held-out play (lines too short were
        # skipped by the builder, so the text between them may hold such lines)
        first, last = example["context"].splitlines()[0], choices[example["label"]]
        assert any(first in text and last in text[text.index(first) :] for text in texts)
    labels = [e["label"] for e in next_line_examples("shakespeare", 3)]
    assert set(labels) == set(range(CHOICES))  # the answer is not always in one place
    pack = task_pack()
    assert all((pack / f"{task}.yaml").exists() and (pack / f"{task}.jsonl").exists() for task in PACK)


def _accuracy_by_hand(model, tokenizer, examples) -> float:
    """lm-eval's `acc`: the choice whose tokens the model gives the highest summed log-probability after
    the context. With the byte tokenizer, context + choice tokenizes as the two pieces joined."""
    right = 0
    for example in examples:
        context = tokenizer(example["context"], add_special_tokens=False).input_ids
        scores = []
        for choice in example["choices"]:
            continuation = tokenizer(choice, add_special_tokens=False).input_ids
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
            picked = logp[len(context) - 1 :].gather(1, ids[0, len(context) :, None])
            scores.append(picked.sum().item())
        right += int(max(range(len(scores)), key=scores.__getitem__) == example["label"])
    return right / len(examples)


def test_the_command_scores_as_the_models_own_likelihoods_say(tmp_path):
    tokenizer = hub.byte_tokenizer()
    hub.save(hub.tiny("llama", hidden=64, layers=2, ffn=128), tokenizer, tmp_path / "model")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "upcycle.cli", "eval", str(tmp_path / "model"), "--harness", TASK,
         "--harness-limit", "12", "--report", str(report), "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(report.read_text())["harness"][TASK]
    loaded, _ = hub.load(tmp_path / "model")
    assert scores["acc,none"] == pytest.approx(_accuracy_by_hand(loaded, tokenizer, _examples(12)))
    assert f"on {TASK}: acc " in proc.stdout


def test_a_bank_sparse_model_scores_as_it_computes():
    from upcycle import sparsify

    dense = hub.tiny("llama", hidden=64, layers=2, ffn=128)
    model, _ = sparsify(dense, None, bank=32, keep=8, rank=4, predictor="lowrank", warmup_steps=0, convert_steps=0)
    tokenizer = hub.byte_tokenizer()
    scores = harness(model, tokenizer, [TASK], limit=12)[TASK]
    assert scores["acc,none"] == pytest.approx(_accuracy_by_hand(model, tokenizer, _examples(12)))


def _examples(n: int) -> list[dict]:
    return [json.loads(line) for line in (task_pack() / f"{TASK}.jsonl").read_text().splitlines()[:n]]


def test_an_unknown_task_is_one_line():
    from upcycle.errors import ConfigError

    with pytest.raises(ConfigError, match="^no lm-eval task no_such_task: the pack has upcycle_shakespeare_next_line"):
        harness(hub.tiny("llama"), hub.byte_tokenizer(), ["no_such_task"], limit=1)
