"""Common-words extraction (CWE), after RULER, and a long-context probe that needs no generation.

CWE: a long numbered list of words in which `n_common` words occur many times (`common_share` of
the entries between them) and the rest rarely (each at most `rare_repeats` times); the model is
asked for the most common ones; the score is the recall of the true common words among the first
`n_common` list words its greedy answer names (so listing many words earns nothing: the answer is
judged on the same terms as a guesser). The list grows with the context length, so longer contexts
hold more entries to count over. Deterministic in (tokenizer, length, seed, config).

The prompt goes through the tokenizer's chat template where it has one (instruction-tuned models,
SmolLM2-135M among them: without it the model tends to copy the worked example), else a plain
prompt after one short worked example. The RULER defaults (10 common words x 30, the rest x 3) are
far beyond a 135M model; the defaults here (the single most common word, holding 15 % of the
entries, every other word once) put SmolLM2-135M well above chance — see
benchmarks/results/repair.json. `chance` is what naming `n_common` entries drawn at random from the
list scores (a frequency-aware guesser: it finds a common word as often as it occurs),
`chance_uniform` that of naming `n_common` of the list's distinct words at random.

The probe: KL(reference || model) and the model's loss per position bucket on long held-out text.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from upcycle.eval.equivalence import kl_divergence

WORDS = """
apple anchor arrow badge basket beacon bottle bridge bucket button cabin camera candle canyon carpet
castle cellar chain chair cherry circle clock cloud comet copper cotton crown crystal curtain desert
diamond dragon drum eagle engine falcon feather fence field finger flame forest fountain garden
garlic glass glove goat grape guitar hammer harbor helmet honey horse island jacket jungle kettle
ladder lantern lemon letter lizard magnet maple marble meadow mirror monkey mountain needle nest
ocean olive onion orange oyster paddle palace panda paper parrot pearl pencil pepper piano pillow
pirate planet pocket potato pumpkin puzzle rabbit radio raven ribbon river rocket saddle sailor
salmon shadow shovel silver spider spoon statue stone sugar summer sunset sword table teapot temple
thunder tiger timber tomato tower tractor train trumpet tunnel turtle valley velvet violin wagon
walnut window winter wizard wolf zebra acorn almond bamboo banner barrel beetle blanket bonnet
breeze brick bubble cactus canvas carrot cedar cheese chimney cinnamon cobalt coral cricket dolphin
donkey ember fabric ferry fiddle flute fossil gecko ginger goblet granite gravel hazel heron igloo
jasmine jigsaw kayak kiwi koala lagoon lava lobster locket mango meteor mitten moose mustard nectar
nickel noodle nutmeg orchid otter owl pagoda parsley peach pebble pelican pigeon plum poppy prism
quartz quilt raisin reef saffron sapphire scarf seashell sparrow squirrel stapler tulip umbrella
vanilla vase walrus whistle willow yacht
""".split()

EXAMPLE = (
    "Below is a numbered list of words. Some words appear more often than others.\n"
    "1. stone\n2. river\n3. stone\n4. lemon\n5. cloud\n6. river\n7. stone\n8. tiger\n9. river\n10. stone\n"
    "Question: What are the 2 most common words in the above list?\n"
    "Answer: The 2 most common words in the list are: stone, river\n\n"
)


@dataclass(frozen=True)
class CWEConfig:
    n_common: int = 1
    common_share: float = 0.15  # fraction of the list's entries that are common words (split evenly)
    rare_repeats: int = 1  # each other word occurs 1..rare_repeats times
    answer_tokens: int = 24  # greedy tokens generated for the answer
    chat: bool | None = None  # the tokenizer's chat template: None = where it has one
    common_repeats: int | None = None  # each common word exactly this often (RULER), instead of common_share
    rare_exact: bool = False  # each other word exactly rare_repeats times (RULER), not 1..rare_repeats

    def to_dict(self) -> dict:
        return asdict(self)


# RULER's CWE (Hsieh et al. 2024, its synthetic.yaml): 10 common words 30 times each, every other word 3
# times, the list as long as the context allows; the answer names the 10 (string_match_all: the share of
# them it names). Far beyond a 135M model at RULER's own lengths (4k and up), which is what it measures.
RULER = CWEConfig(n_common=10, common_repeats=30, rare_repeats=3, rare_exact=True, answer_tokens=120)


@dataclass
class CWESample:
    prompt: str
    common: list[str]
    entries: list[str]
    length: int  # prompt tokens

    def score(self, answer: str) -> float:
        return cwe_score(answer, self.common, set(self.entries))


def cwe_score(answer: str, common: list[str], candidates: set[str]) -> float:
    """Recall of the true common words among the first len(common) distinct candidate words (the
    list's words) the answer names: whole words, case-insensitive; other words are skipped."""
    named: list[str] = []
    for word in re.findall(r"[a-z]+", answer.lower()):
        if word in candidates and word not in named:
            named.append(word)
    named = named[: len(common)]
    return sum(word in named for word in common) / len(common)


def _question(n_common: int) -> str:
    return (
        "What is the most common word in the above list?"
        if n_common == 1
        else f"What are the {n_common} most common words in the above list?"
    )


def _prompt(entries: list[str], n_common: int, tokenizer, chat: bool) -> str:
    listing = "Below is a numbered list of words. Some words appear more often than others.\n" + "".join(
        f"{i}. {w}\n" for i, w in enumerate(entries, 1)
    )
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": listing + _question(n_common)}], tokenize=False, add_generation_prompt=True
        )
    words = "word in the list is" if n_common == 1 else f"{n_common} most common words in the list are"
    return (
        EXAMPLE
        + listing
        + f"Question: {_question(n_common)}\n"
        + f"Answer: The {'most common ' if n_common == 1 else ''}{words}:"
    )


