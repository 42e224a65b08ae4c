"""K-FAC's mathematics as free functions of tensors (Martens & Grosse 2015, arXiv 1503.05671).

A layer computes ``s = W ā`` for each example, where ``ā`` is its input with a trailing ``1``
when the bias is folded into ``W`` as a last column (``W`` is ``(d_out, d_in [+1])``). With
``δ = ∂ℓ/∂s`` the gradient of one example's loss, the layer's Fisher block is
``E[(ā āᵀ) ⊗ (δ δᵀ)]``; K-FAC replaces it by ``A ⊗ S`` with::

    A = E[ā āᵀ]          (d_in [+1]) x (d_in [+1])     activation factor
    S = E[δ δᵀ]          d_out x d_out                  output-gradient factor

and preconditions the gradient matrix ``G = ∂L/∂W`` by the factored Tikhonov-damped inverse::

    π   = sqrt((tr A / dim A) / (tr S / dim S))        # balances the damping between factors
    U   = (S + √λ/π · I)⁻¹ G (A + π√λ · I)⁻¹         # = ((A + π√λ I) ⊗ (S + √λ/π I))⁻¹ vec(G)

(column-major ``vec``; with row-major flattening the Kronecker order is ``S ⊗ A``).

**Which expectation.** ``A`` and ``S`` are second moments *per row* of the layer: ``ā`` is a row
of its input, ``δ`` the gradient of that row's own loss at its output. The gradient ``g`` that
back-propagation delivers at the output is ``δ`` itself when the training loss is a *sum* over the
rows (``loss_reduction="sum"``) and ``δ / N`` when it is a *mean* over the ``N`` rows behind the
step (``"mean"``, torch's default reduction): :func:`per_example_outer_sum` turns the raw
``Σ g gᵀ`` into ``Σ δ δᵀ`` with the count of the whole batch, which is why that sum and the count
are recorded over every micro-batch of a step and rescaled once (rescaling each micro-batch by its
own size would make ``S`` ``k²`` too small under ``(loss / k).backward()`` accumulation).

* ``nn.Linear`` on ``(..., d_in)``: every leading index is a row (a token of a sequence counts as
  one), ``A`` and ``S`` are means over those rows: ``N`` counts rows.
* ``nn.Conv2d`` (Grosse & Martens 2016, arXiv 1602.01407, "KFC"): ``ā`` ranges over the unfolded
  input patches at every output position. ``A`` averages ``ā āᵀ`` over examples *and* spatial
  positions; ``S`` sums ``δ δᵀ`` over positions and averages over examples: ``N`` counts
  examples (a mean loss is a mean over examples). Their product equals KFC's ``Ω ⊗ Γ`` (sum over
  positions in ``Ω``, mean in ``Γ``), i.e. the Fisher under the spatial-homogeneity and
  spatially-uncorrelated-derivatives approximations.

Statistics are kept in float32 (float64 for float64 layers) whatever the layer's dtype: a bf16
outer product of 8-bit mantissas would round the small eigenvalues that the inverse amplifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guided_descent.linalg.matrix_functions import condition_number, eigh, matrix_power_from_eigh

Likelihood = Literal["categorical", "gaussian"]
LIKELIHOODS: tuple[str, ...] = get_args(Likelihood)
LossReduction = Literal["mean", "sum"]
LOSS_REDUCTIONS: tuple[str, ...] = get_args(LossReduction)


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factor statistics are kept in: float64 for float64 layers, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _append_ones(rows: Tensor) -> Tensor:
    # The folded bias is a weight on a constant input 1.
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


# ---------------------------------------------------------------------------------- activations


def linear_input_rows(x: Tensor, fold_bias: bool) -> Tensor:
    """Rows ``ā`` of an ``nn.Linear`` input ``(..., d_in)``: ``(M, d_in [+1])`` in float32/64."""
    rows = x.detach().reshape(-1, x.shape[-1]).to(statistics_dtype(x.dtype))
    return _append_ones(rows) if fold_bias else rows


@dataclass(frozen=True)
class ConvGeometry:
    """How an ``nn.Conv2d`` slides over its input; ``padding`` is ``(left, right, top, bottom)``."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]
    padding_mode: str

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                pad = (0, 0, 0, 0)
            else:  # "same": the left/top side gets the smaller half, as nn.Conv2d does
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            ph, pw = conv.padding
            pad = (pw, pw, ph, ph)
        return cls(
            kernel_size=(kh, kw),
            stride=tuple(conv.stride),  # type: ignore[arg-type]
            dilation=(dh, dw),
            padding=pad,
            padding_mode=conv.padding_mode,
        )


