"""Schedule-free training (Defazio et al. 2024, arXiv 2405.15682): SGD, AdamW, and a wrapper that
makes any registered optimizer schedule-free.

The method and its three sequences ``x``, ``y``, ``z`` are described in
:mod:`guided_descent.transforms.schedule_free`. In short: the base method steps ``z`` with the
gradient taken at ``y = (1 - β) z + β x``, and ``x``, the point to evaluate, is a running average
of the ``z``'s. No learning-rate decay is needed: the average does what the decay would.

**Train and eval modes.** While training, the parameters hold ``y``; for evaluation (and for
a model to save and ship) they must hold ``x``. Every optimizer here has

* ``opt.eval()`` -- parameters to ``x``; ``opt.train()`` -- back to ``y`` (a lerp with ``z``
  each, no extra memory; the round trip is exact up to one rounding per element);
* ``with opt.averaged(): evaluate(model)`` -- ``x`` inside the block and ``y`` restored bit for
  bit after it (one copy of the parameters), so that evaluating never perturbs training;
* ``opt.training`` -- the mode. ``step()`` in eval mode raises.

The optimizers start in train mode (before the first step ``x = y = z``, so the modes coincide).
The mode is saved per param group in the state dict, beside the parameters the model's state
dict holds at that moment: a checkpoint taken in either mode resumes exactly (load both, then
``opt.train()`` if it was saved in eval mode, as the uninterrupted run would have).

**Batch norm.** Running statistics gathered in training describe ``y``; for evaluation at ``x``
recompute them (``torch.optim.swa_utils.update_bn`` inside ``opt.averaged()``).

**With** :class:`guided_descent.EMA`: ``x`` is already an average, so an EMA is usually not
needed. To keep one of ``x``, update it at ``x``: ``with opt.averaged(): ema.update()`` (one copy
of the parameters per update). ``ema.swapped()`` works in either mode, but switch the
optimizer's mode outside it: inside, the live parameters are the EMA's, not ``y`` or ``x``.

**Warm-up, and no schedule.** Use a constant learning rate: a decaying schedule is what the
average replaces. A warm-up helps as usual and is an ordinary scheduler outside ``step``
(DESIGN rule 3), e.g. ``gd.schedules.scheduler(opt, LinearWarmup(W - 1, start=1 / W))`` -- the
package's ``warmup_steps=W`` exactly (``lr·(t+1)/W`` for ``t < W``). The averaging weights follow
the learning rate (``c ∝ lr_max²``), so warm-up iterates count less, as in the paper.

**What is reused.** The ``schedulefree`` package (Meta, v1.4.1) is the reference the tests run
against, bit for bit: :func:`~guided_descent.transforms.schedule_free.interpolated_step_` performs
its operations in its order. We do not return its classes: their step writes the normalized
gradient into ``p.grad`` (DESIGN rule 3: ``p.grad`` is never modified; keeping that around the
package costs a gradient-sized copy every step), they start in eval mode and raise a bare
``Exception`` when stepped in it, and the library depends on torch alone. Its
``ScheduleFreeWrapper`` puts ``z`` into the base optimizer's state before the base's first step,
so every base that initialises its state when that is empty (torch's Adam, our Lion, Muon, SOAP
...) fails with a ``KeyError``; :func:`schedule_free` creates ``z`` after the base's first step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from guided_descent.optimizers.checkpoint import STATE_KEY, StateDictMismatchError
from guided_descent.optimizers.guard import GuardedOptimizer
from guided_descent.optimizers.registry import OptimizerSpec, create, register
from guided_descent.optimizers.validation import nonneg, validate_hyperparams
from guided_descent.transforms.schedule_free import (
    averaging_weight,
    interpolated_step_,
    swap_,
    to_average_,
    to_interpolation_,
)


def _check_interpolation(owner: str, what: str, value: Any) -> None:
    """β must lie in (0, 1): ``x = (y - (1 - β) z) / β`` divides by it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 < value < 1.0 or math.isnan(value):
        raise ValueError(
            f"{owner}: {what} (the schedule-free interpolation β) must be in (0, 1), got {value!r}"
        )