def uses_chat(tokenizer, config: CWEConfig) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if config.chat is None else config.chat


def _entries(count: int, rng: random.Random, config: CWEConfig) -> tuple[list[str], list[str]]:
    pool = [w for w in WORDS if w not in ("stone", "river", "lemon", "cloud", "tiger")]  # not the example's
    rng.shuffle(pool)
    common, rare_pool = pool[: config.n_common], pool[config.n_common :]
    per_common = config.common_repeats or max(2, round(count * config.common_share / config.n_common))
    entries = [w for w in common for _ in range(per_common)]
    if config.rare_exact and (count - len(entries)) > config.rare_repeats * len(rare_pool):
        raise ValueError(
            f"a list of {count} entries needs more than the {len(rare_pool)} other words CWE draws from "
            f"({config.rare_repeats} times each): a shorter length"
        )
    i = 0
    while len(entries) < count:
        word = rare_pool[i % len(rare_pool)]
        times = config.rare_repeats if config.rare_exact else rng.randint(1, config.rare_repeats)
        if config.rare_exact and count - len(entries) < times:
            break  # exact counts: a list a few entries short rather than a word counted wrong
        entries += [word] * min(times, per_common - 1, count - len(entries))
        i += 1
    rng.shuffle(entries)
    return common, entries


def cwe_sample(tokenizer, length: int, seed: int, config: CWEConfig = CWEConfig()) -> CWESample:
    """A CWE prompt of about `length` tokens (at most), the list as long as fits."""
    rng = random.Random(f"{length}-{seed}")
    chat = uses_chat(tokenizer, config)
    # list entries: binary search on the prompt's token count (at RULER's counts, never fewer than the
    # common words' own entries: a length too short for them is refused below)
    lo = max(4, config.n_common * (config.common_repeats or 0))
    hi = max(8, length, lo)
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        draw = random.Random(rng.random())
        try:
            common, entries = _entries(mid, draw, config)
        except ValueError:  # more entries than the word pool can give at RULER's exact counts: shorter
            hi = mid - 1
            continue
        prompt = _prompt(entries, config.n_common, tokenizer, chat)
        n = len(tokenizer(prompt).input_ids)
        if n <= length:
            best, lo = (common, entries, prompt, n), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"length {length}: too short for a CWE prompt")
    common, entries, prompt, n = best
    return CWESample(prompt=prompt, common=common, entries=entries, length=n)


