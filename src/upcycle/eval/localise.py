"""Find the layer behind a long-context failure of a bank-sparse model, against its dense reference.

    loc = localise(sparse, ref_logprobs, ids)         # per layer: restore its dense FFN / keep only it sparse
    upcycle.train.repair.repair_layer(sparse, reference, loc["ranking"][0], blocks)   # then retrain it alone

Localisation needs no generation: the long-context probe (KL(reference || model) per position
bucket on long held-out text) is measured with all layers sparse, then with one layer restored to its
dense FFN (k = b computes every channel: exactly the dense FFN), and conversely with only that layer
sparse. A layer's share of the gap in a bucket is how much restoring it closes; layers are ranked by
their mean share over the long buckets (those starting at `long_from` tokens or later).
"""

from __future__ import annotations

import contextlib
import random

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in the user's process
from tqdm.auto import tqdm

from upcycle.arch import adapter_for
from upcycle.errors import ConfigError, UnsupportedArchitecture
from upcycle.eval.cwe import long_context_probe, position_buckets
from upcycle.modules import BankSparseFFN


def sparse_ffns(model) -> dict[int, BankSparseFFN]:
    """Layer index -> bank-sparse FFN, for every layer that has one (found through upcycle.arch)."""
    try:
        adapter = adapter_for(model)
    except UnsupportedArchitecture:
        adapter = None
    found = (
        {}
        if adapter is None
        else {i: adapter.ffn(i) for i in range(adapter.num_layers) if isinstance(adapter.ffn(i), BankSparseFFN)}
    )
    if not found:
        raise ConfigError("the model has no bank-sparse FFN layers: nothing to localise or repair")
    return found


@contextlib.contextmanager
def restored(model, layers):
    """Inside the block, the listed layers compute their dense FFN (keep = bank)."""
    ffns = sparse_ffns(model)
    before = {i: ffns[i].keep for i in layers}
    try:
        for i in layers:
            ffns[i].keep = ffns[i].bank
        yield
    finally:
        for i, keep in before.items():
            ffns[i].keep = keep


def localise(
    model,
    reference_logprobs: torch.Tensor,
    ids: torch.Tensor,
    *,
    first_bucket: int = 256,
    long_from: int = 512,
    progress: bool = True,
) -> dict:
    """Per layer: the share of the KL gap in each position bucket closed by restoring that layer alone
    ("closed"), and the share of the gap left when only that layer is sparse ("alone"); a ranking."""
    buckets = position_buckets(ids.shape[1], first_bucket)
    ffns = sparse_ffns(model)
    layers = sorted(ffns)
    base = long_context_probe(model, reference_logprobs, ids, buckets)["kl"]
    closed, alone = [], []
    for i in tqdm(layers, desc="localise", disable=not progress):
        with restored(model, [i]):
            kl = long_context_probe(model, reference_logprobs, ids, buckets)["kl"]
        closed.append([(b - k) / b if b > 0 else 0.0 for b, k in zip(base, kl)])
        with restored(model, [j for j in layers if j != i]):
            kl = long_context_probe(model, reference_logprobs, ids, buckets)["kl"]
        alone.append([k / b if b > 0 else 0.0 for b, k in zip(base, kl)])
    long = [n for n, (a, _) in enumerate(buckets) if a >= long_from] or [len(buckets) - 1]
    score = {i: sum(closed[n][b] for b in long) / len(long) for n, i in enumerate(layers)}
    ranking = sorted(layers, key=lambda i: -score[i])
    return {
        "layers": layers,
        "buckets": [list(b) for b in buckets],
        "base_kl": base,
        "closed": closed,
        "alone": alone,
        "long_buckets": long,
        "score": [score[i] for i in layers],
        "ranking": ranking,
    }


def plot_heatmap(loc: dict, path) -> None:
    data = torch.tensor(loc["closed"]).T  # buckets x layers
    fig = Figure(figsize=(max(6, len(loc["layers"]) * 0.3), 3))
    ax = fig.subplots()
    image = ax.imshow(data, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(loc["layers"])), [str(i) for i in loc["layers"]], fontsize=7)
    ax.set_yticks(range(len(loc["buckets"])), [f"{a}–{b}" for a, b in loc["buckets"]], fontsize=7)
    ax.set(
        xlabel="layer restored to its dense FFN",
        ylabel="token positions",
        title="share of the KL gap closed (per position bucket)",
    )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def random_other_layer(loc: dict, seed: int = 0) -> int:
    """A layer drawn at random from those not ranked first: the control for the repair."""
    others = [i for i in loc["layers"] if i != loc["ranking"][0]]
    return random.Random(seed).choice(others)