def conv2d_input_rows(x: Tensor, geometry: ConvGeometry, fold_bias: bool) -> Tensor:
    """Unfolded patches of an ``nn.Conv2d`` input ``(N, C, H, W)``: ``(N·L, C·kh·kw [+1])``.

    ``L`` is the number of output positions; a patch is ordered like ``weight.view(d_out, -1)``'s
    columns (channel-major, then kernel rows and columns), so ``rows @ W.view(d_out, -1)ᵀ`` is the
    convolution's output.
    """
    x = x.detach().to(statistics_dtype(x.dtype))
    if x.dim() == 3:  # an unbatched (C, H, W) input is one example
        x = x.unsqueeze(0)
    if any(geometry.padding):
        mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
        x = F.pad(x, geometry.padding, mode=mode)
    patches = F.unfold(  # (N, C·kh·kw, L)
        x, geometry.kernel_size, dilation=geometry.dilation, stride=geometry.stride
    )
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return _append_ones(rows) if fold_bias else rows


# ------------------------------------------------------------------------- output gradients


def linear_output_grad_rows(grad: Tensor) -> tuple[Tensor, int]:
    """Rows ``g`` of the gradient at a Linear output ``(..., d_out)``, as back-propagated.

    Returns ``(rows (M, d_out) float32/64, M)``; :func:`per_example_outer_sum` turns the
    ``Σ g gᵀ`` of a whole step into the per-row ``Σ δ δᵀ``.
    """
    rows = grad.detach().reshape(-1, grad.shape[-1]).to(statistics_dtype(grad.dtype))
    return rows, rows.shape[0]


def conv2d_output_grad_rows(grad: Tensor) -> tuple[Tensor, int]:
    """Rows ``g`` at every position of a Conv2d output gradient ``(N, d_out, H', W')``.

    Returns ``(rows (N·H'·W', d_out) float32/64, N)``: the count is of *examples*, so that
    ``S = Σ δ δᵀ / N`` sums over positions and averages over examples (KFC's convention, see the
    module docstring).
    """
    grad = grad.detach().to(statistics_dtype(grad.dtype))
    if grad.dim() == 3:
        grad = grad.unsqueeze(0)
    rows = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
    return rows, grad.shape[0]


def check_loss_reduction(owner: str, reduction: object) -> None:
    """Raise ``ValueError`` naming ``reduction`` unless it is one of :data:`LOSS_REDUCTIONS`."""
    if not isinstance(reduction, str) or reduction not in LOSS_REDUCTIONS:
        raise ValueError(
            f"{owner}: loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}"
        )


def per_example_outer_sum(grad_outer_sum: Tensor, count: int, reduction: LossReduction) -> Tensor:
    """``Σ δ δᵀ`` of per-example output gradients from ``Σ g gᵀ`` of back-propagated ones.

    ``grad_outer_sum`` is ``Σ g gᵀ`` over every row of the backward passes of *one* loss (all
    micro-batches of a step, for a loss divided by their number), ``count`` the number ``N`` of
    rows (Linear) or examples (Conv2d) that loss is reduced over. A mean loss delivers
    ``g = δ / N``, so the sum is scaled by ``N²``; a summed loss delivers ``δ`` itself. The result
    divided by ``count`` is ``S``.
    """
    check_loss_reduction("per_example_outer_sum", reduction)
    if reduction == "sum":
        return grad_outer_sum
    return grad_outer_sum * float(count) ** 2


# ------------------------------------------------------------------------------ factor algebra


def update_ema(running: Tensor | None, batch: Tensor, decay: float) -> Tensor:
    """``decay * running + (1 - decay) * batch``; the first batch initializes the average."""
    if running is None:
        return batch.clone()
    return running.mul(decay).add_(batch, alpha=1.0 - decay)


def pi_balance(A: Tensor, S: Tensor) -> float:
    """π = sqrt((tr A / dim A) / (tr S / dim S)), the damping split of Martens & Grosse §6.3.

    It minimizes the norm of the cross terms that factored damping adds. A factor with zero
    trace (e.g. all-zero gradients) gives π = 1: there is nothing to balance.
    """
    a = float(A.diagonal().sum()) / A.shape[0]
    s = float(S.diagonal().sum()) / S.shape[0]
    if not (a > 0.0 and s > 0.0 and math.isfinite(a) and math.isfinite(s)):
        return 1.0
    return math.sqrt(a / s)


class DampedInverses(NamedTuple):
    """The two damped inverses of a layer and the larger condition number of the damped factors
    (a 0-d tensor, read off the eigenvalues the inverses were computed from)."""

    A_inv: Tensor
    S_inv: Tensor
    condition: Tensor


