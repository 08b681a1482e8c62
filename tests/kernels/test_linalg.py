"""The OBS methods' inverse-Hessian factor against torch's own inverse: UᵀU = (H + λI)⁻¹, U upper triangular,
and the textbook route's factor (factor, invert, factor again) to float64 rounding."""

import pytest
import torch

from upcycle.kernels.linalg import InverseHessianFactor, lower_triangular_inverse_


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    return h


@pytest.mark.parametrize("n", [7, 256, 300, 1000])
def test_the_factor_squares_to_the_damped_inverse_and_is_the_textbook_one(n):
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(n))
    x[:, 2] = 0  # an input never seen
    x[:, 4] = x[:, 5]  # two inputs that repeat one another (a widened model's)
    hessian = x.T @ x
    hessian = (hessian + hessian.T) / 2  # fp32 products are symmetric only to rounding; each route reads one half
    before = hessian.clone()
    u = InverseHessianFactor.of_copy(hessian, 0.01).rows(0, n, torch.float64)
    h = damped(hessian, 0.01)
    assert u.dtype == torch.float64 and torch.equal(u, u.triu())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h), rtol=1e-9, atol=1e-12)
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    torch.testing.assert_close(u, textbook, rtol=1e-9, atol=1e-12)
    assert torch.equal(hessian, before)  # the caller's H is left as it was


def test_the_triangular_inverse_by_halves_is_the_inverse():
    lower = torch.randn(700, 700, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tril()
    lower.diagonal().abs_().add_(5.0)
    expected = torch.linalg.inv(lower)
    torch.testing.assert_close(lower_triangular_inverse_(lower.clone()), expected, rtol=1e-9, atol=1e-12)


def test_the_factor_made_in_place_reads_out_block_by_block_as_the_whole():
    x = torch.randn(900, 301, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hessian = x.T @ x
    whole = InverseHessianFactor.of_copy(hessian, 0.01).rows(0, 301, torch.float64)
    storage = hessian.clone()
    factor = InverseHessianFactor(storage, 0.01)
    assert factor.storage.data_ptr() == storage.data_ptr()  # no second n × n matrix
    blocks = torch.cat([factor.rows(r, min(r + 128, 301), torch.float64) for r in range(0, 301, 128)])
    torch.testing.assert_close(blocks, whole, rtol=0, atol=0)
    with pytest.raises(TypeError, match="float64"):
        InverseHessianFactor(hessian.float(), 0.01)