def chance(sample: CWESample, guesses: int = 2000, seed: int = 0) -> float:
    """The score of answering with n_common distinct entries drawn at random from the list."""
    rng = random.Random(seed)
    n, total = len(sample.common), 0.0
    for _ in range(guesses):
        picked: set[str] = set()
        while len(picked) < min(n, len(set(sample.entries))):
            picked.add(rng.choice(sample.entries))
        total += sum(w in picked for w in sample.common) / n
    return total / guesses


@torch.no_grad()
def cwe_answer(model, tokenizer, sample: CWESample, config: CWEConfig = CWEConfig()) -> str:
    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids,
        max_new_tokens=config.answer_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def cwe_eval(
    model, tokenizer, lengths: list[int], samples: int = 4, config: CWEConfig = CWEConfig(), progress=None
) -> dict:
    """Mean CWE score per length (over `samples` seeds), each prompt's score (`per_prompt`: for comparing
    two models prompt by prompt), and the random-guess chance level."""
    model.eval()
    scores, chances, uniform, per_prompt = [], [], [], []
    for length in lengths:
        values, chance_values, uniform_values = [], [], []
        for seed in range(samples):
            sample = cwe_sample(tokenizer, length, seed, config)
            values.append(sample.score(cwe_answer(model, tokenizer, sample, config)))
            chance_values.append(chance(sample))
            uniform_values.append(min(1.0, len(sample.common) / len(set(sample.entries))))
            if progress is not None:
                progress.update(1)
        scores.append(sum(values) / samples)
        per_prompt.append(values)
        chances.append(sum(chance_values) / samples)
        uniform.append(sum(uniform_values) / samples)
    return {
        "lengths": list(lengths),
        "score": scores,
        "per_prompt": per_prompt,
        "chance": chances,
        "chance_uniform": uniform,
    }


def position_buckets(length: int, first: int = 256) -> list[tuple[int, int]]:
    """[0, first), then doubling: [first, 2 first), [2 first, 4 first), ... up to length."""
    edges = [0, first]
    while edges[-1] < length:
        edges.append(min(edges[-1] * 2, length))
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


@torch.no_grad()
def long_context_probe(
    model, reference_logprobs: torch.Tensor, ids: torch.Tensor, buckets: list[tuple[int, int]]
) -> dict:
    """KL(reference || model) and the model's next-token loss, averaged per position bucket.
    reference_logprobs: [n, T, V] log-softmax of the reference on the same ids [n, T] (see `logprobs`)."""
    model.eval()
    kl_sum = torch.zeros(ids.shape[1] - 1)
    loss_sum = torch.zeros(ids.shape[1] - 1)
    for i in range(ids.shape[0]):
        logp = F.log_softmax(model(input_ids=ids[i : i + 1]).logits[0, :-1].float(), dim=-1)
        ref = reference_logprobs[i, :-1]
        kl_sum += kl_divergence(ref, logp)
        loss_sum += -logp.gather(-1, ids[i, 1:, None])[:, 0]
    kl, loss = kl_sum / ids.shape[0], loss_sum / ids.shape[0]
    return {
        "buckets": [list(b) for b in buckets],
        "kl": [kl[a : b - 1 if b == ids.shape[1] else b].mean().item() for a, b in buckets],
        "loss": [loss[a : b - 1 if b == ids.shape[1] else b].mean().item() for a, b in buckets],
    }


@torch.no_grad()
def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.stack(
        [F.log_softmax(model(input_ids=ids[i : i + 1]).logits[0].float(), dim=-1) for i in range(ids.shape[0])]
    )
