"""The one Newton–Schulz iteration of the library: an approximate polar factor ``U Vᵀ`` of ``G``.

For ``G = U Σ Vᵀ`` (thin SVD) and an odd polynomial ``p(x) = a x + b x³ + c x⁵``, the matrix
``a X + b (X Xᵀ) X + c (X Xᵀ)² X`` equals ``U p(Σ) Vᵀ``: the iteration acts on every singular value
separately and leaves the singular vectors alone. Starting from ``X₀ = G / ‖G‖_F`` (all singular
values in ``[0, 1]``) and composing polynomials that push ``(0, 1]`` towards 1, ``X`` approaches
``U Vᵀ`` using matrix products only -- no SVD, no inverse, nothing that is slow on an accelerator.

Coefficients are data, not code: one ``(a, b, c)`` triple for every step (:data:`JORDAN`, Muon's
default) or one triple per step (:data:`POLAR_EXPRESS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, Final

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]

# Jordan et al. 2024 (Muon): a quintic picked for a large slope at 0 (a = 3.4445) so that small
# singular values grow fast, at the price of not converging to 1 -- the composition oscillates in
# a band around 1 instead. Measured in float64 for 5 steps: every x = σ/‖G‖_F >= 1.07e-3 lands in
# [0.5, 1.203]; x = 1e-3 lands at 0.47 (tests/test_newton_schulz.py checks both).
JORDAN: Final[Coefficients] = (3.4445, -4.7750, 2.0315)

# Amsel, Persson, Musco & Gower 2025, "The Polar Express" (arXiv 2505.16932), Algorithm 1: the
# first five of its degree-5 polynomials, built greedily -- each one fitted to the interval of
# singular values the previous ones leave, starting from [1e-3, 1] -- with the paper's adjustments
# for half precision. Without the safety factor below, their composition maps [1e-3, 1] into
# 1 ± 0.12356 with equal error at both ends (equioscillation, the mark of a minimax fit); the
# tests check that balance to 1e-9 as a guard against transcription errors.
_POLAR_EXPRESS_RAW: Final[tuple[Coefficients, ...]] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
)


def _rescaled(coefficients: Coefficients, s: float) -> Coefficients:
    """Coefficients of ``x -> p(x / s)``: ``(a/s, b/s³, c/s⁵)``."""
    a, b, c = coefficients
    return (a / s, b / s**3, c / s**5)


# Algorithm 1 evaluates every polynomial at x/1.01 (a margin for bf16 rounding pushing singular
# values past the interval a polynomial was fitted on) and also divides the input by 1.01·‖G‖_F.
# Both are folded into the coefficients here, so that newton_schulz(G, 5, POLAR_EXPRESS) equals
# Algorithm 1 with our plain Frobenius normalization.
POLAR_EXPRESS: Final[tuple[Coefficients, ...]] = (
    _rescaled(_POLAR_EXPRESS_RAW[0], 1.01 * 1.01),
    *(_rescaled(t, 1.01) for t in _POLAR_EXPRESS_RAW[1:]),
)


def _is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _as_triple(value: object, where: str) -> Coefficients | None:
    """``value`` as a float triple; ``None`` if it is not shaped like one (e.g. a schedule)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        return None
    if any(isinstance(x, Sequence) for x in value):
        return None
    if not all(_is_number(x) for x in value):
        raise ValueError(f"Newton–Schulz coefficients{where} must be finite numbers, got {value!r}")
    a, b, c = value
    return (float(a), float(b), float(c))


