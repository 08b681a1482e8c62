"""The record-extraction task: deterministic examples whose answer is in the record, scoring against a
stub that answers a known share correctly, and batched generation equal to one prompt at a time."""

import re

import torch

from upcycle import hub
from upcycle.eval.extract import answers, exact_match, extract_examples, normalise, training_text

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _tokenizer():
    tokenizer = hub.byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_examples_are_deterministic_and_answerable_from_the_record():
    a, b, c = extract_examples(50, seed=0), extract_examples(50, seed=0), extract_examples(50, seed=1)
    assert a == b and a != c
    for e in a:
        assert f"{e.field.capitalize()}: {e.answer}\n" in e.record + "\n" and len(e.record.splitlines()) == 4
    assert len({e.field for e in a}) == 6
    text = training_text(_tokenizer(), a[0])
    assert text.endswith(f"The {a[0].field} is {a[0].answer}.\n") and a[0].record in text


class _Oracle:
    """Answers every prompt by reading its record — correctly where `right(i)` says, else wrongly."""

    training = False

    def __init__(self, tokenizer, right):
        self.tokenizer, self.right, self.seen = tokenizer, right, 0

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(ids[mask.bool()])
            field = re.search(r"What is the (.+?) in this record", text).group(1)
            value = re.search(rf"{field.capitalize()}: (.+)", text).group(1)
            said = f" {value}." if self.right(self.seen) else f" not {value}"
            self.seen += 1
            rows.append(torch.cat([ids, torch.tensor(self.tokenizer(said).input_ids)]))
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=256) for r in rows])


def test_exact_match_counts_the_right_answers_whatever_the_batch():
    tokenizer, examples = _tokenizer(), extract_examples(20, seed=3)
    for batch_size in (1, 6):
        assert exact_match(_Oracle(tokenizer, lambda i: i % 4 == 0), tokenizer, examples, batch_size=batch_size) == 0.25
    assert normalise(' "Oslo".\nmore') == "Oslo" and normalise("Oslo, Norway") != "Oslo"


def test_batched_generation_gives_each_prompts_own_answer():
    tokenizer, model = _tokenizer(), hub.tiny("llama", vocab=264)
    examples = extract_examples(5, seed=4)
    alone = [answers(model, tokenizer, [e], max_new_tokens=4)[0] for e in examples]
    assert answers(model, tokenizer, examples, max_new_tokens=4, batch_size=5) == alone
