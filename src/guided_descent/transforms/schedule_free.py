"""Schedule-free averaging (Defazio et al. 2024, arXiv 2405.15682): the pieces shared by every
schedule-free optimizer of the library.

A schedule-free method keeps three sequences per parameter::

    y_t     = (1 - β) z_t + β x_t                  # where the gradient is taken
    z_{t+1} = z_t - γ_t · direction(g(y_t))        # the base method's iterate (SGD, Adam, Muon ...)
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}  # a weighted average of the z's: evaluate here

Two of them are stored: the parameter holds ``y`` while training (``x`` while evaluating), and
``z`` is optimizer state; the third follows from ``y = (1 - β) z + β x``:

* ``x = (y - (1 - β) z) / β``: ``y.lerp_(z, 1 - 1/β)`` (:func:`to_average_`);
* ``y = β x + (1 - β) z``: ``x.lerp_(z, 1 - β)`` (:func:`to_interpolation_`).

Both are one rounding each; a round trip ``y -> x -> y`` is exact only up to that rounding, which
is why :meth:`~guided_descent.optimizers.schedule_free.ScheduleFreeModes.averaged` copies ``y``
aside instead of converting back.

**Averaging weights** (:func:`averaging_weight`): ``c_{t+1} = w_t / Σ_{i<=t} w_i`` with
``w_t = (t + 1)^r · lr_max_t^p``, where ``lr_max_t`` is the largest learning rate used so far and
``p = weight_lr_power``. With a constant learning rate and ``r = 0`` this is the uniform average
``c_{t+1} = 1/(t + 1)``; during a warm-up, ``p = 2`` gives the paper's ``c_{t+1} = γ_t² / Σ γ_i²``
(the small-lr early iterates count less). The formula and the running maximum are those of the
``schedulefree`` package (v1.4), so that a learning-rate warm-up set by a scheduler is weighted
exactly as the package's built-in ``warmup_steps``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor


def averaging_weight(
    k: int, lr: float, lr_max: float, weight_sum: float, r: float, weight_lr_power: float
) -> tuple[float, float, float]:
    """``(c, lr_max, weight_sum)`` after step ``k`` (0-based) taken at learning rate ``lr``.

    ``c`` is the weight of the new ``z`` in the average ``x``; ``lr_max`` and ``weight_sum`` are
    the updated running values to keep. ``c = 0`` while every weight so far is 0 (a learning rate
    of 0 leaves ``x`` where it is). Python floats throughout, like the package, so that the
    weights are bit-identical to its.
    """
    lr_max = max(lr, lr_max)
    weight = (k + 1) ** r * lr_max**weight_lr_power
    weight_sum = weight_sum + weight
    c = weight / weight_sum if weight_sum != 0 else 0.0
    return c, lr_max, weight_sum


def to_average_(y: Tensor, z: Tensor, beta: float) -> Tensor:
    """``y -> x = (y - (1 - β) z) / β`` in place (``β`` in (0, 1))."""
    return y.lerp_(z, 1.0 - 1.0 / beta)


def to_interpolation_(x: Tensor, z: Tensor, beta: float) -> Tensor:
    """``x -> y = β x + (1 - β) z`` in place."""
    return x.lerp_(z, 1.0 - beta)


def swap_(a: Tensor, b: Tensor) -> None:
    """Exchange the contents of ``a`` and ``b`` in place, bit for bit.

    The parameter must stay the same tensor (models, DDP and compiled graphs hold it), so its
    values move rather than its storage. Contiguous tensors swap by three XORs of their bytes
    (no allocation); others through a copy of one of them.
    """
    if a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype:
        # view(-1) first: a 0-d tensor cannot be viewed as bytes directly.
        ab, bb = a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        ab.bitwise_xor_(bb)
        bb.bitwise_xor_(ab)
        ab.bitwise_xor_(bb)
        return
    kept = a.clone()
    a.copy_(b)
    b.copy_(kept)


def _rms(delta_norm: Tensor, numel: int) -> Tensor:
    norm = delta_norm.to(torch.promote_types(delta_norm.dtype, torch.float32))
    return norm / math.sqrt(numel) if numel else norm * 0.0


def interpolated_step_(
    ys: Sequence[Tensor],
    zs: Sequence[Tensor],
    directions: Sequence[Tensor],
    *,
    lr: float,
    beta: float,
    c: float,
    foreach: bool = False,
) -> list[Tensor]:
    """One schedule-free step for a base step ``z -= lr · d``, with ``y`` updated directly.

    With ``d`` the base direction (SGD: the gradient at ``y``; Adam: the gradient over
    ``√v̂ + eps``; plus ``wd · y`` for weight decay taken at ``y``)::

        y <- (1 - c) y + c z + lr (β (1 - c) - 1) d      # = (1 - β) z_new + β x_new
        z <- z - lr d

    which is the three-sequence update above without forming ``x``. The operations, and their
    order, are the ``schedulefree`` package's (v1.4), so the results are bit-identical to it for
    the same path (``foreach`` or not). ``ys`` are updated in place (the parameters), ``zs`` too;
    ``directions`` are read only. Returns the RMS of each step of ``y`` as a 0-d tensor (for
    diagnostics), from the difference of the new and the old ``y`` (one rounding).

    Memory: one tensor the size of a parameter at a time; with ``foreach``, the new ``y`` of
    the whole bucket at once.
    """
    alpha = lr * (beta * (1.0 - c) - 1.0)
    if not foreach:
        out = []
        for y, z, d in zip(ys, zs, directions, strict=True):
            new = torch.lerp(y, z, c).add_(d, alpha=alpha)  # the package's y.lerp_(); y.add_()
            out.append(_rms(torch.linalg.vector_norm(y.sub_(new)), y.numel()))  # -(step)
            y.copy_(new)
            z.sub_(d, alpha=lr)
        return out
    # _foreach kernels need one device and dtype per call.
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, y in enumerate(ys):
        buckets[(y.device, y.dtype)].append(i)
    rms: list[Tensor | None] = [None] * len(ys)
    for idx in buckets.values():
        yb = [ys[i] for i in idx]
        zb = [zs[i] for i in idx]
        db = [directions[i] for i in idx]
        new = torch._foreach_lerp(yb, zb, c)
        torch._foreach_add_(new, db, alpha=alpha)
        # The old y is not needed past here: its buffer takes the step, then the new values.
        torch._foreach_sub_(yb, new)  # -(step), one rounding
        for i, norm in zip(idx, torch._foreach_norm(yb, 2.0), strict=True):
            rms[i] = _rms(norm, ys[i].numel())
        torch._foreach_copy_(yb, new)
        torch._foreach_sub_(zb, db, alpha=lr)
    return rms  # type: ignore[return-value]  # every index was filled by its bucket
