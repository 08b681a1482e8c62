"""`upcycle repair`: measure, localise, repair one layer, measure again; write the report.

Before and after, for the sparse model (and the dense reference once): the CWE score per context
length, the long-context probe (KL to the reference and loss per position bucket) and short-context
perplexity (which must not regress). The chosen layer is the localisation's first (`layer="auto"`) or
the one given; with `control=True` a randomly drawn other layer is repaired the same way on its own
copy, so the ranking is checked by what repairing it achieves.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from upcycle import data
from upcycle.eval import perplexity
from upcycle.eval.cwe import CWEConfig, cwe_eval, logprobs, long_context_probe, position_buckets
from upcycle.repair import localise, plot_heatmap, random_other_layer, repair_layer

DEFAULT_CWE = CWEConfig()  # the most common word, 15 % of the entries, the rest once; chat template


@dataclass
class RepairOptions:
    layer: str | int = "auto"
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096)
    samples: int = 4  # CWE prompts per length
    probe_source: str = "shakespeare"
    probe_tokens: int = 2048
    train_source: str = "shakespeare+pystdlib"
    seq_len: int = 1024  # length of the sequences the repaired layer's rows come from
    train_blocks: int = 16  # that many sequences (the end-to-end objective cycles through them)
    steps: int = 300
    lr: float = 1e-3
    train_ffn: bool = True
    objective: str = "local"  # or "end_to_end" (see upcycle.repair.repair_layer)
    control: bool = True
    cwe: CWEConfig = field(default_factory=lambda: DEFAULT_CWE)
    seed: int = 0
    progress: bool = True


def _measure(model, tokenizer, reference_logprobs, probe_ids, short_blocks, options: RepairOptions, name: str) -> dict:
    buckets = position_buckets(probe_ids.shape[1])
    with tqdm(total=len(options.lengths) * options.samples, desc=f"CWE {name}", disable=not options.progress) as bar:
        cwe = cwe_eval(model, tokenizer, list(options.lengths), options.samples, options.cwe, progress=bar)
    probe = long_context_probe(model, reference_logprobs, probe_ids, buckets)
    short = perplexity(model, short_blocks, batch_size=4, progress=False).ppl
    return {"cwe": cwe["score"], "chance": cwe["chance"], "chance_uniform": cwe["chance_uniform"], "probe": probe,
            "short_ppl": short}


def run_repair(model, tokenizer, reference, out: str | Path | None = None, options: RepairOptions | None = None) -> dict:
    options = options or RepairOptions()
    probe_ids = data.blocks(options.probe_source, tokenizer, "validation", options.probe_tokens, max_blocks=1)
    short_blocks = data.blocks("shakespeare+pystdlib", tokenizer, "validation", 256, max_blocks=16)
    train_blocks = data.blocks(options.train_source, tokenizer, "train", options.seq_len, max_blocks=options.train_blocks)
    ref_logprobs = logprobs(reference, probe_ids)

    result = {"options": {**asdict(options), "cwe": options.cwe.to_dict()}, "lengths": list(options.lengths)}
    measured = {"dense": _measure(reference, tokenizer, ref_logprobs, probe_ids, short_blocks, options, "dense"),
                "sparse": _measure(model, tokenizer, ref_logprobs, probe_ids, short_blocks, options, "sparse")}
    loc = localise(model, ref_logprobs, probe_ids, progress=options.progress)
    chosen = loc["ranking"][0] if options.layer == "auto" else int(options.layer)
    targets = {"repaired_top": chosen}
    if options.control:
        targets["repaired_random"] = random_other_layer(loc, options.seed)
    repaired = {}
    for name, layer in targets.items():
        candidate = copy.deepcopy(model)
        losses = repair_layer(candidate, reference, layer, train_blocks, steps=options.steps, lr=options.lr,
                              train_ffn=options.train_ffn, objective=options.objective, seed=options.seed,
                              progress=options.progress)
        measured[name] = {**_measure(candidate, tokenizer, ref_logprobs, probe_ids, short_blocks, options, name),
                          "layer": layer, "losses": losses}
        repaired[name] = candidate
    result.update({
        "cwe": {name: m["cwe"] for name, m in measured.items()},
        "chance": measured["dense"]["chance"], "chance_uniform": measured["dense"]["chance_uniform"],
        "layer_ranking": loc["ranking"], "chosen_layer": chosen,
        "random_layer": targets.get("repaired_random"),
        "localisation": loc, "measured": measured,
        "gap_closed": _gap_closed(measured),
    })
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        repaired["repaired_top"].save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        plot_heatmap(loc, out / "localisation.png")
        (out / "repair.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "repair.md").write_text(report_markdown(result) + "\n")
    return result


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
            shares[name] = {"kl_long": (base_kl - m["probe"]["kl"][-1]) / base_kl if base_kl > 0 else 0.0,
                            "cwe": (sum(m["cwe"]) - sparse_cwe) / cwe_gap if cwe_gap > 0 else None}
    return shares


def report_markdown(result: dict) -> str:
    m = result["measured"]
    names = [n for n in ("dense", "sparse", "repaired_top", "repaired_random") if n in m]
    header = "| model | " + " | ".join(f"CWE @{n}" for n in result["lengths"]) + " | KL last bucket | short ppl |"
    lines = ["# upcycle repair", "", f"Localisation ranking (first = most of the long-context KL gap closed by "
             f"restoring it): {result['layer_ranking'][:8]}; repaired layer {result['chosen_layer']}"
             + (f", control layer {result['random_layer']}" if result.get("random_layer") is not None else ""), "",
             header, "|---" * (len(result["lengths"]) + 3) + "|"]
    for n in names:
        label = n + (f" (layer {m[n]['layer']})" if "layer" in m[n] else "")
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in m[n]["cwe"])
                     + f" | {m[n]['probe']['kl'][-1]:.3f} | {m[n]['short_ppl']:.2f} |")
    lines.append("| chance: random entries | " + " | ".join(f"{v:.2f}" for v in result["chance"]) + " | | |")
    lines.append("| chance: random distinct words | " + " | ".join(f"{v:.3f}" for v in result["chance_uniform"]) + " | | |")
    return "\n".join(lines)
