"""Record extraction: a fine-tuning task with an exact-match score, generated procedurally and
deterministically. Each example is a short record of fields (name, city, job, order number, ...) and
a question for one field's value; the answer is that value, as written in the record.

    examples = extract_examples(200, seed=0)                 # the same 200 on every machine
    write_extract_data(folder, tokenizer, examples)           # train.jsonl for `upcycle train --data`
    score = exact_match(model, tokenizer, extract_examples(100, seed=1))

Prompts go through the tokenizer's chat template (SmolLM2-135M-Instruct answers a fair share of them
as they are; pruning loses most of that; fine-tuning brings it back). A greedy answer counts when its
first line, stripped of spaces, quotes and a trailing full stop, equals the value exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

FIRST = (
    "Alice Bruno Chen Dara Elif Farid Greta Hugo Ines Jonas Kira Liam Mara Nils Olga Pablo Quinn Rosa Sven Tara".split()
)
LAST = "Adams Berg Costa Diaz Evans Fischer Garcia Haas Ito Jensen Kowal Lopez Moreau Novak Ortiz Petrov Rossi Silva".split()
CITIES = (
    "Paris Lisbon Oslo Vienna Dublin Prague Madrid Athens Berlin Warsaw Zurich Lyon Porto Turin Ghent Bergen".split()
)
JOBS = "baker pilot nurse farmer lawyer painter teacher plumber chemist librarian architect tailor".split()
COLORS = "red blue green yellow purple orange black white silver brown".split()
FIELDS = ("name", "city", "job", "order number", "favorite color", "age")


@dataclass(frozen=True)
class Example:
    record: str
    field: str
    answer: str

    @property
    def question(self) -> str:
        return f"{self.record}\n\nWhat is the {self.field} in this record? Answer with the value only."


def extract_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(f"extract-{seed}")
    out = []
    for _ in range(n):
        values = {
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "city": rng.choice(CITIES),
            "job": rng.choice(JOBS),
            "order number": str(rng.randint(1000, 99999)),
            "favorite color": rng.choice(COLORS),
            "age": str(rng.randint(18, 90)),
        }
        fields = rng.sample(FIELDS, 4)  # four of the six, in a random order
        record = "\n".join(f"{f.capitalize()}: {values[f]}" for f in fields)
        field = rng.choice(fields)
        out.append(Example(record, field, values[field]))
    return out


def prompt(tokenizer, example: Example) -> str:
    """The question through the chat template, and the start of the answer ("The city is"): a small
    instruct model answers in a sentence whatever it is told, and the sentence's start is fixed here so
    that what it generates is the value."""
    return (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": example.question}], tokenize=False, add_generation_prompt=True
        )
        + f"The {example.field} is"
    )


def training_text(tokenizer, example: Example) -> str:
    """The whole exchange, question and answer, as the chat template writes it."""
    return tokenizer.apply_chat_template(
        [
            {"role": "user", "content": example.question},
            {"role": "assistant", "content": f"The {example.field} is {example.answer}."},
        ],
        tokenize=False,
    )


def write_extract_data(folder: str | Path, tokenizer, examples: list[Example]) -> Path:
    """A folder with train.jsonl ({"text": exchange} per line), one document per example."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": training_text(tokenizer, e)}) for e in examples]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def normalise(answer: str) -> str:
    return answer.strip().split("\n")[0].strip().rstrip(".").strip("\"'`").rstrip(".").strip()


@torch.no_grad()
def answers(
    model, tokenizer, examples: list[Example], *, max_new_tokens: int = 10, batch_size: int = 16, progress: bool = False
) -> list[str]:
    """The model's greedy continuation of each prompt, decoded; prompts batched with left padding (each
    row's answer is what it would be alone, up to float error)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_text = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="exact match", disable=not progress, leave=False):
            batch = examples[start : start + batch_size]
            enc = tokenizer([prompt(tokenizer, e) for e in batch], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            out_text += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, enc.input_ids.shape[1] :]]
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return out_text


def exact_match(model, tokenizer, examples: list[Example], **options) -> float:
    """Share of examples whose greedy answer is exactly the value (see `normalise`)."""
    said = answers(model, tokenizer, examples, **options)
    return sum(normalise(a) == e.answer for a, e in zip(said, examples)) / len(examples)
