"""Range checks for hyper-parameters, by key, with messages that name the value and the range.

torch validates some of these itself, but not all (e.g. ``momentum=1.5`` or ``lr=nan`` pass), and
its messages do not say which optimizer or which param group was at fault. Checks apply by key, so
an optimizer that has no ``betas`` is never asked about them. One key means one thing in every
optimizer of the library (``damping`` is K-FAC's and natural gradient's Tikhonov term, both >= 0),
so a key's check lives here once and :func:`guided_descent.create` runs it before building
anything; constructors run the same checks for users who build a class directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from numbers import Real
from typing import Any

import torch

from guided_descent.preconditioners.natural_gradient import OUTPUT_LOSSES
from guided_descent.preconditioners.orthogonalize import ADJUST_LR, MUON_VARIANTS
from guided_descent.preconditioners.views import parse_view
from guided_descent.transforms.grafting import GRAFTINGS
from guided_descent.transforms.state_dtype import check_state_dtype

Check = Callable[[str, Any], None]

# What a step does when a gradient holds NaN or Inf (see guided_descent.optimizers.guard).
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "raise", "off")


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value.item())
    return None


def nonneg(what: str) -> Check:
    def check(owner: str, value: Any) -> None:
        x = _as_float(value)
        if x is None or not math.isfinite(x) or x < 0:
            raise ValueError(f"{owner}: {what} must be a finite number >= 0, got {value!r}")

    return check


def positive(what: str) -> Check:
    def check(owner: str, value: Any) -> None:
        x = _as_float(value)
        if x is None or not math.isfinite(x) or x <= 0:
            raise ValueError(f"{owner}: {what} must be a finite number > 0, got {value!r}")

    return check


def unit_interval(what: str) -> Check:
    def check(owner: str, value: Any) -> None:
        x = _as_float(value)
        if x is None or not 0.0 <= x < 1.0:
            raise ValueError(f"{owner}: {what} must be in [0, 1), got {value!r}")

    return check


def positive_int(what: str) -> Check:
    def check(owner: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {what} must be an integer >= 1, got {value!r}")

    return check


def nonneg_int(what: str) -> Check:
    def check(owner: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}: {what} must be an integer >= 0, got {value!r}")

    return check


def one_of(what: str, choices: Iterable[Any]) -> Check:
    allowed = tuple(choices)

    def check(owner: str, value: Any) -> None:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{owner}: {what} must be one of {allowed}, got {value!r}")

    return check


def optional(check: Check) -> Check:
    """``check``, but ``None`` is accepted too (e.g. ``kl_clip=None`` turns clipping off)."""

    def optional_check(owner: str, value: Any) -> None:
        if value is not None:
            try:
                check(owner, value)
            except ValueError as err:
                raise ValueError(f"{err} (or None)") from None

    return optional_check


def _boolean(what: str) -> Check:
    def check(owner: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"{owner}: {what} must be a bool, got {value!r}")

    return check


def _betas(owner: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {value!r}")
    for i, b in enumerate(value):
        x = _as_float(b)
        if x is None or not 0.0 <= x < 1.0:
            raise ValueError(f"{owner}: betas[{i}] must be in [0, 1), got {b!r} in betas={value!r}")


def _eps(owner: str, value: Any) -> None:
    # Adafactor's eps is a pair (eps1 or None, eps2); the others take one number.
    if isinstance(value, (tuple, list)):
        for v in value:
            if v is not None:
                nonneg("eps")(owner, v)
        return
    nonneg("eps")(owner, value)


def _matrix_view(owner: str, value: Any) -> None:
    try:
        parse_view(value)
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None


def _float_dtype(owner: str, value: Any) -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(
            f"{owner}: ns_dtype must be None or a floating torch.dtype, got {value!r}"
        )


def _growth_rate(owner: str, value: Any) -> None:
    # Prodigy's cap on the growth of its estimate per step; inf (no cap) is its default.
    x = _as_float(value)
    if x is None or math.isnan(x) or x <= 0:
        raise ValueError(
            f"{owner}: growth_rate must be a number > 0 (inf: unlimited), got {value!r}"
        )


CHECKS: dict[str, Check] = {
    # first-order (torch.optim names)
    "lr": nonneg("lr (learning rate)"),
    "eps": _eps,
    "weight_decay": nonneg("weight_decay"),
    "momentum": unit_interval("momentum"),
    "dampening": unit_interval("dampening"),
    "nesterov": _boolean("nesterov"),
    "alpha": unit_interval("alpha (RMSprop smoothing)"),
    "betas": _betas,
    "lr_decay": nonneg("lr_decay"),
    "momentum_decay": nonneg("momentum_decay"),
    "initial_accumulator_value": nonneg("initial_accumulator_value"),
    # every optimizer of the library
    "on_nonfinite": one_of("on_nonfinite", NONFINITE_POLICIES),
    # where an optimizer defines them (Lion, Muon): guided_descent.transforms.cautious
    "cautious": _boolean("cautious"),
    "cautious_weight_decay": _boolean("cautious_weight_decay"),
    # where an optimizer defines it (Lion, Muon, ...): guided_descent.transforms.state_dtype
    "state_dtype": check_state_dtype,
    # Muon
    "ns_steps": positive_int("ns_steps"),
    "ns_dtype": _float_dtype,
    "adjust_lr": one_of("adjust_lr", ADJUST_LR),
    "matrix_view": _matrix_view,
    "variant": one_of("variant (Muon's)", MUON_VARIANTS),
    "beta2": unit_interval("beta2 (NorMuon's / AdaMuon's second-moment decay)"),
    # Shampoo and SOAP
    "precondition_frequency": positive_int("precondition_frequency"),
    "stagger_refresh": _boolean("stagger_refresh"),
    "start_preconditioning_step": optional(positive_int("start_preconditioning_step")),
    "max_preconditioner_dim": positive_int("max_preconditioner_dim"),
    "max_factor_dim": positive_int("max_factor_dim"),
    "max_precond_dim": nonneg_int("max_precond_dim"),
    "epsilon": positive("epsilon (inverse-root damping)"),
    "relative_epsilon": nonneg("relative_epsilon (inverse-root damping relative to λ_max)"),
    "grafting": one_of("grafting", GRAFTINGS),
    "shampoo_beta": optional(unit_interval("shampoo_beta")),
    "tiebreak": nonneg("tiebreak (SOAP's first-basis tie-breaking, relative to ‖F‖)"),
    "refresh_shift": nonneg("refresh_shift (SOAP's power-step shift, relative to tr F / n)"),
    # AdEMAMix, MARS and ADOPT
    # beta3 is AdEMAMix's slow-EMA decay and Prodigy's step-size statistics decay (None there:
    # sqrt(beta2)); one check serves both, and AdEMAMix's None is refused in its own __init__.
    "beta3": optional(unit_interval("beta3 (AdEMAMix's slow-EMA decay, Prodigy's decay of its "
                                    "step-size statistics)")),
    "alpha_slow": nonneg("alpha_slow (AdEMAMix's slow-EMA weight)"),
    "alpha_warmup": optional(positive_int("alpha_warmup")),
    "beta3_warmup": optional(positive_int("beta3_warmup")),
    "gamma": nonneg("gamma (MARS's variance-reduction strength)"),
    "clip_exponent": optional(nonneg("clip_exponent (ADOPT's clipping bound t**exponent)")),
    "init_factor": optional(positive("init_factor (KL-Shampoo's initial eigenvalue estimate)")),
    "inverse_root_clamp": optional(positive("inverse_root_clamp (KL-Shampoo's cap on d^-1/2)")),
    # K-FAC and natural gradient
    "damping": nonneg("damping"),
    "stat_decay": unit_interval("stat_decay"),
    "factor_frequency": positive_int("factor_frequency"),
    "inverse_frequency": positive_int("inverse_frequency"),
    "kl_clip": optional(positive("kl_clip")),
    "loss": one_of("loss", OUTPUT_LOSSES),
    "cg_iterations": positive_int("cg_iterations"),
    "cg_tolerance": nonneg("cg_tolerance"),
    # schedule-free averaging weights (t+1)^r · lr_max^weight_lr_power
    "r": nonneg("r (power of the step in the schedule-free averaging weights)"),
    "weight_lr_power": nonneg("weight_lr_power (power of lr in the schedule-free weights)"),
    # Prodigy
    "d0": positive("d0 (Prodigy's initial step-size estimate)"),
    "d_coef": positive("d_coef (factor on Prodigy's step-size estimate)"),
    "growth_rate": _growth_rate,
    "slice_p": positive_int("slice_p (Prodigy's statistics use every slice_p-th entry)"),
    "decouple": _boolean("decouple"),
    "use_bias_correction": _boolean("use_bias_correction"),
    "safeguard_warmup": _boolean("safeguard_warmup"),
}


def validate_hyperparams(owner: str, hyperparams: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming ``owner``, the key, the value and the accepted range."""
    for key, value in hyperparams.items():
        check = CHECKS.get(key)
        if check is not None:
            check(owner, value)
