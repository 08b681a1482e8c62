"""SparseGPT (Frantar & Alistarh 2023): prune a matrix and update the weights it keeps so that the layer's
output on the calibration inputs moves as little as possible — optimal brain surgeon over the input
Hessian H = XᵀX, one column at a time, in blocks with lazy updates.

    weight, mask = sparsegpt(W, H, sparsity=0.5)          # True in mask = pruned (zero in weight)
    weight, mask = sparsegpt(W, H, nm=(2, 4))

The mask is chosen as it goes (the paper's adaptive mask selection): within each block of columns the
weights with the lowest w² / [H⁻¹]²_jj, after the updates the columns to their left made. The block's
share of the matrix's pruned count is fixed in advance, so the count is exact per matrix.
"""

from __future__ import annotations

import torch

from upcycle.kernels.linalg import InverseHessianFactor
from upcycle.ops.prune.masks import check_nm, pruned_count


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    *,
    factor: InverseHessianFactor | None = None,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    block: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and reconstructed weight, mask True where pruned) for a (out, in) weight and its (in, in) Hessian,
    or the Hessian's inverse factor already made (`factor`: shared by the matrices that read one input)."""
    rows, cols = weight.shape
    if nm is not None:
        n, m = nm
        check_nm(n, m, cols)
        block = max(m, block // m * m)  # an N:M group never straddles two blocks
    w = weight.detach().to(torch.float32, copy=True)
    if factor is None:
        factor = InverseHessianFactor.of_copy(hessian, damp)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        u = factor.rows(i1, i2)  # U[i1:i2]: this block's own spread and the later blocks'
        w1, h1 = w[:, i1:i2].clone(), u[:, i1:i2]
        d = torch.diag(h1)
        m1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:  # this block's share of the exact count, lowest w²/d² first
            k = pruned_count(rows * i2, sparsity) - pruned_count(rows * i1, sparsity)
            if k:
                m1.view(-1)[(w1**2 / d**2).reshape(-1).topk(k, largest=False).indices] = True
        errors = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:  # choose this group's pruned weights with the updates so far
                score = w1[:, i : i + m] ** 2 / d[i : i + m] ** 2
                m1[:, i : i + m].scatter_(1, score.topk(m - n, dim=1, largest=False).indices, True)
            column = w1[:, i]
            kept = torch.where(m1[:, i], torch.zeros_like(column), column)
            err = (column - kept) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)  # the OBS update of the columns to the right
            w1[:, i] = kept
            errors[:, i] = err
        w[:, i1:i2] = w1
        mask[:, i1:i2] = m1
        w[:, i2:] -= errors @ u[:, i2:]  # the lazy update of every later block
    w[mask] = 0.0
    return w.to(weight.dtype), mask


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    """‖X Wᵀ − X W′ᵀ‖² / ‖X Wᵀ‖² on the rows X: how much the layer's output moved."""
    ref = inputs.float() @ weight.float().T
    return float(((inputs.float() @ pruned.float().T - ref) ** 2).sum() / (ref**2).sum())
