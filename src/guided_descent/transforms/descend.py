"""Applying an update to a parameter: decoupled weight decay, then the step."""

from __future__ import annotations

from torch import Tensor


def descend_(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    """``p = p (1 - lr wd) - lr update`` in place, rounding to ``p``'s dtype once.

    ``update`` is float32 (or float64); a bfloat16 parameter is updated in the update's dtype and
    rounded at the end, so that small steps are not lost to two roundings.
    """
    if p.dtype == update.dtype:
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(update, alpha=-lr)
        return
    new = p.to(update.dtype)
    if weight_decay != 0.0:
        new.mul_(1.0 - lr * weight_decay)
    p.copy_(new.add_(update, alpha=-lr))