def damped_inverses(A: Tensor, S: Tensor, damping: float) -> DampedInverses:
    """``((A + π√λ I)⁻¹, (S + √λ/π I)⁻¹)`` through the canonical :func:`eigh`, and their condition.

    The eigendecomposition clamps rounding-negative eigenvalues to 0 before damping, so the
    inverses stay symmetric positive definite. Raises ``MatrixFunctionError`` when a
    decomposition fails or an undamped factor is singular (``damping = 0``).
    """
    if not (isinstance(damping, (int, float)) and 0.0 <= damping < math.inf):
        raise ValueError(f"damped_inverses: damping must be a finite number >= 0, got {damping!r}")
    pi = pi_balance(A, S)
    root = math.sqrt(damping)
    a_vals, a_vecs = eigh(A)
    s_vals, s_vecs = eigh(S)
    a_damping, s_damping = pi * root, root / pi
    condition = torch.maximum(
        condition_number(a_vals.clamp_min(0.0) + a_damping),
        condition_number(s_vals.clamp_min(0.0) + s_damping).to(a_vals.dtype),
    )
    return DampedInverses(
        matrix_power_from_eigh(a_vals, a_vecs, -1.0, a_damping),
        matrix_power_from_eigh(s_vals, s_vecs, -1.0, s_damping),
        condition,
    )


def gradient_matrix(
    weight_grad: Tensor | None,
    bias_grad: Tensor | None,
    shape: tuple[int, int],
    fold_bias: bool,
    like: Tensor,
) -> Tensor:
    """``G = [∂L/∂W | ∂L/∂b]`` as ``(d_out, d_in [+1])``, dtype and device of ``like``.

    ``shape`` is ``(d_out, d_in)`` of the weight seen as a matrix; a missing grad counts as 0.
    """
    d_out, d_in = shape
    if weight_grad is None:
        w = like.new_zeros(d_out, d_in)
    else:
        w = weight_grad.reshape(d_out, d_in).to(like.dtype)
    if not fold_bias:
        return w
    b = like.new_zeros(d_out) if bias_grad is None else bias_grad.to(like.dtype)
    return torch.cat([w, b.reshape(d_out, 1)], dim=1)


def precondition(G: Tensor, A_inv: Tensor, S_inv: Tensor) -> Tensor:
    """``S⁻¹ G A⁻¹`` for ``G`` ``(d_out, d_in [+1])``: the Kronecker-factored solve."""
    return S_inv @ G @ A_inv


def kl_clip_factor(predicted_kl: float, kl_clip: float | None) -> float:
    """ν = min(1, sqrt(kl_clip / predicted_kl)), where ``predicted_kl = lr² Σ ⟨G, U⟩``.

    The step ``Δθ = -lr ν U`` has ``Δθᵀ F̂ Δθ = lr² ν² Σ ⟨G, U⟩`` under the K-FAC matrix ``F̂``
    (``F̂ U = G``): twice the quadratic model's KL divergence, now at most ``kl_clip`` (the
    step-size control of Ba, Grosse & Martens 2017, ICLR, distributed K-FAC). ``None`` or a
    non-positive prediction (zero gradient) leaves the step unscaled.
    """
    if kl_clip is None or not predicted_kl > 0.0 or not math.isfinite(predicted_kl):
        return 1.0
    return min(1.0, math.sqrt(kl_clip / predicted_kl))


# ------------------------------------------------------------------------------- sampled Fisher


def sampled_nll(
    outputs: Tensor, likelihood: Likelihood, generator: torch.Generator | None = None
) -> Tensor:
    """The negative log-likelihood of targets drawn from the model's own predictive distribution.

    Its gradient, unlike that of the training loss, has the *true* Fisher as its second moment:
    ``E_y[∇ log p(y|x) ∇ log p(y|x)ᵀ] = F``. Targets are sampled without gradient; the returned
    loss is differentiable in ``outputs``.

    * ``"categorical"``: ``outputs`` are logits ``(N, C)`` or ``(N, C, *)`` (class dimension 1,
      as ``F.cross_entropy``); ``y ~ softmax``; the loss is the mean cross-entropy.
    * ``"gaussian"``: unit-variance regression on ``outputs`` ``(N, *)``; ``y = outputs + ε``,
      ``ε ~ N(0, I)``; the loss is ``½‖outputs − y‖²`` summed per example, averaged over ``N``.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    logits = outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if likelihood == "categorical":
        if logits.dim() < 2:
            raise ValueError(
                f"categorical sampling needs logits (N, C, *), got shape {tuple(outputs.shape)}"
            )
        with torch.no_grad():
            probs = torch.softmax(logits.detach().movedim(1, -1), dim=-1)  # (N, *, C)
            flat = probs.reshape(-1, probs.shape[-1])
            y = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
        return F.cross_entropy(logits, y)
    with torch.no_grad():
        noise = torch.randn(
            logits.shape, generator=generator, dtype=logits.dtype, device=logits.device
        )
        y = logits.detach() + noise
    return 0.5 * (logits - y).pow(2).sum() / max(logits.shape[0], 1)