class ScheduleFreeModes:
    """Mixin: the train/eval switch of a schedule-free optimizer (see the module docstring).

    Must precede :class:`GuardedOptimizer` in the bases. A class names the group key of its mode
    (:attr:`MODE_KEY`) and the state key of ``z`` (:attr:`Z_KEY`), and says where β lives
    (:meth:`_beta`).
    """

    MODE_KEY: ClassVar[str] = "train_mode"
    Z_KEY: ClassVar[str] = "z"

    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]

    def _beta(self, group: Mapping[str, Any]) -> float:
        raise NotImplementedError

    @property
    def training(self) -> bool:
        """Whether the parameters hold ``y`` (train mode) rather than ``x`` (eval mode)."""
        return all(group[self.MODE_KEY] for group in self.param_groups)

    def _z(self, p: Tensor) -> Tensor | None:
        state = self.state.get(p)  # .get: state is a defaultdict, [] would create an entry
        return None if state is None else state.get(self.Z_KEY)

    @torch.no_grad()
    def eval(self) -> ScheduleFreeModes:
        """Put ``x`` (the average, the point to evaluate) into the parameters; returns self."""
        for group in self.param_groups:
            if group[self.MODE_KEY]:
                for p in group["params"]:
                    z = self._z(p)
                    if z is not None:  # no z yet: never stepped, x = y = z already
                        to_average_(p, z, self._beta(group))
                group[self.MODE_KEY] = False
        return self

    @torch.no_grad()
    def train(self) -> ScheduleFreeModes:
        """Put ``y`` (where gradients are taken) back into the parameters; returns self."""
        for group in self.param_groups:
            if not group[self.MODE_KEY]:
                for p in group["params"]:
                    z = self._z(p)
                    if z is not None:
                        to_interpolation_(p, z, self._beta(group))
                group[self.MODE_KEY] = True
        return self

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Parameters at ``x`` inside the block, and ``y`` again after it, bit for bit.

        Costs one copy of the parameters that have a ``z``. In eval mode already, a no-op."""
        if not self.training:
            yield
            return
        with torch.no_grad():
            kept = [
                (p, p.detach().clone())
                for group in self.param_groups
                for p in group["params"]
                if self._z(p) is not None
            ]
        self.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in kept:
                    p.copy_(y)
            for group in self.param_groups:
                group[self.MODE_KEY] = True

    def _before_update(self) -> None:
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}: step() in eval mode (the parameters hold the average x, "
                "not the point y where gradients belong); call optimizer.train() before training, "
                "or evaluate inside `with optimizer.averaged():`"
            )
        super()._before_update()  # type: ignore[misc]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A new group joins in the current mode (its parameters have no z yet: either is right).
        mode = self.training if self.param_groups else True
        super().add_param_group(param_group)  # type: ignore[misc]
        for group in self.param_groups:  # a base may split one group into several
            self._fill_group(group, mode)
            self._check_schedule_free_group(group)

    def _fill_group(self, group: dict[str, Any], mode: bool) -> None:
        """Give a new group the keys the schedule-free step needs."""
        group.setdefault(self.MODE_KEY, mode)

    def _check_schedule_free_group(self, group: Mapping[str, Any]) -> None:
        """Validate what a group needs for the mode switch (β in (0, 1))."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A tagged state dict names its optimizer, which the guard checks; an untagged one
        # (plain torch format) must at least carry the mode of every group.
        if isinstance(state_dict, Mapping) and not state_dict.get(STATE_KEY):
            for i, group in enumerate(state_dict.get("param_groups") or []):
                if isinstance(group, Mapping) and self.MODE_KEY not in group:
                    raise StateDictMismatchError(
                        f"{type(self).__name__}: param group {i} of the state dict has no "
                        f"{self.MODE_KEY!r}: it was not saved by a schedule-free optimizer"
                    )
        super().load_state_dict(state_dict)  # type: ignore[misc]


# ------------------------------------------------------------------ SGD and AdamW, schedule-free


class _ScheduleFreeOptimizer(ScheduleFreeModes, GuardedOptimizer, torch.optim.Optimizer):
    """The shell shared by :class:`SGDScheduleFree` and :class:`AdamWScheduleFree`."""

    OWNER: ClassVar[str]

    def _averaging(self, group: dict[str, Any]) -> float:
        """``c`` of this step for ``group``, updating its running ``lr_max`` and ``weight_sum``."""
        c, group["lr_max"], group["weight_sum"] = averaging_weight(
            group["k"],
            float(group["lr"]),
            group["lr_max"],
            group["weight_sum"],
            group["r"],
            group["weight_lr_power"],
        )
        return c

    def _active(self, group: dict[str, Any], keys: tuple[str, ...]) -> list[Tensor]:
        """The parameters of ``group`` with a gradient, their state created (``z = y``)."""
        active = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{self.OWNER} does not support sparse gradients")
            state = self.state[p]
            if "z" not in state:
                state["z"] = torch.clone(p, memory_format=torch.preserve_format).detach()
                for key in keys:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            active.append(p)
        return active

    @staticmethod
    def _foreach(group: Mapping[str, Any], params: list[Tensor]) -> bool:
        foreach = group["foreach"]
        return all(p.is_cuda for p in params) if foreach is None else bool(foreach)


