"""KL-Shampoo and KL-SOAP against a dense transcription of the authors' algorithm, the KL fixed
point, float32/bfloat16 and exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.kl_shampoo import KLSOAP, KLShampoo
from guided_descent.preconditioners import kl as kl_math

F64 = torch.float64
HP = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01)


def gradients(shape: tuple[int, ...], n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


def param(shape: tuple[int, ...], dtype: torch.dtype = F64, seed: int = 1) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(shape, generator=g, dtype=F64).to(dtype))


def step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.dtype).clone()
    opt.step()


# --- the authors' algorithm, transcribed densely in float64 --------------------------------------
#
# yorkerlin/KL-Methods, optim/kl_opt.py (commit 4cb97e0), the 2-D path of KLOpt: the first gradient
# sets L = (1-β) G Gᵀ/n, R = (1-β) Gᵀ G/m, their eigenbases, and d_L = d_R = init_factor, and
# moves nothing; then per step the update from the old estimates, followed by
#   L ← β L + (1-β) G R̂⁻¹ Gᵀ / n,  R ← β R + (1-β) Gᵀ L̂⁻¹ G / m    (R̂ = Q_R diag(d_R) Q_Rᵀ)
#   d_L ← max(β d_L + (1-β) mean_j (Q_Lᵀ G Q_R)²_ij / d_R,j, floor)  (and d_R alike, old d_L)
# and every T steps Q ← qr(F Q). KL-Shampoo's update is Q_L [Q_Lᵀ m Q_R / (sqrt(d_L d_Rᵀ) + eps)]
# Q_Rᵀ (their `eigen_sqrt_inv / (1 + eigen_sqrt_inv eps)`), KL-SOAP's Adam's in the rotated space.
# Where this library deliberately differs (each documented in the class docstrings), the
# transcription follows the library, switchably: bias-corrected moments, weight decay before the
# step, the first basis from the tie-broken factor, the power step on F + shift tr(F)/n I, and
# (init_factor=None) d_L, d_R starting at the RMS of the first gradient rather than at 0.1. The
# power step is unsorted, as theirs (``sort=True``: SOAP's sorted step, for comparison).


def tiebroken(F: torch.Tensor, tiebreak: float) -> torch.Tensor:
    n = F.shape[0]
    ramp = torch.linspace(1.0, 0.0, n, dtype=F.dtype)
    return F + torch.diag(tiebreak * torch.linalg.matrix_norm(F) * ramp)


def reference(
    W0: torch.Tensor,
    grads: list[torch.Tensor],
    *,
    soap: bool,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    T: int,
    tiebreak: float,
    shift: float,
    init_factor: float | None = None,
    clamp: float | None = 4000.0,
    sort: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """``(W after every gradient, the updates, the sensitivity κ of every basis computation)``."""
    beta1, beta2 = betas
    beta = beta2
    m_, n_ = W0.shape
    floor = [0.0 if clamp is None else 1 / max(10, min(k, clamp)) ** 2 for k in (m_, n_)]
    G = grads[0]
    L = (1 - beta) * G @ G.T / n_
    R = (1 - beta) * G.T @ G / m_
    kappas = []

    def basis(F: torch.Tensor) -> torch.Tensor:
        P = tiebroken(F, tiebreak)
        values, vectors = torch.linalg.eigh(P)
        gaps = values.diff().min().item()
        kappas.append(torch.linalg.matrix_norm(P, 2).item() / gaps)
        return vectors.flip(-1)

    QL, QR = basis(L), basis(R)
    if init_factor is None:  # the library's default: sqrt(d_L d_Rᵀ) starts at the RMS of G
        start = [max(G.square().mean().sqrt().item(), f) for f in floor]
    else:
        start = [init_factor, init_factor]
    dL = torch.full((m_,), start[0], dtype=F64)
    dR = torch.full((n_,), start[1], dtype=F64)
    m = torch.zeros_like(W0)
    v = torch.zeros_like(W0)
    W = W0.clone()
    updates = []
    for t, G in enumerate(grads[1:], start=1):
        m = beta1 * m + (1 - beta1) * G
        if soap:
            v = beta2 * v + (1 - beta2) * (QL.T @ G @ QR) ** 2
            denom = (v / (1 - beta2**t)).sqrt() + eps
            U = QL @ ((QL.T @ m @ QR) / (1 - beta1**t) / denom) @ QR.T
        else:
            denom = (dL[:, None] * dR[None, :]).sqrt() + eps
            U = QL @ ((QL.T @ (m / (1 - beta1**t)) @ QR) / denom) @ QR.T
        updates.append(U)
        W = W * (1 - lr * weight_decay) - lr * U
        Rhat_inv = QR @ torch.diag(1 / dR) @ QR.T
        Lhat_inv = QL @ torch.diag(1 / dL) @ QL.T
        L = beta * L + (1 - beta) * G @ Rhat_inv @ G.T / n_
        R = beta * R + (1 - beta) * G.T @ Lhat_inv @ G / m_
        Y = QL.T @ G @ QR
        ldiag = (Y**2 / dR[None, :]).mean(1)
        rdiag = (Y**2 / dL[:, None]).mean(0)
        dL = (beta * dL + (1 - beta) * ldiag).clamp_min(floor[0])
        dR = (beta * dR + (1 - beta) * rdiag).clamp_min(floor[1])
        if t % T == 0:
            for side in (0, 1):
                F, Q, d = (L, QL, dL) if side == 0 else (R, QR, dR)
                n = F.shape[0]
                Fs = F + shift * torch.trace(F) / n * torch.eye(n, dtype=F64)
                estimates = torch.diagonal(Q.T @ Fs @ Q)
                order = estimates.argsort(descending=True, stable=True) if sort else torch.arange(n)
                Q, Rq = torch.linalg.qr(Fs @ Q[:, order])
                kappas.append(torch.linalg.cond(Fs).item())
                d = d[order]
                if side == 0:
                    QL, dL, v = Q, d, v[order, :]
                else:
                    QR, dR, v = Q, d, v[:, order]
    return W, updates, kappas


def parity_tolerance(
    updates: list[torch.Tensor], kappas: list[float], W: torch.Tensor, lr: float, dtype
) -> float:
    """A bound on ‖W - W_ref‖_F for the library run in ``dtype`` against the float64 reference.

    Derived from the unit roundoff u of ``dtype``: W_T = W_0 Π(1 - lr wd) - lr Σ U_t, so the
    parameter's error is at most lr Σ ‖ΔU_t‖ plus one rounding of W per step (u ‖W‖ each). An
    update is a few products with inner dimension <= n (relative error <= n u each, Higham §3.5)
    of quantities that carry the bases' errors, and a basis computed by eigh or QR errs by u times
    its sensitivity κ (‖F‖ / smallest eigen-gap for eigh, cond(F) for QR of F Q; both measured
    on the reference). Errors of earlier bases feed the estimates of later steps: the factor 10
    covers that propagation over the dozen steps of these tests (reached at ~1 % in practice).
    """
    u = torch.finfo(dtype).eps / 2
    n = max(W.shape)
    per_update = 10 * u * (4 * n + max(kappas))
    steps = lr * sum(U.norm().item() for U in updates) * per_update
    return steps + len(updates) * u * W.norm().item()


CASES = {
    # name: (class, soap?) ; shapes with m < n and m > n so that a first factor is rank-deficient
    "kl_shampoo": (KLShampoo, False),
    "kl_soap": (KLSOAP, True),
}


@pytest.mark.parametrize("shape", [(4, 6), (7, 3)])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_matches_dense_transcription_of_the_authors_algorithm(name, dtype, shape):
    cls, soap = CASES[name]
    lr, betas, eps, wd, T = 5e-2, (0.9, 0.95), 1e-8, 0.1, 3
    grads = gradients(shape, 13, seed=3)
    W = param(shape, dtype, seed=4)
    W0 = W.detach().to(F64).clone()
    opt = cls([W], lr=lr, betas=betas, eps=eps, weight_decay=wd, precondition_frequency=T)
    ref, updates, kappas = reference(
        W0, grads, soap=soap, lr=lr, betas=betas, eps=eps, weight_decay=wd, T=T,
        tiebreak=2e-2, shift=1e-3,
    )
    for G in grads:
        step(opt, [W], [G])
    err = (W.detach().to(F64) - ref).norm().item()
    tol = parity_tolerance(updates, kappas, ref, lr, dtype)
    assert err <= tol, (err, tol)
    assert (W.detach().to(F64) - W0).norm() > 100 * tol  # the comparison is not vacuous


@pytest.mark.parametrize("name", list(CASES))
def test_with_the_authors_basis_settings_too(name):
    """tiebreak = refresh_shift = 0 and init_factor = 0.1: the authors' first basis, power step
    and initial estimates."""
    cls, soap = CASES[name]
    lr, betas, T = 5e-2, (0.9, 0.95), 4
    grads = gradients((5, 5), 10, seed=8)  # square: the first factors have full rank
    W = param((5, 5), seed=9)
    W0 = W.detach().clone()
    opt = cls([W], lr=lr, betas=betas, eps=1e-8, weight_decay=0.0, precondition_frequency=T,
              tiebreak=0.0, refresh_shift=0.0, init_factor=0.1)
    ref, updates, kappas = reference(W0, grads, soap=soap, lr=lr, betas=betas, eps=1e-8,
                                     weight_decay=0.0, T=T, tiebreak=0.0, shift=0.0,
                                     init_factor=0.1)
    for G in grads:
        step(opt, [W], [G])
    assert (W.detach() - ref).norm().item() <= parity_tolerance(updates, kappas, ref, lr, F64)


def test_order_three_statistics_match_the_dense_kronecker_formula():
    """F_i = n_i/N G_(i) (⊗_{j≠i} F̂_j⁻¹) G_(i)ᵀ with F̂_j = Q_j diag(d_j) Q_jᵀ, and the estimates'
    statistic diag(Q_iᵀ F_i-statistic Q_i), against explicit Kronecker products."""
    shape = (2, 3, 4)
    g = torch.Generator().manual_seed(5)
    G = torch.randn(shape, generator=g, dtype=F64)
    bases = [torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0] for n in shape]
    bases[1] = None  # a diagonal dimension
    d = [torch.rand(n, generator=g, dtype=F64) + 0.5 for n in shape]
    factors, diagonals = kl_math.kl_statistics(G, bases, d)
    N = G.numel()
    inverses = [
        torch.diag(1 / d[j]) if bases[j] is None else bases[j] @ torch.diag(1 / d[j]) @ bases[j].T
        for j in range(3)
    ]
    for i in range(3):
        others = [j for j in range(3) if j != i]
        unfold = G.movedim(i, 0).reshape(shape[i], -1)  # columns in the others' row-major order
        middle = torch.kron(inverses[others[0]], inverses[others[1]])
        dense = unfold @ middle @ unfold.T * shape[i] / N
        Q = torch.eye(shape[i], dtype=F64) if bases[i] is None else bases[i]
        if bases[i] is None:
            assert factors[i] is None
        else:
            torch.testing.assert_close(factors[i], dense, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(diagonals[i], torch.diagonal(Q.T @ dense @ Q))


def test_statistics_of_a_stack_are_each_matrix_own():
    g = torch.Generator().manual_seed(6)
    G = torch.randn(3, 4, 5, generator=g, dtype=F64)
    Q = [torch.linalg.qr(torch.randn(3, n, n, generator=g, dtype=F64))[0] for n in (4, 5)]
    d = [torch.rand(3, n, generator=g, dtype=F64) + 0.5 for n in (4, 5)]
    factors, diagonals = kl_math.kl_statistics(G, Q, d, batch=1)
    for b in range(3):
        one_f, one_d = kl_math.kl_statistics(G[b], [q[b] for q in Q], [x[b] for x in d])
        for i in range(2):
            torch.testing.assert_close(factors[i][b], one_f[i])
            torch.testing.assert_close(diagonals[i][b], one_d[i])


# --- the KL fixed point ---------------------------------------------------------------------------


def spd(n: int, g: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    return Q @ torch.diag(torch.linspace(lo, hi, n, dtype=F64)) @ Q.T


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
def test_factors_converge_to_the_kronecker_covariance_up_to_scale(cls):
    """For gradients vec G ~ N(0, A ⊗ B) the KL solution is L = c A, R = B / c: the estimated
    L̂ ⊗ R̂ (bases and eigenvalue estimates) and the factors F_L ⊗ F_R both approach A ⊗ B.

    Shampoo's factors converge to A tr(B)/n-like mixtures instead (not a model of A ⊗ B's
    scale); here the product is checked without choosing c. Tolerance: the EMA averages about
    (1 + β)/(1 - β) = 399 gradients of n = 6 columns each (m = 4 rows), so each factor's relative
    Frobenius error is about sqrt(dim / (399 · other dim)) <= 0.05 and the product's <= 0.08;
    0.25 is three standard errors. The floor (inverse_root_clamp) is off: it is a safeguard,
    not part of the fixed point."""
    g = torch.Generator().manual_seed(12)
    A, B = spd(4, g, 0.5, 3.0), spd(6, g, 0.3, 2.0)
    A_half, B_half = torch.linalg.cholesky(A), torch.linalg.cholesky(B)
    W = nn.Parameter(torch.zeros(4, 6, dtype=F64))
    opt = cls([W], lr=0.0, betas=(0.9, 0.995), precondition_frequency=5, init_factor=1.0,
              inverse_root_clamp=None)
    for _ in range(2500):
        Z = torch.randn(4, 6, generator=g, dtype=F64)
        W.grad = A_half @ Z @ B_half.T  # Cov(G_ij, G_kl) = A_ik B_jl
        opt.step()
    state = opt.state[W]
    prefix = cls.PREFIX
    target = torch.kron(A, B)

    def rel(M: torch.Tensor) -> float:
        return ((M - target).norm() / target.norm()).item()

    hats = []
    for side in ("L", "R"):
        Q, d = state[f"{prefix}.{side}.basis"], state[f"{prefix}.{side}.eigenvalues"]
        hats.append(Q @ torch.diag(d) @ Q.T)
    assert rel(torch.kron(*hats)) < 0.25
    assert rel(torch.kron(state[f"{prefix}.L"], state[f"{prefix}.R"])) < 0.25
    # The scale split between the two is free (c), but the product is pinned: Shampoo's
    # statistics (G Gᵀ and Gᵀ G) would give A tr(B) ⊗ B tr(A), off by tr(A) tr(B) ≈ 36.


# --- dtypes and resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
def test_bfloat16_params_keep_float32_state_and_track_float32(cls):
    """With the same (bfloat16) gradients, the state of a bfloat16 and a float32 parameter is
    identical (both are computed in float32 from the gradient alone); the parameters differ only
    by one rounding to bfloat16 per step, at most 2^-9 |W| each."""
    W16 = param((6, 4), torch.bfloat16)
    W32 = nn.Parameter(W16.detach().float())
    opts = [cls([p], precondition_frequency=2, **HP) for p in (W16, W32)]
    grads = gradients((6, 4), 7, seed=23)
    for G in grads:
        G = G.to(torch.bfloat16)
        step(opts[0], [W16], [G])
        step(opts[1], [W32], [G])
    assert W16.dtype == torch.bfloat16
    bound = len(grads) * 2.0**-9 * W32.detach().abs().max().item() * 1.01
    assert (W16.float() - W32.detach()).abs().max().item() <= bound
    s16, s32 = opts[0].state[W16], opts[1].state[W32]
    for key, value in s32.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert s16[key].dtype == torch.float32, key
            assert torch.equal(s16[key], value), key


@pytest.mark.parametrize("name", ["kl_shampoo", "kl_soap"])
def test_state_dict_resume_is_exact(name):
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.randn(16, 3)

    def run(opt, net, steps):
        for _ in range(steps):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()

    opt = gd.create(name, model, precondition_frequency=3, example_inputs=x)
    run(opt, model, 5)
    twin = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    other = gd.create(name, twin, precondition_frequency=3, example_inputs=x)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint file
    run(opt, model, 7)
    run(other, twin, 7)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("init_factor", [None, 0.1])
def test_a_vector_is_rmsprop_with_the_initial_estimate(init_factor):
    """Every dimension diagonal: d ← β d + (1-β) g², the step m̂ / (sqrt(d_old) + eps); d starts
    at init_factor, or (None) at the first gradient's mean square."""
    b = nn.Parameter(torch.zeros(5, dtype=F64))
    beta1, beta2, eps = 0.9, 0.95, 1e-8
    opt = KLShampoo([{"params": [b], "algorithm": "kl_shampoo"}], lr=1.0, betas=(beta1, beta2),
                    eps=eps, weight_decay=0.0, inverse_root_clamp=None, init_factor=init_factor)
    m, ref = torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)
    grads = gradients((5,), 4, seed=2)
    start = grads[0].square().mean() if init_factor is None else init_factor
    d = torch.full((5,), float(start), dtype=F64)
    for t, G in enumerate(grads, start=1):
        step(opt, [b], [G])
        m = beta1 * m + (1 - beta1) * G
        ref = ref - m / (1 - beta1**t) / (d.sqrt() + eps)
        d = beta2 * d + (1 - beta2) * G**2
        torch.testing.assert_close(b.detach(), ref, atol=1e-13, rtol=1e-13)


def test_registry_routing_and_validation():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.Linear(8, 3))
    for name in ("kl_shampoo", "kl_soap"):
        opt = gd.create(name, model)
        assert [tuple(p.shape) for p in opt.param_groups[0]["params"]] == [(8, 4)]
        assert opt.param_groups[0]["algorithm"] == name
        for kwargs, match in [
            (dict(init_factor=0.0), "init_factor.*0.0"),
            (dict(inverse_root_clamp=-1.0), "inverse_root_clamp.*-1.0"),
            (dict(shampoo_beta=1.0), "shampoo_beta.*1.0"),
        ]:
            with pytest.raises(ValueError, match=match):
                gd.create(name, model, **kwargs)
    assert math.isclose(kl_math.eigenvalue_floor(3, 4000.0), 1e-2)
    assert math.isclose(kl_math.eigenvalue_floor(50, 4000.0), 1 / 2500)
    assert kl_math.eigenvalue_floor(50, None) == 0.0
