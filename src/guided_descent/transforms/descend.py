"""Applying an update to a parameter: decoupled weight decay, then the step; and its size."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guided_descent.transforms.masking import commit_


def step_rms(update: Tensor, lr: float | Tensor = 1.0) -> Tensor:
    """``lr · ‖update‖ / √numel``: the RMS of the step ``lr · update``, a 0-d tensor.

    Accumulated in float32 (float64 for float64 updates), without a host sync, so that optimizers
    can record it every step for diagnostics at the cost of one reduction. 0 for an empty update.
    """
    dtype = torch.float64 if update.dtype == torch.float64 else torch.float32
    if update.numel() == 0:
        return torch.zeros((), dtype=dtype, device=update.device)
    return torch.linalg.vector_norm(update, dtype=dtype) * (lr / math.sqrt(update.numel()))


def descend_(
    p: Tensor, update: Tensor, lr: float, weight_decay: float, ok: Tensor | None = None
) -> None:
    """``p = p (1 - lr wd) - lr update`` in place, rounding to ``p``'s dtype once.

    ``update`` is float32 (or float64); a bfloat16 parameter is updated in the update's dtype and
    rounded at the end, so that small steps are not lost to two roundings. With ``ok`` (a 0-d
    bool tensor) ``p`` changes only where it is true, without a host sync.
    """
    if ok is not None:
        new = p.to(update.dtype) if p.dtype != update.dtype else p
        if weight_decay != 0.0:
            new = new.mul(1.0 - lr * weight_decay)
        commit_(p, new.add(update, alpha=-lr), ok)
        return
    if p.dtype == update.dtype:
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(update, alpha=-lr)
        return
    new = p.to(update.dtype)
    if weight_decay != 0.0:
        new.mul_(1.0 - lr * weight_decay)
    p.copy_(new.add_(update, alpha=-lr))
