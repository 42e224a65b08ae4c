"""Range checks for the hyper-parameters that optimizers share, with messages that name the value.

torch validates some of these itself, but not all (e.g. ``momentum=1.5`` or ``lr=nan`` pass), and
its messages do not say which optimizer or which param group was at fault. Checks apply by key, so
an optimizer that has no ``betas`` is never asked about them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import torch


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value.item())
    return None


def nonneg(what: str) -> Callable[[str, Any], None]:
    def check(owner: str, value: Any) -> None:
        x = _as_float(value)
        if x is None or not math.isfinite(x) or x < 0:
            raise ValueError(f"{owner}: {what} must be a finite number >= 0, got {value!r}")

    return check


def unit_interval(what: str) -> Callable[[str, Any], None]:
    def check(owner: str, value: Any) -> None:
        x = _as_float(value)
        if x is None or not 0.0 <= x < 1.0:
            raise ValueError(f"{owner}: {what} must be in [0, 1), got {value!r}")

    return check


def _betas(owner: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {value!r}")
    for i, b in enumerate(value):
        x = _as_float(b)
        if x is None or not 0.0 <= x < 1.0:
            raise ValueError(f"{owner}: betas[{i}] must be in [0, 1), got {b!r} in betas={value!r}")


def positive_int(what: str) -> Callable[[str, Any], None]:
    def check(owner: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {what} must be an integer >= 1, got {value!r}")

    return check


def _eps(owner: str, value: Any) -> None:
    # Adafactor's eps is a pair (eps1 or None, eps2); the others take one number.
    if isinstance(value, (tuple, list)):
        for v in value:
            if v is not None:
                nonneg("eps")(owner, v)
        return
    nonneg("eps")(owner, value)


CHECKS: dict[str, Callable[[str, Any], None]] = {
    "lr": nonneg("lr (learning rate)"),
    "eps": _eps,
    "weight_decay": nonneg("weight_decay"),
    "momentum": unit_interval("momentum"),
    "dampening": unit_interval("dampening"),
    "alpha": unit_interval("alpha (RMSprop smoothing)"),
    "betas": _betas,
    "lr_decay": nonneg("lr_decay"),
    "momentum_decay": nonneg("momentum_decay"),
    "initial_accumulator_value": nonneg("initial_accumulator_value"),
}


def validate_hyperparams(owner: str, hyperparams: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming ``owner``, the key and the value for any out-of-range entry."""
    for key, value in hyperparams.items():
        check = CHECKS.get(key)
        if check is not None:
            check(owner, value)
