"""PSGD's Kronecker "whitening" preconditioner ``P = Qᵀ Q``, fitted on the Lie group of triangular
matrices (Li 2015, "Preconditioned stochastic gradient descent", arXiv 1512.04202; the Kronecker
form of Li's ``psgd_torch`` as Evan Walters' ``kron`` ships it, which pytorch_optimizer's ``Kron``
and heavyball's ``PSGDKron`` descend from).

Every function works on a *batch* of tensors: ``x`` has shape ``(B, d_1, ..., d_k)`` and the
factor ``Q_i`` of dimension ``i`` is ``(B, d_i, d_i)`` (upper triangular, "dense") or ``(B, d_i)``
(a diagonal factor, kept as its diagonal). A parameter seen as the tensor it is takes ``B = 1``;
a stack of matrices (views ``"batch"``/``"split:K"``) gives each matrix its own factors.

The fit (one step, probe ``V ~ N(0, I)``, gradient-like ``G``)::

    A = G ×_i Q_i              B = V ×_i Q_i⁻ᵀ
    T1_i = A_(i) A_(i)ᵀ        T2_i = B_(i) B_(i)ᵀ            (unfoldings along dimension i)
    dense:    Q_i ← Q_i - lr · triu(T1_i - T2_i) / ‖T1_i + T2_i‖ · Q_i
    diagonal: Q_i ← Q_i - lr · (T1_i - T2_i) ⊙ Q_i / max|T1_i + T2_i|

It descends ``E[‖Q G‖² + ‖Q⁻ᵀ V‖²]``, whose minimum is ``QᵀQ = E[G Gᵀ]^(-1/2)`` (for the
Kronecker product of the factors); the update is multiplicative, so ``Q`` stays triangular and
invertible. ``‖·‖`` of a dense ``T1 + T2`` is a cheap lower bound of its spectral norm
(:func:`spectral_norm_lower_bound`), as in the references.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from guided_descent.transforms.masking import commit_

MemorySaveMode = Literal["one_diag", "smart_one_diag", "all_diag"]
MEMORY_SAVE_MODES: tuple[str, ...] = get_args(MemorySaveMode)

# The references' guard against a zero denominator: bfloat16's smallest normal number.
TINY = torch.finfo(torch.bfloat16).tiny


# --- which dimensions get a dense (triangular) factor ------------------------------------------


def dense_dims(
    shape: tuple[int, ...],
    max_size_triangular: int,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
) -> tuple[bool, ...]:
    """Per dimension of ``shape``: ``True`` for a dense triangular factor, ``False`` for a
    diagonal one. Diagonal: length 1, longer than ``max_size_triangular``, tensors with fewer
    than ``min_ndim_triangular`` dimensions, and what ``memory_save_mode`` chooses:
    ``"one_diag"`` the longest dimension (the last of equals), ``"smart_one_diag"`` the same but
    only when it is strictly the longest, ``"all_diag"`` every one (the references' rules)."""
    k = len(shape)
    diagonal = [False] * k
    if k and memory_save_mode is not None:
        if memory_save_mode not in MEMORY_SAVE_MODES:
            raise ValueError(
                f"memory_save_mode must be None or one of {MEMORY_SAVE_MODES}, "
                f"got {memory_save_mode!r}"
            )
        longest = max(range(k), key=lambda d: (shape[d], d))  # the last of equal lengths
        if memory_save_mode == "all_diag":
            diagonal = [True] * k
        elif memory_save_mode == "one_diag":
            diagonal[longest] = True
        elif k >= 2 and sorted(shape)[-1] > sorted(shape)[-2]:  # smart_one_diag
            diagonal[longest] = True
    return tuple(
        not (diagonal[d] or n == 1 or n > max_size_triangular or k < min_ndim_triangular)
        for d, n in enumerate(shape)
    )


def initial_factors(
    shape: tuple[int, ...],
    dense: tuple[bool, ...],
    scale: float,
    dtype: torch.dtype,
    device: torch.device,
    batch: int | None = None,
) -> list[Tensor]:
    """``scale^(1/k) · I`` per dimension (so that the Kronecker product is ``scale · I``): an
    ``(n, n)`` identity or an ``(n,)`` vector of ones, with a leading ``batch`` dimension when
    given."""
    per = scale ** (1.0 / len(shape))
    lead = () if batch is None else (batch,)
    out = []
    for n, full in zip(shape, dense, strict=True):
        if full:
            q = torch.eye(n, dtype=dtype, device=device).mul_(per).expand(*lead, n, n).clone()
        else:
            q = torch.full((*lead, n), per, dtype=dtype, device=device)
        out.append(q)
    return out


def initial_scale_(factors: list[Tensor], g: Tensor, ok: Tensor | None = None) -> None:
    """Scale factors that start at ``I`` so that ``Q = (mean g⁴)^(-1/8) I`` (Li's ``psgd_torch``
    heuristic): ``QᵀQ g`` then has entries of about unit size from the first step. Where ``g``
    is all zero (or not finite) the factors stay as they are."""
    # Through the largest entry a: (mean g⁴)^(-1/8) = (mean (g/a)⁴)^(-1/8) · a^(-1/2), so that
    # g⁴ neither underflows (gradients of 1e-10) nor overflows (1e10) in float32.
    top = g.abs().amax()
    scale = (g / top).square().square().mean().pow(-1.0 / 8) * top.rsqrt()
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    per = scale.pow(1.0 / len(factors))
    for q in factors:
        commit_(q, q * per, ok)


# --- applying factors along one dimension --------------------------------------------------------


def _rows(x: Tensor, dim: int) -> Tensor:
    """``x`` (B, ..., d_dim, ...) as (B, R, d_dim): dimension ``dim`` last, the others rows."""
    moved = x.movedim(dim, -1)
    return moved.reshape(x.shape[0], -1, x.shape[dim])


def _back(rows: Tensor, like: Tensor, dim: int) -> Tensor:
    shape = list(like.shape)
    n = shape.pop(dim)
    return rows.reshape(*shape, n).movedim(-1, dim)


def _diag_view(q: Tensor, x: Tensor, dim: int) -> Tensor:
    """A diagonal factor ``(B, n)`` shaped to broadcast along dimension ``dim`` of ``x``."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = q.shape[0], q.shape[1]
    return q.reshape(shape)


def apply_factor(x: Tensor, q: Tensor, dim: int, transpose: bool = False) -> Tensor:
    """``Q x`` along dimension ``dim`` of ``x`` (``Qᵀ x`` with ``transpose``), per batch entry.

    ``x``: (B, d_1, ..., d_k); ``q``: (B, n, n) or (B, n) diagonal, ``n = x.shape[dim]``.
    """
    if q.dim() == 2:
        return x * _diag_view(q, x, dim)
    rows = _rows(x, dim)  # (B, R, n)
    out = rows @ (q if transpose else q.mT)  # row r: Q x_r (or Qᵀ x_r)
    return _back(out, x, dim)


def solve_factor_transposed(x: Tensor, q: Tensor, dim: int) -> Tensor:
    """``Q⁻ᵀ x`` along dimension ``dim`` (``Q`` upper triangular or diagonal), per batch entry."""
    if q.dim() == 2:
        return x / _diag_view(q, x, dim)
    rows = _rows(x, dim)  # (B, R, n); row r becomes x_rᵀ Q⁻¹ = (Q⁻ᵀ x_r)ᵀ
    out = torch.linalg.solve_triangular(q, rows, upper=True, left=False)
    return _back(out, x, dim)


def unfolded_gram(x: Tensor, dim: int, diagonal: bool) -> Tensor:
    """``X_(dim) X_(dim)ᵀ``: (B, n, n), or only its diagonal (B, n)."""
    rows = _rows(x, dim)  # (B, R, n)
    if diagonal:
        return rows.square().sum(dim=1)
    return rows.mT @ rows


def precondition(g: Tensor, factors: list[Tensor]) -> Tensor:
    """``P g = g ×_i (Q_iᵀ Q_i)``: the preconditioned direction. ``g``: (B, d_1, ..., d_k)."""
    out = g
    for i, q in enumerate(factors):
        out = apply_factor(apply_factor(out, q, i + 1), q, i + 1, transpose=True)
    return out


# --- fitting the factors ---------------------------------------------------------------------


def spectral_norm_lower_bound(s: Tensor) -> Tensor:
    """A lower bound of the spectral norm of each symmetric ``s`` (B, n, n): ``(B,)``.

    One power-iteration step from the row of largest norm (the references' estimate, for a
    symmetric matrix): within a factor ``sqrt(n)`` of the norm and usually within a few percent,
    at the cost of two matrix-vector products; scaled by ``max|s|`` first so that squares of
    tiny or huge entries neither underflow nor overflow.
    """
    top = s.abs().amax(dim=(-2, -1))  # (B,)
    scaled = s / torch.where(top > 0, top, torch.ones_like(top))[:, None, None]
    j = scaled.square().sum(dim=-1).argmax(dim=-1)  # (B,) row of largest norm
    row = torch.gather(scaled, 1, j[:, None, None].expand(-1, 1, s.shape[-1]))  # (B, 1, n)
    x = (scaled @ row.mT)[..., 0]  # (B, n)
    tiny = torch.finfo(s.dtype).tiny
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(tiny)
    return top * torch.linalg.vector_norm((scaled.mT @ x[..., None])[..., 0], dim=-1)


def update_factors_(
    factors: list[Tensor],
    g: Tensor,
    v: Tensor,
    lr: float,
    ok: Tensor | None = None,
) -> None:
    """One whitening step of every factor, in place (see the module docstring).

    ``g``, ``v``: (B, d_1, ..., d_k) in the factors' dtype; every factor's step is computed from
    the same old factors. With ``ok`` (a 0-d bool tensor) a factor changes only where it is true.
    """
    a = g
    b = v
    for i, q in enumerate(factors):
        a = apply_factor(a, q, i + 1)
        b = solve_factor_transposed(b, q, i + 1)
    new = []
    for i, q in enumerate(factors):
        diagonal = q.dim() == 2
        t1 = unfolded_gram(a, i + 1, diagonal)
        t2 = unfolded_gram(b, i + 1, diagonal)
        step = (t1 - t2).mul_(lr)
        total = t1 + t2
        if diagonal:
            norm = total.abs().amax(dim=-1, keepdim=True)  # (B, 1)
            new.append(q - step.mul_(q).div_(norm.add_(TINY)))
        else:
            norm = spectral_norm_lower_bound(total)[:, None, None]  # (B, 1, 1)
            new.append(q - step.triu_().div_(norm.add_(TINY)) @ q)
    for q, fresh in zip(factors, new, strict=True):
        commit_(q, fresh, ok)


def balance_(factors: list[Tensor], ok: Tensor | None = None) -> None:
    """Rescale the factors toward equal max-norms by powers of two whose product is one.

    ``Q = ⊗ Q_i`` is unchanged exactly (a power-of-two scaling rounds nothing), and so is every
    later fit step (it is multiplicative in each factor); only the factors' ranges are kept from
    drifting apart toward overflow. The references rescale by the exact geometric mean with
    probability 0.01 per fit; this is the same, deterministic and free of rounding.
    """
    if len(factors) < 2:
        return
    norms = torch.stack([q.abs().flatten(1).amax(dim=1) for q in factors])  # (k, B)
    logs = torch.log2(norms.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny))
    exps = torch.round(logs.mean(dim=0, keepdim=True) - logs)  # (k, B)
    exps[-1] = -exps[:-1].sum(dim=0)  # the product of the scales is exactly one
    exps = exps.clamp(-100, 100).to(torch.int32)
    for q, e in zip(factors, exps, strict=True):
        # 2^e built from its float32 exponent bits: exact on every device.
        scale = ((e + 127) << 23).view(torch.float32).to(q.dtype)
        shape = (q.shape[0],) + (1,) * (q.dim() - 1)
        commit_(q, q * scale.reshape(shape), ok)


# --- the random probe --------------------------------------------------------------------------

_MASK = 0xFFFFFFFF


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """``x · c mod 2³²`` for ``0 <= x < 2³²`` in int64 arithmetic that never overflows."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK


def hash32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer mixing function (Wellons' "lowbias32") on ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def probe_key(seed: int, *stream: int) -> int:
    """A 32-bit key from the optimizer's ``seed`` and the integers naming one probe stream."""
    key = hash32(seed & _MASK)
    for value in stream:
        key = hash32(key ^ (value & _MASK))
    return int(key)


def probe(
    shape: tuple[int, ...], key: int, step: Tensor | int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A standard normal tensor of ``shape`` determined by ``key`` and ``step`` alone.

    Counter-based: entry ``i`` is ``√2 erfinv(2u - 1)`` of a 32-bit uniform ``u =
    hash32(i ⊕ k)``, ``k`` a hash of the key and the step. No generator state to save, resume
    or keep equal between replicas, no host read (``step`` may be a device tensor), traceable
    by ``torch.compile``, and the same numbers on every device up to the last bit of ``erfinv``
    (computed in float64). One hash round per entry: ``torch.compile`` takes seconds per extra
    round of integer mixing (Box-Muller's two uniforms and two rounds took 4x longer to
    compile). Tails are cut at ``|z| ≈ 6.2`` (u is at least 2^-33 from 0 and 1), beyond which a
    normal has probability 6e-10. Two steps' streams are related only by a permutation of
    indices (``i ⊕ k`` vs ``i ⊕ k'``), never equal.
    """
    numel = math.prod(shape)
    if isinstance(step, Tensor):
        step = step.to(device=device, dtype=torch.int64)
    else:
        step = torch.tensor(step, dtype=torch.int64, device=device)
    k = hash32(hash32(step & _MASK) ^ key)  # 0-d
    index = torch.arange(numel, dtype=torch.int64, device=device) & _MASK
    bits = hash32(index ^ k)
    u = (bits.to(torch.float64) + 0.5) * 2.0**-32  # in (0, 1): erfinv stays finite
    z = torch.erfinv(u * 2.0 - 1.0) * math.sqrt(2.0)
    return z.to(dtype).reshape(shape)


# --- the update-probability schedule ------------------------------------------------------------


@dataclass(frozen=True)
class UpdateSchedule:
    """How often the factors are fitted: probability ``clamp(max_prob · exp(-decay (n -
    flat_start)), min_prob, max_prob)`` at the step after ``n`` steps (kron-torch's and
    pytorch_optimizer's default: 1 for 500 steps, then decaying to 0.03 by step ~4000).

    The probability is spent deterministically, as heavyball does: step ``t`` fits when the
    accumulated probability ``S(t) = Σ_{n<t} p(n)`` crosses an integer. Every replica and every
    resumed run then agrees without a random draw, and the count of fits is ``floor(S(t))``,
    what a random schedule gives on average.
    """

    max_prob: float = 1.0
    min_prob: float = 0.03
    decay: float = 0.001
    flat_start: int = 500

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_prob <= self.max_prob <= 1.0:
            raise ValueError(
                "UpdateSchedule needs 0 <= min_prob <= max_prob <= 1, got "
                f"min_prob={self.min_prob!r}, max_prob={self.max_prob!r}"
            )
        if not (math.isfinite(self.decay) and self.decay >= 0.0):
            raise ValueError(
                f"UpdateSchedule: decay must be a finite number >= 0, got {self.decay!r}"
            )
        if (
            isinstance(self.flat_start, bool)
            or not isinstance(self.flat_start, int)
            or (self.flat_start < 0)
        ):
            raise ValueError(
                f"UpdateSchedule: flat_start must be an integer >= 0, got {self.flat_start!r}"
            )

    def probability(self, n: int) -> float:
        """The probability of a fit at the step after ``n`` steps."""
        return _probability(self.max_prob, self.min_prob, self.decay, self.flat_start, n)

    def accumulated(self, t: int) -> float:
        """``S(t) = Σ_{n<t} p(n)`` (closed form)."""
        return _accumulated(self.max_prob, self.min_prob, self.decay, self.flat_start, t)

    def due(self, t: int) -> bool:
        """Whether step ``t`` (1-based) fits the preconditioner."""
        return int(self.accumulated(t)) > int(self.accumulated(t - 1))


def _probability(max_prob: float, min_prob: float, decay: float, flat_start: int, n: int) -> float:
    p = max_prob * math.exp(-decay * (n - flat_start))
    return min(max(p, min_prob), max_prob)


def _accumulated(max_prob: float, min_prob: float, decay: float, flat_start: int, t: int) -> float:
    """``Σ_{n<t} p(n)`` in closed form: a pure function of numbers (no cache, no state), so
    that ``torch.compile`` folds it on the host's step count like any arithmetic.

    ``p(n) = max_prob`` for ``n <= flat_start``, ``max_prob e^(-decay k)`` at ``k = n -
    flat_start`` until it first drops to ``min_prob`` at ``k = K``, ``min_prob`` after that.
    """
    if t <= 0:
        return 0.0
    flat = min(t, flat_start + 1)
    total = flat * max_prob
    if decay == 0.0 or min_prob >= max_prob:
        return total + (t - flat) * max_prob
    if min_prob > 0.0:
        # K: the first k >= 1 with max_prob e^(-decay k) <= min_prob (exactly as p computes it).
        k_end = max(1, math.ceil(math.log(max_prob / min_prob) / decay))
        while k_end > 1 and max_prob * math.exp(-decay * (k_end - 1)) <= min_prob:
            k_end -= 1
        while max_prob * math.exp(-decay * k_end) > min_prob:
            k_end += 1
    else:
        k_end = t + 1  # never reaches zero
    steps = t - flat  # n = flat_start + 1 .. t - 1, i.e. k = 1 .. steps
    decaying = min(steps, k_end - 1)
    if decaying > 0:
        # max e^(-d) (1 - e^(-d m)) / (1 - e^(-d)), through expm1 for small d.
        ratio = math.expm1(-decay * decaying) / math.expm1(-decay)
        total += max_prob * math.exp(-decay) * ratio
    return total + max(0, steps - decaying) * min_prob


def fit_due(probability: float | UpdateSchedule | Mapping[str, Any], t: int) -> bool:
    """Whether step ``t`` (1-based) fits the factors: a constant probability ``p`` fits when
    ``p · t`` crosses an integer (``p = 1``: every step), a schedule (or the mapping of its
    fields that a param group keeps) as it says."""
    if isinstance(probability, UpdateSchedule):
        probability = asdict(probability)
    if isinstance(probability, Mapping):
        fields = (
            probability["max_prob"],
            probability["min_prob"],
            probability["decay"],
            probability["flat_start"],
        )
        return int(_accumulated(*fields, t)) > int(_accumulated(*fields, t - 1))
    return int(probability * t) > int(probability * (t - 1))


def clip_rms_(update: Tensor, limit: float | None) -> Tensor:
    """Scale ``update`` down, in place, to RMS at most ``limit`` (kron's ``1.1 / (rms + 1e-6)``
    clip; ``None``: no clip)."""
    if limit is None:
        return update
    size = update.square().mean().sqrt()
    return update.mul_(torch.clamp(limit / (size + 1e-6), max=1.0))
