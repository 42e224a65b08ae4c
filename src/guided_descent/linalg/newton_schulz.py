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
import os
from collections.abc import Sequence
from numbers import Real
from typing import Any, Final, Literal, get_args

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]
Normalization = Literal["frobenius", "aol"]
NORMALIZATIONS: Final[tuple[str, ...]] = get_args(Normalization)

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

# The schedules a name can select (e.g. ``--hyper muon.ns_coefficients=polar_express``).
NAMED_COEFFICIENTS: Final[dict[str, Coefficients | tuple[Coefficients, ...]]] = {
    "jordan": JORDAN,
    "polar_express": POLAR_EXPRESS,
}


def _is_number(x: object) -> bool:
    if type(x) is float:  # the common case, without the ABC check below (runs every step)
        return math.isfinite(x)
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

    ``coefficients`` is one triple (used for every step), a sequence of exactly ``steps``
    triples, or a name of :data:`NAMED_COEFFICIENTS` (``"jordan"``, ``"polar_express"``: what a
    command line can pass). Raises ``ValueError`` naming the bad value.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Newton–Schulz steps must be an integer >= 1, got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients not in NAMED_COEFFICIENTS:
            raise ValueError(
                f"Newton–Schulz coefficients: unknown name {coefficients!r}; expected one of "
                f"{sorted(NAMED_COEFFICIENTS)} or (a, b, c) triples"
            )
        coefficients = NAMED_COEFFICIENTS[coefficients]
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


# The smallest matrix that Newton–Schulz computes in bfloat16 on a CPU with bf16 matrix hardware,
# as s²·l for an (s, l) matrix, s <= l: the work of one iteration (2 s² l + s³ multiply-adds).
# oneDNN's bf16 GEMM costs ~30 us per call whatever the size (5 steps = 15 calls: a 32x32
# iteration takes 0.48 ms in bf16, 0.09 ms in float32), so bf16 pays only for enough work.
# Measured on the 2-core AMX Xeon, one thread, 5 steps, ms float32 / bf16: 64x256 0.26 / 0.55,
# 96x384 0.66 / 0.77, 128x128 0.50 / 0.89, 160x160 1.44 / 1.17, 128x256 1.20 / 0.76,
# 256x256 3.9 / 1.2, 512x512 ~13 / 2.6 (bf16 at 0.2-0.3x from s²l = 1.6e7 up). The crossover
# lies between s²l = 3.5e6 (96x384) and 4.1e6 (160x160): 2^22 = 4.19e6 (128x256).
CPU_BF16_MIN_WORK: Final[int] = 1 << 22

# oneDNN's ISA cap (DNNL_MAX_CPU_ISA / ONEDNN_MAX_CPU_ISA): a value naming none of these keeps it
# off the bf16 instructions (e.g. AVX2, AVX512_CORE), so bf16 products would be emulated.
_BF16_ISA_WORDS: Final[tuple[str, ...]] = ("BF16", "AMX", "AVX10", "FP16", "ALL", "DEFAULT")


