"""Committing an update only where a device-side flag allows it, without a host sync.

A step whose gradients hold NaN or Inf must leave parameters and state untouched. Deciding that
on the host costs a device sync every step; deciding it on the device means computing the step
anyway and keeping the old values where the flag is false. :func:`commit_` is that keep:
``dst = where(ok, new, dst)``, exact in both directions (``new`` may hold NaN: ``where`` does not
propagate it, as ``dst + ok·(new − dst)`` would).
"""

from __future__ import annotations

import torch
from torch import Tensor


def commit_(dst: Tensor, new: Tensor, ok: Tensor | None) -> Tensor:
    """``dst = new`` where ``ok`` (a 0-d bool tensor), unchanged elsewhere; returns ``dst``.

    ``ok=None`` is an unconditional copy. ``new`` is rounded to ``dst``'s dtype once.
    """
    if ok is None:
        return dst.copy_(new)
    return dst.copy_(torch.where(ok, new, dst))


def count_(counter: Tensor, ok: Tensor | None) -> Tensor:
    """``counter += 1`` where ``ok`` (``ok=None``: always), in place, on the counter's device."""
    if ok is None:
        return counter.add_(1)
    return counter.add_(ok.to(device=counter.device, dtype=counter.dtype))


def bias_correction(beta: float, step: int | Tensor) -> float | Tensor:
    """``1 - beta**step``: a float for a host step count, a float64 0-d tensor for a device one.

    float64 on the device as well: in float32, ``beta`` itself rounds (0.999 is off by 1e-8) and
    ``1 - beta**1`` then carries a relative error of 1e-5, enough to move a preconditioner whose
    damping is tiny. Dividing a float32 tensor by the 0-d result keeps float32.
    """
    if isinstance(step, Tensor):
        return 1.0 - torch.pow(beta, step.to(torch.float64))
    return 1.0 - beta**step
