"""The sorted power-iteration + QR refresh of an eigenbasis (SOAP's basis update)."""

from __future__ import annotations

import math

import pytest
import torch

from guided_descent.linalg import eigenbasis as eigenbasis_module
from guided_descent.linalg.eigenbasis import eigenbasis, refresh_eigenbasis
from guided_descent.linalg.matrix_functions import MatrixFunctionError


def psd_with_spectrum(lam: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, V): P = V diag(lam) Vᵀ with a random orthogonal V, float64."""
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    return (V * lam) @ V.T, V


def random_orthogonal(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].to(dtype)


def test_eigenbasis_orders_columns_by_descending_eigenvalue():
    lam = torch.tensor([0.3, 5.0, 1.0, 2.0, 0.01], dtype=torch.float64)
    P, _ = psd_with_spectrum(lam)
    Q = eigenbasis(P)
    assert Q.dtype == torch.float64
    rayleigh = torch.diagonal(Q.T @ P @ Q)
    torch.testing.assert_close(rayleigh, lam.sort(descending=True).values, atol=1e-12, rtol=0)
    assert eigenbasis(P.to(torch.bfloat16)).dtype == torch.float32


# Converged up to rounding: an eigenvector moves by at most ‖ΔP‖₂ / gap (Davis–Kahan), with
# ‖ΔP‖₂ ~ n u ‖P‖₂ the rounding of a step (n = 8, ‖P‖₂ = 1) and smallest gap 0.5⁶ - 0.5⁷ = 1/128:
# 1024 u, i.e. 6e-5 in float32 (atol 1e-4) and 1.1e-13 in float64 (atol 1e-10, which also covers
# the 0.5^45 = 3e-14 left by 45 power steps).
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_repeated_refreshes_converge_to_the_true_eigenbasis(dtype, atol):
    n = 8
    lam = 0.5 ** torch.arange(n, dtype=torch.float64)  # neighbouring ratio 0.5: fast convergence
    P, V = psd_with_spectrum(lam, seed=1)
    Q = random_orthogonal(n, seed=2, dtype=dtype)
    for _ in range(45):  # error ~ 0.5**45 per column
        Q, order, ok = refresh_eigenbasis(P.to(dtype), Q)
        assert ok.item()
    assert Q.dtype == dtype
    # Columns in eigenvalue order, each the true eigenvector up to sign: |Qᵀ V| = I.
    overlap = (Q.double().T @ V).abs()
    torch.testing.assert_close(overlap, torch.eye(n, dtype=torch.float64), atol=atol, rtol=0)
    torch.testing.assert_close(Q.double().T @ Q.double(), torch.eye(n, dtype=torch.float64),
                               atol=10 * atol, rtol=0)


def test_a_converged_basis_is_a_fixed_point_without_sign_flips():
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    P, V = psd_with_spectrum(lam, seed=3)
    Q, order, ok = refresh_eigenbasis(P, V)
    assert ok.item() and order.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(Q, V, atol=1e-12, rtol=0)


def test_permutation_keeps_per_column_statistics_with_their_direction():
    lam = torch.tensor([3.0, 0.2, 1.5, 7.0, 0.9, 0.05], dtype=torch.float64)
    P, V = psd_with_spectrum(lam, seed=4)
    shuffle = torch.tensor([2, 5, 0, 4, 1, 3])
    Q_old = V[:, shuffle]  # exact eigenvectors, in no particular order
    stats = lam[shuffle].clone()  # something kept per column of Q_old (SOAP: the second moment)
    Q_new, order, ok = refresh_eigenbasis(P, Q_old)
    assert ok.item()
    assert sorted(order.tolist()) == list(range(6))
    moved = stats[order]
    # New column j continues old column order[j] (up to sign) and its statistic moved with it.
    torch.testing.assert_close((Q_new * Q_old[:, order]).sum(0).abs(), torch.ones(6,
                               dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.diagonal(Q_new.T @ P @ Q_new), moved, atol=1e-12, rtol=0)
    assert torch.all(moved[:-1] >= moved[1:])  # descending


def test_refresh_is_batched_and_matches_one_at_a_time():
    n, u = 5, 2.0**-24  # float32 unit roundoff
    # Spectra in [0.1, 1.1], from seeded generators (not the global RNG: same inputs every run).
    spectra = [torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) + 0.1
               for s in range(3)]
    Ps = torch.stack([psd_with_spectrum(lam, s)[0] for s, lam in enumerate(spectra)]).float()
    Qs = torch.stack([random_orthogonal(n, 10 + s, torch.float32) for s in range(3)])
    batch, estimates = refresh_eigenbasis(Ps, Qs, return_estimates=True)
    assert batch.basis.shape == (3, 5, 5) and batch.order.shape == (3, 5)
    assert batch.ok.shape == (3,) and batch.ok.all()
    # The sort order is the same only if no two Rayleigh quotients are within rounding (~n u ‖P‖)
    # of each other: check that these inputs leave a wide margin.
    assert (estimates[:, :-1] - estimates[:, 1:]).min() > 1e3 * n * u * 1.1
    for i, lam in enumerate(spectra):
        one = refresh_eigenbasis(Ps[i], Qs[i])
        assert torch.equal(batch.order[i], one.order)
        # bmm vs mm and batched vs single QR may round differently. Each Q factor is within
        # √2 κ₂(A) ‖ΔA‖_F / ‖A‖₂ of the exact one (first-order QR perturbation, Sun 1991), with
        # A = P Q (κ₂(A) = κ(P): Q is orthogonal) and ΔA the product's rounding, γ_n, plus
        # Householder QR's backward error, γ_{n²} (Higham, Thm 19.4): ‖ΔA‖_F <= (n + n²) u √n ‖A‖₂.
        # Two computations differ by at most twice that: 2e-5 to 6e-5 here.
        kappa = (lam.max() / lam.min()).item()
        tol = 2 * math.sqrt(2) * kappa * (n + n * n) * u * math.sqrt(n)
        assert torch.linalg.matrix_norm(batch.basis[i] - one.basis) <= tol


def test_bfloat16_factor_is_refreshed_in_float32():
    P, V = psd_with_spectrum(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    result = refresh_eigenbasis(P.to(torch.bfloat16), V.to(torch.bfloat16))
    assert result.basis.dtype == torch.float32 and result.ok.item()


def test_non_finite_factor_keeps_the_old_basis_and_reports_it():
    P = torch.stack([psd_with_spectrum(torch.tensor([2.0, 1.0, 0.5]), s)[0] for s in range(2)])
    P = P.float()
    P[1, 0, 1] = float("nan")
    Q = torch.stack([random_orthogonal(3, 7, torch.float32)] * 2)
    basis, order, ok = refresh_eigenbasis(P, Q)
    assert ok.tolist() == [True, False]
    assert torch.equal(basis[1], Q[1]) and order[1].tolist() == [0, 1, 2]
    assert torch.isfinite(basis).all()


def test_qr_failure_keeps_the_old_basis(monkeypatch):
    def broken_qr(A, mode="reduced"):
        raise torch.linalg.LinAlgError("QR did not converge")

    P, _ = psd_with_spectrum(torch.tensor([2.0, 1.0]))
    Q = random_orthogonal(2, 5)
    monkeypatch.setattr(eigenbasis_module.torch.linalg, "qr", broken_qr)
    basis, order, ok = refresh_eigenbasis(P, Q)
    assert not ok.item() and torch.equal(basis, Q) and order.tolist() == [0, 1]


def test_eigenbasis_raises_matrix_function_error_on_nan():
    with pytest.raises(MatrixFunctionError):
        eigenbasis(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("P_shape, Q_shape", [((3, 4), (3, 4)), ((3, 3), (4, 4))])
def test_shapes_are_checked(P_shape, Q_shape):
    with pytest.raises(ValueError, match="shape"):
        refresh_eigenbasis(torch.zeros(P_shape), torch.zeros(Q_shape))
