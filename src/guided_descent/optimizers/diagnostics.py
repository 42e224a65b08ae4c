"""What ``optimizer.diagnostics()`` reports, and the update sizes of torch's own rules.

Schema (every value JSON-serialisable; ``None`` where a fact does not apply or is not known)::

    {
      "optimizer": "Shampoo",        # the state-dict tag's name (class name)
      "state_format": 1,             # guided-descent state-dict format version
      "on_nonfinite": "skip",        # the non-finite gradient policy
      "steps": 118,                  # step() calls that updated the parameters
      "skipped_steps": 2,            # step() calls skipped for NaN/Inf gradients
      "last_skip": {"step": 97,      # the step() call that was skipped, and its culprits
                    "params": [{"index": 3, "name": None, "shape": [64, 32]}]} | None,
      ...                            # optimizer-specific extras (natural gradient: "last_solve")
      "params": [                    # one entry per parameter, in state_dict order
        {"index": 0, "group": 0, "name": "blocks.0.attn.weight" | None,
         "shape": [64, 32], "dtype": "float32", "algorithm": "shampoo",
         "update_rms": 1.3e-4,        # RMS of the last step lr * update (weight decay excluded)
         "preconditioner": "kronecker",   # kind, or None for diagonal / first-order rules
         "preconditioner_age": 3,     # steps since the last successful refresh
         "condition_number": 2.1e5,   # largest over the parameter's (damped) factors
         "failures": 0}               # failed refreshes / solves involving this parameter
      ]
    }

Per preconditioner kind:

==================  ==============================  ==========================================
preconditioner      condition_number                failures
==================  ==============================  ==========================================
``"kronecker"``     Shampoo: ``(F + εI)`` from the  inverse roots that failed (eigh did not
                    eigenvalues of each root        converge, NaN/Inf in a factor)
``"eigenbasis"``    SOAP: Rayleigh quotients of     eigendecompositions / QR refreshes that
                    the last QR refresh (undamped)  failed
``"kfac"``          damped ``A`` and ``S``, from    failed inversions + batches of non-finite
                    their eigenvalues               statistics left out of the factors
``"newton-schulz"`` Muon: ``None`` (no factors)     0 (finite in, finite out; nothing to keep)
``"conjugate-       natural gradient: Lanczos       CG solves that broke down (the iterate so
gradient"``         estimate for ``G + λI`` (joint) far, or the gradient, was used instead)
==================  ==============================  ==========================================

Condition numbers are capped at ``1/eps`` of the compute dtype ("numerically singular"; see
:func:`guided_descent.linalg.matrix_functions.condition_number`). The age is ``None`` before the
first successful refresh (and for Muon and natural gradient, which recompute every step).

``steps``, ``skipped_steps`` and the per-parameter ``failures`` and ``preconditioner_age`` are
saved in the state dict; ``update_rms``, ``condition_number`` and ``last_skip`` describe what this
process observed and are ``None`` after a resume until the next step or refresh.

**Update RMS, and what it costs.** Our own rules record the RMS of the update they apply as a
0-d tensor (one norm per parameter per step, no host sync). torch's rules (the torch-native
names) are not touched; their update is recomputed *on demand* here from the optimizer state:

* exact from state alone: Adam/AdamW (``lr·m̂/(√v̂+eps)``), SGD with heavy-ball momentum
  (``lr·buf``), RMSprop with momentum (``lr·buf``);
* from state and ``p.grad`` (so exact between ``step()`` and ``zero_grad()``, ``None`` once the
  gradient is gone): plain SGD, Nesterov SGD, NAdam, Adagrad, RMSprop without momentum,
  Adafactor. With L2 ``weight_decay`` (not decoupled) these use the parameter after the step in
  ``g + wd·p``, and Adafactor's scale uses the parameter's RMS after the step: both differ from
  the applied update by ``O(lr)`` relative terms.

Each costs a few elementwise passes over the state when ``diagnostics()`` is called, nothing per
step. All tensor values of one call are moved to the host together (one sync per device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from guided_descent.distributed.dtensor import is_dtensor
from guided_descent.transforms.descend import step_rms as rms

StepRMS = Callable[[Tensor, Mapping[str, Any], Mapping[str, Any]], Tensor | None]


def json_float(value: Any) -> float | None:
    """A plain float for JSON: ``None`` for ``None`` and for NaN/Inf (undefined or overflowed)."""
    if value is None:
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def materialize(entries: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Replace 0-d tensors under ``keys`` of every entry by :func:`json_float`, in place.

    Tensors are stacked per device and copied to the host once, instead of one ``.item()`` (one
    device sync) per value.
    """
    by_device: dict[torch.device, list[tuple[dict[str, Any], str, Tensor]]] = {}
    for entry in entries:
        for key in keys:
            value = entry.get(key)
            if isinstance(value, Tensor):
                by_device.setdefault(value.device, []).append((entry, key, value))
    for items in by_device.values():
        # A DTensor value (FSDP2) is reduced to its global value first.
        values = torch.stack(
            [
                (v.full_tensor() if is_dtensor(v) else v).detach().reshape(()).double()
                for _, _, v in items
            ]
        ).tolist()
        for (entry, key, _), x in zip(items, values, strict=True):
            entry[key] = json_float(x)


# --------------------------------------------------- torch-native rules: update RMS from state


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _lr(group: Mapping[str, Any]) -> float:
    return float(group["lr"])


def _grad_with_l2(p: Tensor, group: Mapping[str, Any]) -> Tensor | None:
    """``p.grad`` plus torch's coupled L2 term ``wd·p`` where the rule adds it to the gradient."""
    if p.grad is None:
        return None
    g = _wide(p.grad)
    wd = float(group.get("weight_decay", 0.0))
    if wd != 0.0 and not group.get("decoupled_weight_decay", False):
        g = g + wd * p.detach().to(g.dtype)
    return g


