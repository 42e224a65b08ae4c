"""eigh with fallback and inverse roots: random, ill-conditioned and rank-deficient inputs."""

from __future__ import annotations

import pytest
import torch

from guided_descent.linalg import MatrixFunctionError, eigh, inverse_root
from guided_descent.linalg import matrix_functions as eigh_module


def spd(n: int, kappa: float, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """Q diag(λ) Qᵀ with λ log-spaced from 1 to 1/kappa (last n-rank set to 0), float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), n, dtype=torch.float64)
    if rank is not None:
        lam[rank:] = 0.0
    return (q * lam) @ q.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kappa", [1.0, 1e4, 1e10])
def test_eigh_reconstructs_and_is_finite(dtype, kappa):
    A = spd(24, kappa).to(dtype)
    vals, vecs = eigh(A)
    assert vals.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(vals).all() and torch.isfinite(vecs).all()
    recon = (vecs * vals) @ vecs.mT
    ref = A.double()
    # LAPACK's symmetric eigensolvers are backward stable: V Λ Vᵀ = A + E and VᵀV = I + F with
    # ‖E‖ <= p(n) u ‖A‖, ‖F‖ <= p(n) u, p(n) "a modestly growing function of n" (LAPACK Users'
    # Guide §4.7); rebuilding V Λ Vᵀ and VᵀV in the compute dtype adds γ_n = n u. We allow
    # 8 n u: 1.1e-5 in float32 (bf16 input is computed in float32), 2.1e-14 in float64.
    n = A.shape[-1]
    u = torch.finfo(vals.dtype).eps / 2
    assert (recon.double() - ref).norm() <= 8 * n * u * ref.norm()
    eye = torch.eye(n, dtype=vecs.dtype)
    torch.testing.assert_close(vecs.mT @ vecs, eye, atol=8 * n * u, rtol=0)


def test_eigh_is_batched():
    A = torch.stack([spd(8, 10.0, seed=s) for s in range(3)]).float()
    vals, vecs = eigh(A)
    assert vals.shape == (3, 8) and vecs.shape == (3, 8, 8)
    for i in range(3):
        # Both within p(n) u ‖A‖₂ <= 8 n u = 3.8e-6 of the exact eigenvalues (‖A‖₂ = 1, n = 8).
        torch.testing.assert_close(vals[i], torch.linalg.eigvalsh(A[i]), atol=1e-5, rtol=1e-5)


def test_eigh_falls_back_to_float64_then_jitter(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def flaky(A):
        calls.append(A.dtype)
        if len(calls) <= 2:  # float32 and plain float64 attempts fail
            raise torch.linalg.LinAlgError("did not converge")
        return real(A)

    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", flaky)
    A = spd(6, 100.0).float()
    vals, vecs = eigh(A)
    assert calls == [torch.float32, torch.float64, torch.float64]
    assert vals.dtype == torch.float32 and torch.isfinite(vals).all()
    # Solved in float64 (jitter 1e-10 ‖A‖), rounded to float32 and rebuilt there: ~8 n u = 3e-6.
    torch.testing.assert_close((vecs * vals) @ vecs.mT, A, atol=1e-5, rtol=1e-4)


def test_eigh_nan_output_counts_as_failure(monkeypatch):
    real = torch.linalg.eigh
    state = {"n": 0}

    def nan_once(A):
        state["n"] += 1
        vals, vecs = real(A)
        if state["n"] == 1:
            return torch.full_like(vals, float("nan")), vecs
        return vals, vecs

    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", nan_once)
    vals, _ = eigh(spd(5, 10.0).float())
    assert torch.isfinite(vals).all() and state["n"] == 2


def test_eigh_raises_on_nonfinite_input_and_when_everything_fails(monkeypatch):
    A = spd(4, 10.0)
    A[0, 0] = float("nan")
    with pytest.raises(MatrixFunctionError, match="NaN or Inf"):
        eigh(A)

    def broken(A):
        raise torch.linalg.LinAlgError("no")

    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", broken)
    with pytest.raises(MatrixFunctionError, match="failed"):
        eigh(spd(4, 10.0))


def test_eigh_rejects_non_square():
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        eigh(torch.zeros(3, 4))


@pytest.mark.parametrize("p", [2, 4])
def test_inverse_root_matches_dense_reference(p):
    A = spd(16, 1e3)
    X = inverse_root(A, p, eps=0.0)
    # X^p A = I for an invertible A; float64 rounding amplified by κ = 1e3: ~κ n u = 2e-12.
    torch.testing.assert_close(torch.linalg.matrix_power(X, p) @ A, torch.eye(16, dtype=A.dtype),
                               atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kappa, rank", [(1e10, None), (1e3, 5), (1.0, 0)])
def test_inverse_root_is_finite_for_hard_inputs(dtype, kappa, rank):
    A = spd(12, kappa, rank=rank).to(dtype)
    X = inverse_root(A, 4, eps=1e-6)
    assert X.dtype == torch.float32 and torch.isfinite(X).all()
    # With damping eps, every eigenvalue of X is at most eps^(-1/4).
    assert torch.linalg.eigvalsh(X.double()).max() <= (1e-6) ** -0.25 * (1 + 1e-3)


def test_inverse_root_relative_eps_is_scale_invariant():
    A = spd(10, 1e6)
    X1 = inverse_root(A, 2, eps=1e-4, relative=True)
    X2 = inverse_root(1e6 * A, 2, eps=1e-4, relative=True)
    torch.testing.assert_close(X1, X2 * 1e3, rtol=1e-9, atol=1e-12)


def test_inverse_root_of_zero_without_eps_is_an_error_not_nan():
    with pytest.raises(MatrixFunctionError):
        inverse_root(torch.zeros(3, 3), 2, eps=0.0)


@pytest.mark.parametrize("p, eps", [(0, 1e-6), (-2, 1e-6), (2, -1.0)])
def test_inverse_root_validates(p, eps):
    with pytest.raises(ValueError):
        inverse_root(torch.eye(2), p, eps=eps)


@pytest.mark.parametrize("n", [3, 16, 37])
@pytest.mark.parametrize("relative_eps", [0.0, 1e-6])
def test_a_root_does_not_depend_on_its_batch(n, relative_eps):
    """Bit for bit: the same factor alone, in a batch of two, or third in a batch of five. A
    distributed run batches a factor with other ones than a single process does (and a staggered
    refresh with other ones on each step); torch's float32 pow rounded an element differently in
    the vectorized body and the scalar tail of a tensor, which made FSDP2 Shampoo drift from the
    single-process run by 4e-4 in 12 steps."""
    g = torch.Generator().manual_seed(n)
    mats = []
    for _ in range(5):
        x = torch.randn(n, 2 * n, generator=g)
        mats.append(x @ x.T)
    alone = inverse_root(mats[2], 4, 1e-12, relative_eps=relative_eps)
    for batch in (mats[2:4], mats):
        batched = inverse_root(torch.stack(batch), 4, 1e-12, relative_eps=relative_eps)
        position = next(i for i, m in enumerate(batch) if m is mats[2])
        assert torch.equal(batched[position], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 4), (2, 0, 3), (0,)])
def test_the_cheap_finite_checks_agree_with_isfinite(dtype, shape):
    # aminmax-based checks must flag exactly what isfinite().all() flags: NaN, +Inf, -Inf at any
    # position (first, last, inside), per matrix for the batched form.
    from guided_descent.linalg.finite import all_finite, finite_matrices

    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    cases = [base]
    for bad in (float("nan"), float("inf"), -float("inf")):
        for index in (0, base.numel() // 2, base.numel() - 1):
            if base.numel() == 0:
                continue
            x = base.clone().flatten()
            x[index] = bad
            cases.append(x.reshape(shape))
    for x in cases:
        assert all_finite(x) == bool(torch.isfinite(x).all())
        if x.dim() >= 2:
            expected = torch.isfinite(x).flatten(-2).all(-1) if x.numel() else torch.ones(
                x.shape[:-2], dtype=torch.bool)
            assert torch.equal(finite_matrices(x), expected)