def coefficient_schedule(
    coefficients: Coefficients | Sequence[Coefficients], steps: int
) -> tuple[Coefficients, ...]:
    """The ``(a, b, c)`` triple of each of the ``steps`` iterations, validated.

    ``coefficients`` is one triple (used for every step) or a sequence of exactly ``steps``
    triples. Raises ``ValueError`` naming the bad value.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Newton–Schulz steps must be an integer >= 1, got {steps!r}")
    single = _as_triple(coefficients, "")
    if single is not None:
        return (single,) * steps
    if (
        isinstance(coefficients, (str, bytes))
        or not isinstance(coefficients, Sequence)
        or not all(isinstance(item, Sequence) for item in coefficients)
    ):
        raise ValueError(
            "Newton–Schulz coefficients must be an (a, b, c) triple or a sequence of triples, "
            f"got {coefficients!r}"
        )
    schedule = []
    for i, item in enumerate(coefficients):
        triple = _as_triple(item, f"[{i}]")
        if triple is None:
            raise ValueError(
                f"Newton–Schulz coefficients[{i}] must be an (a, b, c) triple, got {item!r}"
            )
        schedule.append(triple)
    if len(schedule) != steps:
        raise ValueError(
            f"Newton–Schulz coefficient schedule has {len(schedule)} triples but steps={steps}; "
            "give one triple per step (or a single triple for all steps)"
        )
    return tuple(schedule)


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere.

    On a GPU the iteration is matmul-bound and bf16 tensor cores are several times faster; the
    quintic tolerates bf16's 8-bit mantissa because it is applied to a band around 1, not
    converged to high accuracy. On a CPU, bf16 GEMM is fast only where the chip has AMX or
    AVX512-BF16 (elsewhere it is converted and slower than float32); CPU runs are small models and
    tests, where float32 keeps the result close to the exact polar factor. Measured on a 2-core
    AMX Xeon, one thread, one Gram + product: 64x256 float32 0.04 ms vs bf16 0.06 ms;
    512x1024 float32 10.4 ms vs bf16 1.1 ms -- pass ``dtype=torch.bfloat16`` for large CPU work.
    """
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _iterate(X: Tensor, schedule: Sequence[Coefficients], fused_mm: Any) -> Tensor:
    """The quintic steps on ``X`` (m <= n), with ``fused_mm`` = ``addmm`` (2-D) or ``baddbmm``."""
    for a, b, c in schedule:
        A = X @ X.mT  # Gram of the short side: m²n flops instead of n²m
        B = fused_mm(A, A, A, beta=b, alpha=c)  # b A + c A²
        X = fused_mm(X, B, X, beta=a)  # a X + (b A + c A²) X = a X + b X³ + c X⁵
    return X


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: Coefficients | Sequence[Coefficients] = JORDAN,
    *,
    dtype: torch.dtype | None = None,
    eps: float = 1e-7,
) -> Tensor:
    """Approximate the polar factor ``U Vᵀ`` of ``G`` (..., m, n) by a quintic Newton–Schulz.

    Each step maps ``X -> a X + (b A + c A²) X`` with ``A = X Xᵀ``, i.e. every singular value
    ``x -> a x + b x³ + c x⁵``. Leading dimensions are a batch: each matrix is normalized by its own
    Frobenius norm (clamped below by ``eps``, so a zero matrix maps to zero) and iterated
    independently. Tall matrices are transposed first so that ``A`` is the smaller
    ``min(m, n)``-square Gram matrix; the result has ``G``'s shape.

    Args:
        G: a floating-point tensor with at least 2 dimensions.
        steps: number of iterations (>= 1).
        coefficients: one ``(a, b, c)`` triple for every step, or a sequence of ``steps`` triples.
        dtype: compute dtype; ``None`` picks :func:`default_compute_dtype` for ``G``'s device.
        eps: lower bound on the Frobenius norm used to normalize (> 0).

    Returns:
        A tensor of ``G``'s shape in the compute dtype (the caller casts). With :data:`JORDAN`
        and 5 steps, the singular values ``σ`` of ``G`` with ``σ/‖G‖_F >= 1.07e-3`` become values in
        ``[0.5, 1.21]`` (exact arithmetic); smaller ones stay below 0.5.
    """
    schedule = coefficient_schedule(coefficients, steps)
    if not isinstance(G, Tensor):
        raise TypeError(f"newton_schulz needs a Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix (..., m, n), got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"newton_schulz needs a floating-point tensor, got dtype {G.dtype}")
    if not _is_number(eps) or eps <= 0:
        raise ValueError(f"newton_schulz eps must be a finite number > 0, got {eps!r}")
    compute = default_compute_dtype(G.device) if dtype is None else dtype
    if not isinstance(compute, torch.dtype) or not compute.is_floating_point:
        raise ValueError(f"newton_schulz dtype must be a floating-point torch.dtype, got {dtype!r}")

    X = G.to(compute)
    if X.numel() == 0:
        return X.clone()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    batch_shape = X.shape[:-2]
    m, n = X.shape[-2:]
    X = X.reshape(-1, m, n)  # (B, m, n), m <= n, compute dtype
    # ‖X‖_2 <= ‖X‖_F = 1 afterwards: every singular value starts in [0, 1], the polynomials' domain.
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    if X.size(0) == 1:
        # One matrix: 2-D kernels. On CPU, bfloat16 addmm is ~1.5x faster than a batch-of-one
        # baddbmm (measured 1.05 vs 1.55 ms for 256x256, 5 steps, 2 threads); same result.
        X = _iterate(X[0], schedule, torch.addmm)[None]
    else:
        X = _iterate(X, schedule, torch.baddbmm)
    X = X.reshape(*batch_shape, m, n)
    return X.mT if tall else X