def _count(step: Tensor) -> Tensor:
    # torch keeps step counters on the CPU unless capturable/fused: there float64 is free and
    # 1 - 0.999^t loses nothing (float32 would be off by ~1e-5 relative for small t).
    return step.to(torch.float64 if step.device.type == "cpu" else torch.float32)


def _bias_correction(beta: float, step: Tensor) -> Tensor:
    return 1.0 - torch.pow(beta, _count(step))


def adam_step_rms(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    """Adam / AdamW: ``lr · (m/(1-β1^t)) / (√(v/(1-β2^t)) + eps)``, from state alone."""
    if "exp_avg" not in state:
        return None
    beta1, beta2 = (float(b) for b in group["betas"])
    step = state["step"]
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    m_hat = _wide(state["exp_avg"]) / _bias_correction(beta1, step)
    denom = (_wide(v) / _bias_correction(beta2, step)).sqrt_().add_(float(group["eps"]))
    return rms(m_hat / denom, _lr(group))


def sgd_step_rms(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    """SGD: ``lr·buf`` (heavy ball), ``lr·(g + μ·buf)`` (Nesterov), ``lr·g`` (plain)."""
    momentum = float(group.get("momentum", 0.0))
    buf = state.get("momentum_buffer")
    if momentum != 0.0 and buf is not None and not group.get("nesterov", False):
        return rms(buf, _lr(group))
    g = _grad_with_l2(p, group)
    if g is None:
        return None
    if momentum != 0.0 and buf is not None:
        g = g + momentum * buf.to(g.dtype)
    return rms(g, _lr(group))


def nadam_step_rms(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    """NAdam (Dozat 2016) as torch computes it; needs ``p.grad``."""
    g = _grad_with_l2(p, group)
    if g is None or "exp_avg" not in state:
        return None
    beta1, beta2 = (float(b) for b in group["betas"])
    t = _count(state["step"])
    psi = float(group["momentum_decay"])
    mu = beta1 * (1.0 - 0.5 * torch.pow(0.96, t * psi))
    mu_next = beta1 * (1.0 - 0.5 * torch.pow(0.96, (t + 1.0) * psi))
    mu_product = _count(state["mu_product"])
    denom = (_wide(state["exp_avg_sq"]) / _bias_correction(beta2, t)).sqrt_()
    denom = denom.add_(float(group["eps"]))
    update = g * ((1.0 - mu) / (1.0 - mu_product)) + _wide(state["exp_avg"]) * (
        mu_next / (1.0 - mu_product * mu_next)
    )
    return rms(update / denom, _lr(group))


def adagrad_step_rms(
    p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]
) -> Tensor | None:
    """Adagrad: ``lr/(1+(t-1)·lr_decay) · g/(√sum + eps)``; needs ``p.grad``."""
    g = _grad_with_l2(p, group)
    if g is None or "sum" not in state:
        return None
    t = _count(state["step"])
    lr = _lr(group) / (1.0 + (t - 1.0) * float(group["lr_decay"]))
    return rms(g / _wide(state["sum"]).sqrt().add_(float(group["eps"])), lr)


def rmsprop_step_rms(
    p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]
) -> Tensor | None:
    """RMSprop: ``lr·buf`` with momentum (from state), else ``lr·g/(√v + eps)`` (needs the grad)."""
    if float(group.get("momentum", 0.0)) > 0.0 and "momentum_buffer" in state:
        return rms(state["momentum_buffer"], _lr(group))
    g = _grad_with_l2(p, group)
    if g is None or "square_avg" not in state:
        return None
    v = _wide(state["square_avg"])
    if group.get("centered"):
        v = v - _wide(state["grad_avg"]).square()
    return rms(g / v.sqrt().add_(float(group["eps"])), _lr(group))


def adafactor_step_rms(
    p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]
) -> Tensor | None:
    """Adafactor as torch computes it: ``α · min(RMS(u), d)``, ``u = g/√v̂``; needs ``p.grad``."""
    if p.grad is None or "step" not in state:
        return None
    g = _wide(p.grad)
    eps1, eps2 = group["eps"]
    if eps1 is None:
        eps1 = torch.finfo(p.dtype).eps
    if g.dim() > 1:
        row, col = _wide(state["row_var"]), _wide(state["col_var"])
        var = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        var = _wide(state["variance"])
    u = var.clamp(min=eps1 * eps1).rsqrt_().mul_(g)
    t = _count(state["step"])
    rho = torch.clamp(t.rsqrt(), max=_lr(group))
    alpha = torch.clamp(rms(p.detach()), min=float(eps2)) * rho
    return alpha * torch.clamp(rms(u), max=float(group["d"]))


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """A few numbers from ``optimizer.diagnostics()`` for a log line (one per evaluation).

    ``update_rms``: the largest per-parameter update RMS; ``condition_number``: the largest
    preconditioner condition estimate; ``preconditioner_age``: the oldest preconditioner (steps
    since its last successful refresh); ``failures``: matrix-function failures summed over
    parameters. Values that no parameter reports are ``None``.
    """

    def largest(key: str) -> float | None:
        values = [e[key] for e in report["params"] if e.get(key) is not None]
        return max(values) if values else None

    return {
        "steps": report["steps"],
        "skipped_steps": report["skipped_steps"],
        "update_rms": largest("update_rms"),
        "condition_number": largest("condition_number"),
        "preconditioner_age": largest("preconditioner_age"),
        "failures": sum(int(e.get("failures") or 0) for e in report["params"]),
    }
