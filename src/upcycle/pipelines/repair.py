"""repair: find the layer behind a long-context failure of a bank-sparse model and retrain it alone.

    repaired, report = upcycle.repair(sparse, tokenizer, RepairConfig(), reference=dense)

Before and after, for the sparse model (and the dense reference once): the CWE score per context
length, the long-context probe (KL to the reference and loss per position bucket) and short-context
perplexity (which must not regress). The chosen layer is the localisation's first (`layer="auto"`) or
the one given; with `control=True` a randomly drawn other layer is repaired the same way on its own
copy, so the ranking is checked by what repairing it achieves.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from upcycle import data
from upcycle.config import Config, option
from upcycle.errors import ConfigError, check
from upcycle.eval import perplexity
from upcycle.eval.cwe import CWEConfig, cwe_eval, logprobs, long_context_probe, position_buckets
from upcycle.eval.localise import localise, random_other_layer, sparse_ffns
from upcycle.pipelines import Result, configured
from upcycle.train.repair import OBJECTIVES, repair_layer

__all__ = ["RepairConfig", "run", "report_markdown"]


@dataclass
class RepairConfig(Config):
    layer: str | int = option("auto", "auto (the localisation's first) or a layer index")
    lengths: tuple[int, ...] = option((512, 1024, 2048, 4096), "CWE context lengths in tokens")
    samples: int = option(4, "CWE prompts per length")
    probe_source: str = option("shakespeare", "text of the long-context probe")
    probe_tokens: int = option(2048, "length of the long-context probe")
    short_source: str = option("shakespeare+pystdlib", "text of the short-context perplexity (must not regress)")
    train_source: str = option("shakespeare+pystdlib", "text the repaired layer's rows come from")
    seq_len: int = option(1024, "length of the sequences the repaired layer's rows come from")
    train_blocks: int = option(16, "that many sequences (the end-to-end objective cycles through them)")
    steps: int = option(300, "repair training steps (2048 of the layer's rows each)")
    lr: float = option(1e-3, "predictor learning rate (the FFN's: a tenth of it)")
    train_ffn: bool = option(True, "retrain the layer's FFN too, not only its predictor")
    objective: str = option(
        "local",
        "local: layer-local KD of the reference's dense FFN; end_to_end: LM + KD on "
        "the logits through the whole model (slow on a CPU)",
        choices=OBJECTIVES,
    )
    control: bool = option(True, "also repair a random layer for comparison")
    cwe: CWEConfig = option(
        help="the CWE task (most common word, 15 % of the entries; chat template)", factory=CWEConfig
    )
    seed: int = option(0, "seed of the control layer and the row sampling")

    def validate(self):
        check(bool(self.lengths) and min(self.lengths) >= 64, "lengths", self.lengths, "token counts >= 64")
        check(
            self.layer == "auto" or (isinstance(self.layer, int) and self.layer >= 0),
            "layer",
            self.layer,
            "auto or a layer index",
        )
        for name in ("samples", "steps", "train_blocks", "probe_tokens"):
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        check(self.seq_len >= 16, "seq_len", self.seq_len, ">= 16")
        check(self.lr > 0, "lr", self.lr, "> 0")


def run(
    model, tokenizer, config: RepairConfig | None = None, *, reference, progress: bool = True, **overrides
) -> Result[dict]:
    """The model with its chosen layer repaired, and the measurements (a dict: `measured` per model,
    the localisation, the share of the gap closed). The input model is left unchanged."""
    options = configured(RepairConfig, config, overrides)
    layers = sparse_ffns(model)  # one-line error for a model with no bank-sparse layer
    if options.layer != "auto" and options.layer not in layers:
        raise ConfigError(f"--layer {options.layer}: not a bank-sparse layer (those are {sorted(layers)})")
    if tokenizer is None:
        raise ConfigError("repair: no tokenizer; CWE prompts need one")
    probe_ids = data.blocks(options.probe_source, tokenizer, "validation", options.probe_tokens, max_blocks=1)
    short_blocks = data.blocks(options.short_source, tokenizer, "validation", 256, max_blocks=16)
    train_blocks = data.blocks(
        options.train_source, tokenizer, "train", options.seq_len, max_blocks=options.train_blocks
    )
    ref_logprobs = logprobs(reference, probe_ids)

    def measure(candidate, name):
        return _measure(candidate, tokenizer, ref_logprobs, probe_ids, short_blocks, options, name, progress)

    result = {"options": {**asdict(options), "cwe": options.cwe.to_dict()}, "lengths": list(options.lengths)}
    measured = {"dense": measure(reference, "dense"), "sparse": measure(model, "sparse")}
    loc = localise(model, ref_logprobs, probe_ids, progress=progress)
    chosen = loc["ranking"][0] if options.layer == "auto" else int(options.layer)
    targets = {"repaired_top": chosen}
    if options.control:
        targets["repaired_random"] = random_other_layer(loc, options.seed)
    repaired = {}
    for name, layer in targets.items():
        candidate = copy.deepcopy(model)
        losses = repair_layer(
            candidate,
            reference,
            layer,
            train_blocks,
            steps=options.steps,
            lr=options.lr,
            train_ffn=options.train_ffn,
            objective=options.objective,
            seed=options.seed,
            progress=progress,
        )
        measured[name] = {**measure(candidate, name), "layer": layer, "losses": losses}
        repaired[name] = candidate
    result.update(
        {
            "cwe": {name: m["cwe"] for name, m in measured.items()},
            "chance": measured["dense"]["chance"],
            "chance_uniform": measured["dense"]["chance_uniform"],
            "layer_ranking": loc["ranking"],
            "chosen_layer": chosen,
            "random_layer": targets.get("repaired_random"),
            "localisation": loc,
            "measured": measured,
            "gap_closed": _gap_closed(measured),
        }
    )
    return Result(repaired["repaired_top"], result)


def _measure(
    model, tokenizer, reference_logprobs, probe_ids, short_blocks, options: RepairConfig, name: str, progress: bool
) -> dict:
    buckets = position_buckets(probe_ids.shape[1])
    with tqdm(total=len(options.lengths) * options.samples, desc=f"CWE {name}", disable=not progress) as bar:
        cwe = cwe_eval(model, tokenizer, list(options.lengths), options.samples, options.cwe, progress=bar)
    probe = long_context_probe(model, reference_logprobs, probe_ids, buckets)
    short = perplexity(model, short_blocks, batch_size=4, progress=False).ppl
    return {
        "cwe": cwe["score"],
        "cwe_per_prompt": cwe["per_prompt"],
        "chance": cwe["chance"],
        "chance_uniform": cwe["chance_uniform"],
        "probe": probe,
        "short_ppl": short,
    }


def _gap_closed(measured: dict) -> dict:
    """Per repaired model: the share of the sparse model's long-context KL (last probe bucket) and
    CWE gap (summed over lengths) that the repair closed."""
    base_kl = measured["sparse"]["probe"]["kl"][-1]
    dense_cwe, sparse_cwe = sum(measured["dense"]["cwe"]), sum(measured["sparse"]["cwe"])
    shares = {}
    for name in ("repaired_top", "repaired_random"):
        if name in measured:
            m = measured[name]
            cwe_gap = dense_cwe - sparse_cwe
            shares[name] = {
                "kl_long": (base_kl - m["probe"]["kl"][-1]) / base_kl if base_kl > 0 else 0.0,
                "cwe": (sum(m["cwe"]) - sparse_cwe) / cwe_gap if cwe_gap > 0 else None,
            }
    return shares


def cwe_table(result: dict) -> str:
    """CWE per length, the long-context KL (last probe bucket) and short-context perplexity of the dense,
    sparse and repaired models, and chance, as a markdown table."""
    m = result["measured"]
    names = [n for n in ("dense", "sparse", "repaired_top", "repaired_random") if n in m]
    lines = [
        "| model | " + " | ".join(f"CWE @{n}" for n in result["lengths"]) + " | KL last bucket | short ppl |",
        "|---" * (len(result["lengths"]) + 3) + "|",
    ]
    for n in names:
        label = n + (f" (layer {m[n]['layer']})" if "layer" in m[n] else "")
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v:.2f}" for v in m[n]["cwe"])
            + f" | {m[n]['probe']['kl'][-1]:.3f} | {m[n]['short_ppl']:.2f} |"
        )
    lines.append("| chance: random entries | " + " | ".join(f"{v:.2f}" for v in result["chance"]) + " | | |")
    lines.append(
        "| chance: random distinct words | " + " | ".join(f"{v:.3f}" for v in result["chance_uniform"]) + " | | |"
    )
    return "\n".join(lines)


def report_markdown(result: dict, title: bool = True) -> str:
    ranking = (
        f"Localisation ranking (first = most of the long-context KL gap closed by "
        f"restoring it): {result['layer_ranking'][:8]}; repaired layer {result['chosen_layer']}"
        + (f", control layer {result['random_layer']}" if result.get("random_layer") is not None else "")
    )
    return "\n".join((["# upcycle repair", ""] if title else []) + [ranking, "", cwe_table(result)])