class SGDScheduleFree(_ScheduleFreeOptimizer):
    """Schedule-free SGD, Defazio et al. 2024, arXiv 2405.15682 (Algorithm "SGD").

    Update, with ``d = g(y) + weight_decay · y`` (L2 decay taken at ``y``, the package's
    choice)::

        z <- z - lr · d
        x <- (1 - c) x + c z,   c = lr_max² / Σ lr_max²  (uniform 1/(t+1) at a constant lr)
        y <- (1 - momentum) z + momentum x                 # the parameters, while training

    Args:
        params: parameters or param-group dicts.
        lr: step size of ``z``. Default 1.0 (the package's): without a momentum buffer's
            ``1/(1 - momentum)`` gain, 1.0 here takes steps of the size ``lr=0.1`` takes in SGD
            with momentum 0.9.
        momentum: the interpolation β in (0, 1). Default 0.9.
        weight_decay: L2 penalty added to the gradient, at ``y``. Default 0.
        r: the averaging weights grow as ``(t+1)^r``. Default 0.
        weight_lr_power: the averaging weights grow as ``lr_max^p``. Default 2.
        foreach: multi-tensor kernels; ``None`` picks them when every parameter is on a GPU.
        on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"off"``
            (:mod:`guided_descent.optimizers.guard`).

    State per parameter: ``z`` (the size of the parameter). Per group: ``k`` (steps),
    ``lr_max``, ``weight_sum`` and ``train_mode``. ``train()``, ``eval()``, ``averaged()``: see
    :mod:`guided_descent.optimizers.schedule_free`. Matches ``schedulefree.SGDScheduleFree`` bit
    for bit (``warmup_steps`` aside: use a scheduler).
    """

    STATE_NAME = "SGDScheduleFree"
    OWNER = "schedulefree_sgd"

    def __init__(
        self,
        params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        hyper = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, r=r,
            weight_lr_power=weight_lr_power,
        )
        validate_hyperparams(self.OWNER, hyper)
        self._init_guard(on_nonfinite)
        defaults = dict(**hyper, foreach=foreach, k=0, lr_max=0.0, weight_sum=0.0)
        super().__init__(params, defaults)

    def _beta(self, group: Mapping[str, Any]) -> float:
        return group["momentum"]

    def _check_schedule_free_group(self, group: Mapping[str, Any]) -> None:
        _check_interpolation(self.OWNER, "momentum", group["momentum"])

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        return ("z",), {"z": tuple(p.shape)}

    @torch.no_grad()
    def _update(self) -> None:
        for group in self.param_groups:
            c = self._averaging(group)
            params = self._active(group, ())
            if params:
                lr, wd, beta = float(group["lr"]), group["weight_decay"], group["momentum"]
                foreach = self._foreach(group, params)
                grads = [p.grad for p in params]
                zs = [self.state[p]["z"] for p in params]
                if wd != 0.0:  # a new tensor: p.grad is never modified
                    if foreach:
                        grads = torch._foreach_add(grads, params, alpha=wd)
                    else:
                        grads = [g.add(p, alpha=wd) for g, p in zip(grads, params, strict=True)]
                rms = interpolated_step_(
                    params, zs, grads, lr=lr, beta=beta, c=c, foreach=foreach
                )
                for p, value in zip(params, rms, strict=True):
                    self._observe(p, update_rms=value)
            group["k"] += 1


