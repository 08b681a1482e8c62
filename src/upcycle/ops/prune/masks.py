"""Which weights to zero: scores (magnitude, Wanda) and the masks they give — unstructured, per output
row or per matrix, and N:M — each holding exactly the count it promises.

    mask = unstructured_mask(wanda_scores(W, sq_norms), 0.5, per="row")   # True = pruned
    mask = nm_mask(magnitude_scores(W), n=2, m=4)                          # ≤ 2 nonzeros in every 4

Conventions: W is (out, in) as nn.Linear holds it; N:M groups run along the input axis (the axis a
sparse tensor core reads); "N:M" keeps at most N of every M (2:4 and 4:8 are both 50 %).
"""

from __future__ import annotations

import torch

from upcycle.errors import ConfigError


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| · ‖X_j‖₂, with X_j input feature j over the calibration tokens (the sums of squares given)."""
    return weight.detach().float().abs() * input_sq_norms.float().sqrt().unsqueeze(0)


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity prunes: round half up, so 0.5 of an odd count takes the larger half."""
    return int(numel * sparsity + 0.5)


def unstructured_mask(scores: torch.Tensor, sparsity: float, *, per: str = "row") -> torch.Tensor:
    """True where a weight is pruned: the lowest scores, `pruned_count(in, s)` in every row (per="row",
    Wanda's comparison group) or `pruned_count(out·in, s)` in the matrix (per="layer"). Ties go by position,
    so the count is exact whatever the scores."""
    if per == "row":
        k = pruned_count(scores.shape[1], sparsity)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
        return mask
    if per == "layer":
        k = pruned_count(scores.numel(), sparsity)
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        if k:
            mask[scores.reshape(-1).topk(k, largest=False).indices] = True
        return mask.view_as(scores)
    raise ConfigError(f"per={per!r} is not a comparison group: expected row or layer")


def check_nm(n: int, m: int, in_features: int | None = None) -> None:
    if not 0 < n < m:
        raise ConfigError(f"N:M = {n}:{m} keeps nothing or everything: expected 0 < N < M (e.g. 2:4)")
    if in_features is not None and in_features % m:
        raise ConfigError(f"N:M = {n}:{m} needs an input width divisible by {m}: a matrix here has {in_features}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: in every group of m consecutive inputs of a row, all but the n highest scores."""
    check_nm(n, m, scores.shape[1])
    groups = scores.reshape(scores.shape[0], -1, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2).indices, False)
    return mask.view_as(scores)


def zeros_in(t: torch.Tensor) -> int:
    """How many entries of `t` are zero. (`(t == 0).sum()` sums a bool tensor by way of an int64 copy of it:
    0.6 GB for one matrix of a 7B, where count_nonzero holds nothing.)"""
    return t.numel() - int(torch.count_nonzero(t))


def nm_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive inputs of every row has at most n nonzeros (a block of rows at a
    time: the per-group counts of a whole matrix are int64, twice its size in bf16)."""
    rows = weight.reshape(weight.shape[0], -1)
    step = max(1, (1 << 22) // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        groups = rows[start : start + step].reshape(-1, rows.shape[1] // m, m)
        if not bool((torch.count_nonzero(groups, dim=-1) <= n).all()):
            return False
    return True


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), with a one-line error otherwise."""
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"nm={text!r} is not N:M (e.g. 2:4)") from None
    check_nm(n, m)
    return n, m