def _isa_cap_allows_bf16() -> bool:
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(name, "").strip().upper()
        if cap and not any(word in cap for word in _BF16_ISA_WORDS):
            return False
    return True


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: AMX-BF16 or AVX512-BF16 present,
    oneDNN built in and enabled, and not capped below those instructions by
    ``DNNL_MAX_CPU_ISA`` / ``ONEDNN_MAX_CPU_ISA``. Decided once per process, from flags only:
    a timing probe would make the compute dtype -- hence the results -- depend on the machine's
    load when the run started.

    Kept in a module global rather than ``functools.cache``: once detected (Muon detects it when
    built), a compiled step reads a plain bool instead of tracing the probe."""
    global _CPU_BF16_MATMUL
    if _CPU_BF16_MATMUL is None:
        _CPU_BF16_MATMUL = _detect_cpu_bf16_matmul()
    return _CPU_BF16_MATMUL


_CPU_BF16_MATMUL: bool | None = None


def _detect_cpu_bf16_matmul() -> bool:
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if not _isa_cap_allows_bf16():
        return False
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = get()
            return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
        except Exception:  # a torch build without the probe: read the kernel's flags instead
            pass
    flags = _cpuinfo_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_compute_dtype(
    device: torch.device, shape: tuple[int, ...] | None = None
) -> torch.dtype:
    """The compute dtype ``newton_schulz(..., dtype=None)`` uses for matrices of ``shape``.

    * CUDA: bfloat16. The iteration is matmul-bound and bf16 tensor cores are several times
      faster; the quintic tolerates bf16's 8-bit mantissa because it is applied to a band around
      1, not converged to high accuracy (tests/test_newton_schulz.py bounds the band in bf16).
    * A CPU with bf16 matrix hardware (:func:`cpu_bf16_matmul`): bfloat16 for matrices (the last
      two dimensions of ``shape``) with ``s²·l >= CPU_BF16_MIN_WORK``, float32 below, where the
      fixed cost of a bf16 GEMM call outweighs its speed (see :data:`CPU_BF16_MIN_WORK`).
      256x256: 1.2 ms instead of 3.9 ms.
    * Any other CPU (or ``shape=None``): float32; emulated bf16 GEMM is slower than float32.

    Decided by shape alone (not by a batch's size), so that ranks splitting the work of one
    optimizer step agree on each matrix's dtype whatever matrices each of them holds.
    """
    if device.type == "cuda":
        return torch.bfloat16
    if shape is None or len(shape) < 2 or device.type != "cpu":
        return torch.float32
    short, long = sorted(shape[-2:])
    if short * short * long >= CPU_BF16_MIN_WORK and cpu_bf16_matmul():
        return torch.bfloat16
    return torch.float32


def _aol_rescale(X: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(D X, D A D)`` for ``X`` (..., m, n), ``A = X Xᵀ`` and ``D = diag(Σ_j |A_ij|)^(-1/2)``.

    AOL (Prach & Lampert 2022, arXiv 2208.03160, Theorem 1): ``‖D A D‖₂ <= 1`` for any symmetric
    ``A`` by Schur's test with weights ``1/dᵢ`` (``Σ_j dᵢ |A_ij| d_j / d_j = 1/dᵢ``), so
    ``‖D X‖₂ <= 1`` as the polynomials need. Where the Gram's off-diagonal mass is small, ``D X``
    has singular values near 1, far above the ``σ/‖X‖_F`` that the Frobenius normalization
    leaves. The Gram comes back rescaled: the first step needs exactly it (one m²n product saved).
    The row sums are taken in at least float32 (O(m²) work) so that a bf16 ``D`` is not also off
    by a rounding of each sum; clamping them below by ``eps`` only shrinks ``D`` (the bound holds).
    """
    A = X @ X.mT  # ([B,] m, m), compute dtype
    wide = torch.promote_types(A.dtype, torch.float32)  # bf16 -> float32; float64 stays
    d = A.to(wide).abs().sum(dim=-1).clamp_min(eps).rsqrt().to(X.dtype)  # ([B,] m)
    # Two broadcasts, not the outer product d dᵀ: a zero row's d = eps^-1/2 squared stays finite.
    return X * d[..., :, None], A * d[..., :, None] * d[..., None, :]


def _iterate(
    X: Tensor, schedule: Sequence[Coefficients], fused_mm: Any, A: Tensor | None = None
) -> Tensor:
    """The quintic steps on ``X`` (m <= n), with ``fused_mm`` = ``addmm`` (2-D) or ``baddbmm``.

    ``A``: ``X Xᵀ`` if the caller has it already (the AOL normalization), used by the first step.
    """
    for a, b, c in schedule:
        if A is None:
            A = X @ X.mT  # Gram of the short side: m²n flops instead of n²m
        B = fused_mm(A, A, A, beta=b, alpha=c)  # b A + c A²
        X = fused_mm(X, B, X, beta=a)  # a X + (b A + c A²) X = a X + b X³ + c X⁵
        A = None
    return X


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: Coefficients | Sequence[Coefficients] = JORDAN,
    *,
    dtype: torch.dtype | None = None,
    eps: float = 1e-7,
    normalization: Normalization = "frobenius",
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
        dtype: compute dtype; ``None`` picks :func:`default_compute_dtype` for ``G``'s device
            and matrix shape.
        eps: lower bound on the Frobenius norm used to normalize (> 0), and on AOL's row sums.
        normalization: how ``X₀`` is made to have spectral norm <= 1. ``"frobenius"`` (default,
            Muon's): ``G / ‖G‖_F``. ``"aol"`` (Turbo-Muon, Boissin et al. 2025, arXiv
            2512.04632): then also ``D X`` with ``D = diag(Σ_j |(X Xᵀ)_ij|)^(-1/2)`` on the short
            side, which starts most singular values much closer to 1, reusing ``X Xᵀ`` for the
            first step (no extra product). ``D X`` has another polar factor than ``G``: the
            result approximates ``G``'s only as well as the steps converge (see
            docs/benchmarks.md, "Newton–Schulz: Polar Express and AOL rescaling").

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
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"newton_schulz normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
        )
    compute = default_compute_dtype(G.device, tuple(G.shape)) if dtype is None else dtype
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
    # Also before AOL, which is scale-free: keeps X Xᵀ inside the dtype's range for any G.
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    # One matrix: 2-D kernels (AOL's Gram included). On CPU, bfloat16 addmm is ~1.5x faster than
    # a batch-of-one baddbmm (measured 1.05 vs 1.55 ms for 256x256, 5 steps, 2 threads); same
    # result.
    one = X.size(0) == 1
    if one:
        X = X[0]  # (m, n)
    A = None
    if normalization == "aol":
        X, A = _aol_rescale(X, eps)  # ([B,] m, n), ([B,] m, m)
    X = _iterate(X, schedule, torch.addmm if one else torch.baddbmm, A)
    if one:
        X = X[None]
    X = X.reshape(*batch_shape, m, n)
    return X.mT if tall else X