class AdamWScheduleFree(_ScheduleFreeOptimizer):
    """Schedule-free AdamW, Defazio et al. 2024, arXiv 2405.15682 (Algorithm 1), as the
    ``schedulefree`` package's ``AdamWScheduleFree`` computes it.

    Update, with ``v`` the EMA of ``g²`` at ``y`` and ``t`` the step (1, 2, ...)::

        d = g / (√(v / (1 - β2^t)) + eps) + weight_decay · y
        z <- z - lr · d
        x <- (1 - c) x + c z,   c = lr_max² / Σ lr_max²
        y <- (1 - β1) z + β1 x                      # the parameters, while training

    There is no first moment: β1 is the interpolation. **Where we follow the package, not the
    paper's Algorithm 1:** the paper folds Adam's bias correction into the learning rate
    (``γ_t = lr·√(1 - β2^t)``, outside ``eps``) and so into the averaging weights
    (``c ∝ γ_t²``); the package divides ``v`` by it inside the root and weights by ``lr`` alone.
    The two differ in the first ~1/(1 - β2) steps; the package's authors report the paper's form
    unstable on some problems (their ``AdamWScheduleFreePaper``). The tests pin both.

    Args:
        params: parameters or param-group dicts.
        lr: step size of ``z``. Default 2.5e-3 (the package's; 1-10x AdamW's usual lr).
        betas: ``(β1, β2)``: the interpolation β1 in (0, 1) and the second-moment decay.
            Default (0.9, 0.999).
        eps: added to the root. Default 1e-8.
        weight_decay: decay taken at ``y``, added to the normalized step. Default 0.
        r, weight_lr_power: the averaging weights grow as ``(t+1)^r · lr_max^p``. Default 0, 2.
        foreach: multi-tensor kernels; ``None`` picks them when every parameter is on a GPU.
        on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"off"``.

    State per parameter: ``z`` and ``exp_avg_sq`` (each the size of the parameter). Per group:
    ``k``, ``lr_max``, ``weight_sum``, ``train_mode``.
    """

    STATE_NAME = "AdamWScheduleFree"
    OWNER = "schedulefree_adamw"

    def __init__(
        self,
        params,
        lr: float = 2.5e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        hyper = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, r=r,
            weight_lr_power=weight_lr_power,
        )
        validate_hyperparams(self.OWNER, hyper)
        self._init_guard(on_nonfinite)
        defaults = dict(**hyper, foreach=foreach, k=0, lr_max=0.0, weight_sum=0.0)
        super().__init__(params, defaults)

    def _beta(self, group: Mapping[str, Any]) -> float:
        return group["betas"][0]

    def _check_schedule_free_group(self, group: Mapping[str, Any]) -> None:
        _check_interpolation(self.OWNER, "betas[0]", group["betas"][0])

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        return ("z", "exp_avg_sq"), {"z": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    @torch.no_grad()
    def _update(self) -> None:
        for group in self.param_groups:
            c = self._averaging(group)
            params = self._active(group, ("exp_avg_sq",))
            if params:
                self._adamw_group(group, params, c)
            group["k"] += 1

    def _adamw_group(self, group: dict[str, Any], params: list[Tensor], c: float) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        bias_correction2 = 1.0 - beta2 ** (group["k"] + 1)
        grads = [p.grad for p in params]
        zs = [self.state[p]["z"] for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        hyper = dict(lr=lr, beta=beta1, c=c)
        # The package's operations in its order (bit-identical results), but the normalized
        # gradient goes to a new tensor instead of into p.grad.
        if self._foreach(group, params):
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
            denom = torch._foreach_div(vs, bias_correction2)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            directions = torch._foreach_div(grads, denom)
            del denom
            if wd != 0.0:
                torch._foreach_add_(directions, params, alpha=wd)
            rms = interpolated_step_(params, zs, directions, foreach=True, **hyper)
        else:  # one parameter at a time: one direction tensor alive at once
            rms = []
            for p, g, z, v in zip(params, grads, zs, vs, strict=True):
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                d = g.div(v.div(bias_correction2).sqrt_().add_(eps))
                if wd != 0.0:
                    d.add_(p, alpha=wd)
                rms += interpolated_step_([p], [z], [d], foreach=False, **hyper)
        for p, value in zip(params, rms, strict=True):
            self._observe(p, update_rms=value)


# ------------------------------------------------------------------ the wrapper


_SF = "schedule_free."
BETA, WEIGHT_DECAY_AT_Y = _SF + "beta", _SF + "weight_decay_at_y"
R, WEIGHT_LR_POWER = _SF + "r", _SF + "weight_lr_power"
K, LR_MAX, WEIGHT_SUM = _SF + "k", _SF + "lr_max", _SF + "weight_sum"


class ScheduleFree(ScheduleFreeModes):
    """Mixin that :func:`schedule_free` puts in front of an optimizer's class.

    The base optimizer steps ``z``: before its update the parameters are turned from ``y`` into
    ``x`` and their contents swapped with the ``z`` buffer, so that the base sees ``z`` as the
    parameter (its own state, weight decay and routing apply to ``z``); after it they are swapped
    back and ``x`` and ``y`` are updated. Everything the base keeps (param groups, state,
    ``diagnostics()``, routing) stays as it was; its groups gain the ``schedule_free.*`` keys and
    each parameter's state the buffer ``schedule_free.z``.
    """

    MODE_KEY = _SF + "train_mode"
    Z_KEY = _SF + "z"
    MASKED_SKIP = False  # the swaps are not masked: non-finite skips are decided on the host

    def _beta(self, group: Mapping[str, Any]) -> float:
        return group[BETA]

    def _fill_group(self, group: dict[str, Any], mode: bool) -> None:
        # From the defaults schedule_free() set (a hybrid base drops keys it does not know
        # from its AdamW groups).
        for key in (BETA, WEIGHT_DECAY_AT_Y, R, WEIGHT_LR_POWER, K, LR_MAX, WEIGHT_SUM):
            group.setdefault(key, self.defaults[key])
        super()._fill_group(group, mode)

    def _check_schedule_free_group(self, group: Mapping[str, Any]) -> None:
        owner = type(self).__name__
        _check_interpolation(owner, "beta", group[BETA])
        for key in (WEIGHT_DECAY_AT_Y, R, WEIGHT_LR_POWER):
            nonneg(key.removeprefix(_SF))(owner, group[key])

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        keys, shapes = super().expected_state(p, group)  # type: ignore[misc]
        return keys, {**shapes, self.Z_KEY: tuple(p.shape)}

    @staticmethod
    def _effective_lr(group: Mapping[str, Any]) -> float:
        # Learning-rate-free bases (Prodigy, D-Adaptation) keep their step size as lr · d.
        return float(group["lr"]) * float(group.get("d", 1.0))

    def _extra_diagnostics(self) -> dict[str, Any]:
        return {**super()._extra_diagnostics(), "train_mode": self.training}  # type: ignore[misc]

    @torch.no_grad()
    def _update(self) -> None:
        # Mirrors schedulefree.ScheduleFreeWrapper's operations (bit-identical with SGD as the
        # base), except that a parameter's z enters the state only after the base's first step
        # on it: bases that create their state when it is empty would otherwise never do so.
        moved: list[tuple[dict[str, Any], Tensor, Tensor]] = []
        new: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            beta, wd = group[BETA], group[WEIGHT_DECAY_AT_Y]
            lr = self._effective_lr(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                z = self._z(p)
                if z is None:  # first step of p: x = y = z = p
                    z = torch.clone(p, memory_format=torch.preserve_format).detach()
                    new.append((p, z))
                if wd != 0.0:  # decay at y, applied to z; y moves so that x stays put
                    z.sub_(p, alpha=lr * wd)
                    p.sub_(p, alpha=lr * wd * (1.0 - beta))
                to_average_(p, z, beta)  # p: y -> x
                swap_(z, p)  # p holds z for the base's step, the buffer holds x
                moved.append((group, p, z))
        super()._update()  # type: ignore[misc]
        weights = {}
        for group in self.param_groups:
            c, group[LR_MAX], group[WEIGHT_SUM] = averaging_weight(
                group[K],
                self._effective_lr(group),
                group[LR_MAX],
                group[WEIGHT_SUM],
                group[R],
                group[WEIGHT_LR_POWER],
            )
            weights[id(group)] = c
            group[K] += 1
        for group, p, z in moved:
            swap_(z, p)  # p: x, the buffer: the base's new z
            p.lerp_(z, weights[id(group)])  # x <- (1 - c) x + c z
            to_interpolation_(p, z, group[BETA])  # p: x -> y
        for p, z in new:
            self.state[p][self.Z_KEY] = z


_WRAPPED: dict[type, type] = {}


def _wrapped_class(base: type) -> type:
    """The class ``ScheduleFree<Base>`` (``ScheduleFree`` mixed before ``base``), made once.

    Registered in this module under its name so that pickle finds it."""
    cls = _WRAPPED.get(base)
    if cls is not None:
        return cls
    name = f"ScheduleFree{base.__name__}"
    while name in globals():  # another base of the same name (a user's class)
        name += "_"
    cls = type(
        name,
        (ScheduleFree, base),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{base.__name__} made schedule-free by :func:`schedule_free`.",
            "STATE_NAME": f"ScheduleFree({base.STATE_NAME})",
        },
    )
    globals()[name] = cls
    _WRAPPED[base] = cls
    return cls


def schedule_free(
    base: str | torch.optim.Optimizer,
    target: Any = None,
    *,
    beta: float = 0.9,
    weight_decay_at_y: float = 0.0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    **hyperparams: Any,
) -> torch.optim.Optimizer:
    """Make an optimizer of the registry schedule-free: its update steps ``z``, the parameters
    hold ``y`` while training and ``x`` after ``eval()`` (module docstring).

    ``base`` is a registry name (then ``target`` and ``hyperparams`` go to
    :func:`guided_descent.create`) or an optimizer that ``create`` built. The optimizer returned
    *is* that optimizer, its class extended (``isinstance(opt, Muon)`` holds; routing, param
    groups, ``diagnostics()`` are the base's, with ``update_rms`` the base's step of ``z``); its
    state dict carries ``z`` and the mode, tagged ``ScheduleFree(<base>)``.

    Args:
        beta: the interpolation β in (0, 1): ``y = (1 - β) z + β x``. Default 0.9.
        weight_decay_at_y: decay ``z -= lr · wd · y`` taken at ``y``; the base's own
            ``weight_decay`` (if any) is taken at ``z``. Default 0.
        r, weight_lr_power: the averaging weights grow as ``(t+1)^r · lr_max^p``
            (:func:`~guided_descent.transforms.schedule_free.averaging_weight`). Default 0, 2.

    ``lr`` in the weights and in ``weight_decay_at_y`` is each group's ``lr`` times its ``d`` if
    it has one (Prodigy's step-size estimate). With ``base="sgd"`` (no momentum) this is
    schedule-free SGD (:class:`SGDScheduleFree`, to rounding). Many bases carry their own
    momentum, which β now supplies too: consider turning it off (``momentum=0``, ``betas=(0,
    β2)``). Costs per step: two swaps and three lerps per parameter, one buffer of the
    parameter's size in state; non-finite skips are decided on the host.
    """
    if isinstance(base, str):
        opt = create(base, target, **hyperparams)
    elif isinstance(base, torch.optim.Optimizer):
        if target is not None or hyperparams:
            raise TypeError(
                "schedule_free: given an optimizer, pass neither a model nor hyper-parameters "
                f"(got target={type(target).__name__}, hyper-parameters {sorted(hyperparams)})"
            )
        opt = base
    else:
        raise TypeError(
            "schedule_free: base must be a registry name or an optimizer built by "
            f"guided_descent.create, got {type(base).__name__}"
        )
    if isinstance(opt, ScheduleFreeModes):
        raise ValueError(f"schedule_free: {type(opt).__name__} is schedule-free already")
    if not isinstance(opt, GuardedOptimizer):
        raise TypeError(
            f"schedule_free: {type(opt).__name__} is not an optimizer of the library; build it "
            "with guided_descent.create(name, ...)"
        )
    owner = f"schedule_free({type(opt).__name__})"
    _check_interpolation(owner, "beta", beta)
    for key, value in (("weight_decay_at_y", weight_decay_at_y), ("r", r),
                       ("weight_lr_power", weight_lr_power)):
        nonneg(key)(owner, value)
    opt.__class__ = _wrapped_class(type(opt))
    settings = {
        BETA: beta, WEIGHT_DECAY_AT_Y: weight_decay_at_y, R: r, WEIGHT_LR_POWER: weight_lr_power,
        K: 0, LR_MAX: 0.0, WEIGHT_SUM: 0.0,
    }
    opt.defaults.update(settings)  # for groups added later
    for group in opt.param_groups:
        group.update(settings)
        group[ScheduleFree.MODE_KEY] = True
    return opt


SPECS = (
    OptimizerSpec(
        name="schedulefree_sgd",
        family="sgd",
        rule="z -= lr*g(y); x = (1-c)x + c*z, c = lr²/Σlr²; y = (1-mu)z + mu*x  (p holds y; "
        "eval() -> x)",
        state="1x (z)",
        state_buffers=1.0,
        reference="Defazio et al. 2024, arXiv 2405.15682",
        factory=SGDScheduleFree,
        defaults=dict(lr=1.0, momentum=0.9),
    ),
    OptimizerSpec(
        name="schedulefree_adamw",
        family="adaptive",
        rule="z -= lr*(g/(sqrt(v_hat)+eps) + wd*y); x = (1-c)x + c*z; y = (1-b1)z + b1*x  "
        "(p holds y; eval() -> x)",
        state="2x (z, second moment)",
        state_buffers=2.0,
        reference="Defazio et al. 2024, arXiv 2405.15682",
        factory=AdamWScheduleFree,
        defaults=dict(lr=2.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    ),
)

for _spec in SPECS:
    register(_spec)
