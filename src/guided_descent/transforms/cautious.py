"""Cautious steps: move only where the gradient agrees, decay only where the step already shrinks.

For a step ``p ← p - lr·u`` (``u``: the optimizer's update direction, ``g``: the gradient,
``λ``: the decoupled weight decay), two one-line modifications that any optimizer of the library
can switch on:

**Cautious masking** (Liang, Chen, Liu & Liu 2024, "Cautious Optimizers", arXiv 2411.16085)::

    φ = 1[u ⊙ g > 0]                        # coordinates where the step goes downhill
    u ← u ⊙ φ / max(mean(φ), 1e-3)          # drop the others, rescale by the kept fraction

so every coordinate of the step is a descent coordinate for the current gradient and, where all
agree, the step is unchanged. The rescaling is the one of the authors' current code
(``kyleliang919/C-Optim``: ``mask.div_(mask.mean().clamp_(min=1e-3))``, adopted from timm); the
paper's first version divided by ``mean(φ) + 1/numel`` (``numel / (nnz + 1)``), which shrinks the
step of a small tensor even when nothing is masked (a 4-entry bias by 20 %): pytorch_optimizer
still uses that form, heavyball uses ``numel / max(nnz, 1)``, equal to ours whenever at least one
coordinate in a thousand is kept.

**Cautious weight decay** (Chen et al. 2025, "Cautious Weight Decay", arXiv 2510.12402,
Algorithm 1)::

    p ← p - lr·(u + λ·1[u ⊙ p >= 0] ⊙ p)

decoupled decay only on the coordinates where the step itself moves ``p`` towards zero (or does
not move it); elsewhere the decay would fight the step. Here ``u`` is the step actually taken (after
cautious masking, when both are on), as in the paper. A zero step coordinate (one the mask
dropped) is decayed, by the paper's ``>=``; heavyball compares sign bits instead, so a masked
``+0`` there counts as agreeing with ``p >= 0`` only.

Both tests compare signs, not the products ``u·g`` and ``u·p``: a product of two small numbers can
underflow to zero (two bfloat16 entries of 1e-20), which would turn an agreeing coordinate into a
masked one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CAUTIOUS_OFF",
    "KEPT_FLOOR",
    "cautious_mask",
    "cautious_update",
    "decayed",
    "same_sign",
    "with_group_keys",
]

# What a param group saved before the cautious flags existed means: neither is on.
CAUTIOUS_OFF: dict[str, bool] = {"cautious": False, "cautious_weight_decay": False}

# The smallest kept fraction the rescaling divides by: a step whose coordinates almost all
# disagree with the gradient is scaled up by at most 1000x (C-Optim's clamp).
KEPT_FLOOR = 1e-3


def cautious_mask(update: Tensor, grad: Tensor) -> Tensor:
    """``φ / max(mean φ, 1e-3)`` with ``φ = 1[sign(update) = sign(grad) ≠ 0]``, in ``update``'s
    shape and in at least float32: the reciprocal of the kept fraction is not rounded to
    bfloat16 (up to 0.4 % off). No host sync: the kept fraction stays on the device.
    """
    dtype = torch.promote_types(update.dtype, torch.float32)
    keep = torch.sign(update) * torch.sign(grad).to(update.dtype) > 0  # bool, update's shape
    if update.numel() == 0:
        return keep.to(dtype)
    # The count is exact in int64; the fraction is formed in float64 and rounded once.
    kept = torch.count_nonzero(keep).to(torch.float64) / update.numel()
    scale = (1.0 / kept.clamp(min=KEPT_FLOOR)).to(dtype)
    return keep.to(dtype) * scale


def cautious_update(update: Tensor, grad: Tensor) -> Tensor:
    """``update`` with the coordinates that disagree with ``grad`` zeroed and the rest rescaled by
    the kept fraction (see the module docstring). A new tensor in at least float32 (a bfloat16
    update is rounded once, where the caller adds it to the parameter); neither input is
    modified."""
    return update * cautious_mask(update, grad)


def same_sign(update: Tensor, param: Tensor) -> Tensor:
    """``1[update ⊙ param >= 0]`` as a bool tensor: where cautious weight decay applies (a zero
    on either side counts as agreeing, as in the paper's ``>=``)."""
    return torch.sign(update) * torch.sign(param).to(update.dtype) >= 0


def decayed(
    param: Tensor, update: Tensor, decay: float, cautious: bool, *, inplace: bool
) -> Tensor:
    """``param · (1 - decay)`` (``decay = lr·λ``), everywhere or, ``cautious``, only where
    :func:`same_sign` holds for ``update`` (the step ``p -= lr·update`` about to be taken).

    ``inplace``: ``param`` is multiplied in place and returned; otherwise a new tensor in
    ``param``'s dtype is returned (``param`` itself when ``decay`` is 0, so the caller must not
    modify the result in place). Either way the product is formed in at least float32 and rounded
    to ``param``'s dtype once, so a bfloat16 parameter keeps a decay far below its resolution out
    of the factor (``1 - 1e-5`` is 1 in bfloat16).
    """
    if decay == 0.0:
        return param
    if not cautious:
        return param.mul_(1.0 - decay) if inplace else param.mul(1.0 - decay)
    dtype = torch.promote_types(param.dtype, torch.float32)
    on = torch.full((), 1.0 - decay, dtype=dtype, device=param.device)
    off = torch.ones((), dtype=dtype, device=param.device)
    factor = torch.where(same_sign(update, param), on, off)  # param's shape, float32/64
    if inplace:
        return param.mul_(factor)
    return param.mul(factor).to(param.dtype)


def with_group_keys(
    state_dict: Any, values: Mapping[str, Any], algorithm: str | None = None
) -> Any:
    """``state_dict`` with ``values`` filled into every param group that lacks one of them (only
    groups tagged ``algorithm``, when given): an optimizer state dict saved before those keys
    existed, made loadable under the strict group-key check. A shallow copy; the argument is not
    modified, and anything that is not a state dict is returned as it is (for the check to
    reject with its own message)."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if not isinstance(groups, list):
        return state_dict

    def fill(group: Any) -> Any:
        if not isinstance(group, Mapping) or all(k in group for k in values):
            return group
        if algorithm is not None and group.get("algorithm") != algorithm:
            return group
        return {**values, **group}

    return {**state_dict, "param_groups": [fill(g) for g in groups]}
