"""Natural gradient: exact damped Fisher / Gauss–Newton steps by conjugate gradient.

Amari 1998, "Natural Gradient Works Efficiently in Learning" (Neural Computation 10(2)); the
matrix-free Gauss–Newton products of Schraudolph 2002 (Neural Computation 14(7)) and the
truncated-CG solve of Martens 2010, "Deep learning via Hessian-free optimization" (ICML). The
mathematics lives in :mod:`guided_descent.preconditioners.natural_gradient`; this module is the
``torch.optim`` shell and the registry entry. It is the dense reference that K-FAC
approximates, for small models (up to ~1e5 parameters).

**How the step gets the batch.** The curvature products re-run the model, so ``step()`` needs
the inputs of the current batch. A forward pre-hook on the model records the inputs (positional
and keyword) of the latest forward pass made in training mode with gradients enabled; ``step()``
uses and then forgets them. A standard loop therefore works unchanged::

    opt = gd.create("natural_gradient", model, loss="cross_entropy")
    loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()

``torch.compile`` works whichever way round: build the optimizer on the model and compile it
afterwards, build it on the compiled ``OptimizedModule``, or compile in place with
``model.compile()``. The hook sits on the eager module inside any compile wrapper and runs
outside the compiled graph; the curvature re-runs call the eager module (``torch.func``
transforms of a compiled graph would recompile it every step). Diagnostics name parameters as
the module passed in does (``_orig_mod.``-prefixed for an ``OptimizedModule``).

``step()`` raises ``RuntimeError`` when no such forward pass happened since the last step. With
several forward passes per step (micro-batches) the curvature is that of the last one. The
re-runs normalize BatchNorm layers with their batch statistics, as training does, without
updating their running statistics (``torch.func`` transforms cannot mutate buffers; other layers
that do so in ``forward`` are not supported). Stochastic layers such as dropout draw fresh masks
in every re-run, so the products are then those of a random function: prefer deterministic
models when the exact Gauss–Newton matrix matters.

**Models whose ops lack forward-mode derivatives.** The products ``J v`` start in forward mode.
The re-runs route ``scaled_dot_product_attention`` (``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``) through its math kernel, whose ops all have forward-mode rules.
When an op still has none (``nn.LSTM``'s fused CPU kernel, a custom ``autograd.Function``
without ``jvp``), the first product that meets it switches this optimizer, for good, to computing
``J v`` by two reverse passes (``"double_vjp"``, see
:mod:`guided_descent.preconditioners.natural_gradient`); ``diagnostics()["jacobian_products"]``
says which way is in use and which module made it switch. Where the backward is not
differentiable either (e.g. a ``once_differentiable`` function), ``step()`` raises a one-line
``RuntimeError`` naming the module. (Tested on CPU only; on CUDA, cuDNN's RNN kernels are not
covered by the tests.)

**The loss must be named** (``loss=``; ``TypeError`` listing the choices otherwise). The
optimizer sees gradients, never the loss, and ``G`` is the loss's Gauss–Newton matrix: a wrong
kind gives a wrong metric, and a loss ``c`` times the named one makes every step ``c`` times too
long. Inferring it is not reliable: the gradient with respect to the outputs can confirm a
cross-entropy (``softmax(z) - R·∇L`` is then one-hot per row), but it fits a squared error for
*any* targets, so no batch tells MSE from an L1, a Huber or a scaled loss. Hence no default.

**Damping and step size (the defaults).** ``damping`` is where the damping starts; by default
(``adaptive_damping=True``) it adapts, Levenberg–Marquardt style (Martens 2010, §4.1): after
solving, the step is compared on its own batch -- the loss change the undamped Gauss–Newton model
predicted against the actual one, ``ρ = actual / predicted`` -- and the damping grows 3/2x when
``ρ < 1/4`` and shrinks to 2/3 when ``ρ > 3/4``, within ``[1e-4, 1e4]`` times its start (see
:class:`~guided_descent.preconditioners.natural_gradient.LevenbergMarquardt`). A step that
*raised* the batch's loss (``ρ < 0``) is not taken: parameters and momentum stay, the damping
grows, ``diagnostics()["rejected_steps"]`` counts it. The actual change needs no targets and no
loss function: for these losses it is ``⟨∇L(z), Δz⟩`` plus a term in ``z`` and ``Δz`` alone, and
the gradient ``∇L(z)`` with respect to the outputs is recorded by a hook in the backward pass
(one Jacobian product and one forward pass per step). Without it (the outputs took no part in
the loss) the damping stays and the step is taken.

Measured (``scripts/ng_defaults.py``; the ``bench train`` workloads digits-mlp,
digits-autoencoder, mnist1d-mlp and kron-quadratic at CI and full size, and small
classification and regression MLPs): the old defaults ``lr=1, damping=1e-3`` diverged on every
classification workload in under 10 steps; with a fixed damping no setting served both kinds
with margin (``lr=0.1, damping=1e-3`` held, ``lr=0.2`` diverged on half the classification
runs). With the adaptation nothing diverged for ``lr`` from 0.1 to 1, but steps longer than
``lr≈0.3`` fit each minibatch at the expense of the next on the noisier tasks (mnist1d-mlp made
no progress): the adaptation judges a step on its own batch and cannot see that. Hence
``lr=0.1`` (a tenth of the Gauss–Newton step) and ``damping=1`` (a cautious start that the
adaptation lowers by 2/3 per good step).
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from guided_descent.optimizers.diagnostics import json_float, rms
from guided_descent.optimizers.guard import GuardedOptimizer
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.natural_gradient import (
    OUTPUT_LOSSES,
    CGResult,
    JacobianProducts,
    LevenbergMarquardt,
    Linearization,
    OutputLoss,
    conjugate_gradient,
    gauss_newton_product,
    linearize,
    loss_change_noise,
    model_loss_change,
    output_loss_change,
    reduction_ratio,
)

STATE_MOMENTUM = "natural_gradient.momentum_buffer"
DEFAULT_LR = 0.1
DEFAULT_DAMPING = 1.0
SMALL_MODEL = 100_000  # parameters; beyond this a step of CG iterations gets expensive


@dataclass(frozen=True)
class NaturalGradientSettings:
    """Optimizer-wide choices: the loss whose Gauss–Newton matrix is used, the CG solve, and the
    damping's adaptation (``None``: fixed damping)."""

    loss: OutputLoss
    cg_iterations: int = 20
    cg_tolerance: float = 1e-6
    adaptation: LevenbergMarquardt | None = LevenbergMarquardt()
    class_dim: int = 1

    def __post_init__(self) -> None:
        validate_hyperparams(
            "natural_gradient",
            {k: getattr(self, k) for k in ("loss", "cg_iterations", "cg_tolerance")},
        )
        if isinstance(self.class_dim, bool) or not isinstance(self.class_dim, int):
            raise ValueError(
                f"natural_gradient: class_dim must be an int (the logits' class dimension), "
                f"got {self.class_dim!r}"
            )


def _adaptation(adaptive_damping: bool | LevenbergMarquardt) -> LevenbergMarquardt | None:
    if isinstance(adaptive_damping, LevenbergMarquardt):
        return adaptive_damping
    if not isinstance(adaptive_damping, bool):
        raise ValueError(
            "natural_gradient: adaptive_damping must be True, False or a LevenbergMarquardt "
            f"rule, got {adaptive_damping!r}"
        )
    return LevenbergMarquardt() if adaptive_damping else None


@dataclass
class _Batch:
    """What the hooks saw of the latest training forward pass: its inputs (detached) and, once
    the backward pass has gone through, the gradient of the loss with respect to its outputs."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output_grad: Tensor | None = None

    def keep_output_grad(self, grad: Tensor) -> None:
        self.output_grad = grad.detach()


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _capture_inputs(
    ref: weakref.ReferenceType[NaturalGradient],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    opt = ref()
    if opt is None or opt._replaying or not module.training or not torch.is_grad_enabled():
        return
    # Only the latest batch is kept; detached, so no autograd graph is held through it.
    opt._batch = _Batch(tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()})


def _capture_output_grad(
    ref: weakref.ReferenceType[NaturalGradient],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
) -> None:
    opt = ref()
    # The pre-hook's conditions: a forward it did not record must not pair with an older batch.
    if opt is None or opt._replaying or not module.training or not torch.is_grad_enabled():
        return
    if opt._batch is not None and isinstance(output, Tensor) and output.requires_grad:
        # Paired with this forward's batch: a later forward replaces the batch, and a gradient
        # arriving for an older one lands on that old record, not on the new one.
        output.register_hook(opt._batch.keep_output_grad)


def eager_module(model: nn.Module) -> nn.Module:
    """The eager module under ``torch.compile`` wrappers (``OptimizedModule._orig_mod``)."""
    # Imported here: torch._dynamo takes seconds to import, and torch.optim.Optimizer (which
    # the caller is building) imports it anyway.
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


@contextmanager
def _running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Normalization layers use batch statistics but leave their running statistics alone.

    With ``track_running_stats`` off, a training-mode BatchNorm computes the same function of
    its input (batch mean and variance) and skips the in-place buffer updates that a
    ``torch.func`` transform refuses.
    """
    switched = [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def _forward_mode_missing(error: BaseException) -> bool:
    """Whether ``error`` says that an op has no forward-mode (JVP) derivative."""
    text = str(error).lower()
    return isinstance(error, NotImplementedError) or any(
        phrase in text for phrase in ("forward ad", "forward-mode", "forward mode", "jvp")
    )


def _derivative_missing(error: BaseException) -> bool:
    """Whether ``error`` says that a derivative (of a backward, for double-VJP) is missing."""
    text = str(error).lower()
    return isinstance(error, NotImplementedError) or any(
        phrase in text
        for phrase in ("derivative for", "not implemented", "differentiate twice",
                       "not differentiable", "double backward")
    )


def _describe_module(name: str, module: nn.Module) -> str:
    kind = type(module)
    spelled = f"nn.{kind.__name__}" if kind.__module__.startswith("torch.nn") else kind.__name__
    return f"{name!r} ({spelled})" if name else f"the model ({spelled})"


def _failing_module(model: nn.Module, attempt: Callable[[], Any]) -> str:
    """The innermost module that was running when ``attempt()`` raised (how it is named)."""
    running: list[str] = []

    def leave(*_: Any) -> None:  # returns None: a forward hook's return replaces the output
        running.pop()

    handles = []
    for name, module in model.named_modules():
        described = _describe_module(name, module)
        handles.append(module.register_forward_pre_hook(
            lambda *_, d=described: running.append(d)
        ))
        handles.append(module.register_forward_hook(leave))
    try:
        attempt()
    except Exception:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return running[-1] if running else _describe_module("", model)


def _suspect_modules(model: nn.Module) -> str:
    """The recurrent and attention modules of ``model`` (fused kernels), else the model."""
    kinds = (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)
    found = [_describe_module(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    return ", ".join(found) if found else _describe_module("", model)


class NaturalGradient(GuardedOptimizer, torch.optim.Optimizer):
    """Damped natural gradient / Gauss–Newton by conjugate gradient (Amari 1998; Martens 2010).

    Update, for the gradient ``g`` of all parameters that have one, on the current batch::

        solve (G + diag(s·λ)) u = g  by CG from u = 0    # G = Jᵀ H J, H = ∂²loss/∂z²
        m ← μ m + u                                   # momentum (μ = 0: m = u)
        θ ← θ (1 - lr·weight_decay) - lr m            # decoupled weight decay
        s ← LM(s, ρ); skip the update if ρ < 0        # adaptive damping (see the module doc)

    ``G`` is the Gauss–Newton matrix of ``loss`` at the current parameters (equal to the Fisher
    of its likelihood), ``λ`` each parameter's group ``damping``, ``s`` the adaptive damping
    scale (1 and fixed with ``adaptive_damping=False``). With ``damping = 0`` and ``lr = 1`` on a
    linear least-squares problem one step lands on the minimum (Newton's step).

    Cost per step: one forward pass to build the VJP, then per CG iteration one JVP and one VJP
    through the model (about a forward plus a backward pass each), at most ``cg_iterations``.
    With double-VJP products (see the module docstring) the first pass also builds a backward
    graph, and each JVP is a reverse pass through it.

    Args:
        model: the network; all its trainable parameters are optimized jointly.
        lr: step size. Default 0.1 (1 is the Gauss–Newton step; see the module docstring).
        damping: Tikhonov damping ``λ >= 0`` added to ``G`` (where it starts, when adaptive).
            Default 1.0. ``0`` stays 0: the adaptation scales it.
        momentum: heavy-ball coefficient on the solved direction, in [0, 1). Default 0.
        weight_decay: decoupled weight decay (multiplied by ``lr``). Default 0.
        loss: required, the training loss: ``"mse"`` (``F.mse_loss``, mean over all outputs),
            ``"half_squared_error"`` (``0.5 * (z - y).square().sum() / N``, ``N`` examples along
            dimension 0) or ``"cross_entropy"`` (``F.cross_entropy`` on logits, class dimension
            1, mean over predictions). ``G`` is its Gauss–Newton matrix only when it matches.
        class_dim: the class dimension of the logits for ``"cross_entropy"``: 1 (default,
            ``F.cross_entropy``'s convention) or, for a language model's ``(B, T, V)`` logits
            flattened to ``(B·T, V)`` in its loss, -1.
        adaptive_damping: ``True`` (default) adapts the damping (Levenberg–Marquardt, and
            steps that raise the batch's loss are not taken); ``False`` keeps it fixed; or a
            :class:`~guided_descent.preconditioners.natural_gradient.LevenbergMarquardt` rule.
        cg_iterations: most CG iterations (matrix-vector products) per step; raise it (up to
            the parameter count) for an exact solve. Default 20.
        cg_tolerance: stop CG when ``‖r‖ <= cg_tolerance · ‖g‖``. Default 1e-6.
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`). A skipped step
            also forgets the inputs captured for it.

    The CG vectors are float32 (float64 for float64 models); the model is evaluated in its own
    dtype. State per parameter: ``natural_gradient.momentum_buffer`` when ``momentum > 0``; the
    damping scale ``s`` and the counts of rejected steps and failed solves are saved in the
    state-dict tag. ``last_solve`` holds the latest :class:`CGResult` (iterations, relative
    residual, breakdown, a Lanczos condition-number estimate of ``G + sλI``), ``last_ratio`` the
    latest ``ρ`` (``None`` when unknown).

    **When the solve fails.** CG breaks down when a direction has non-positive or non-finite
    curvature (``G`` is singular along the gradient and ``damping = 0``, or the model's products
    overflow). The iterate reached before the breakdown is a descent direction and is used; if
    there is none (breakdown on the first product) or the result holds NaN/Inf, the step falls
    back to the plain gradient ``u = g`` -- what K-FAC does without a curvature estimate. Either
    way the failure is counted (``diagnostics()``, saved in the state dict) and warned once.
    """

    STATE_NAME = "NaturalGradient"
    ALGORITHM = "natural_gradient"
    _solve_failures: int = 0
    _warned_solve: bool = False
    _jacobian: JacobianProducts = "forward"
    _jacobian_reason: str | None = None
    _jacobian_module: str | None = None
    _jacobian_verified: bool = False
    _damping_scale: float = 1.0
    _rejected_steps: int = 0
    last_ratio: float | None = None
    _batch: _Batch | None = None

    def __init__(
        self,
        model: nn.Module,
        lr: float = DEFAULT_LR,
        damping: float = DEFAULT_DAMPING,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        loss: OutputLoss | None = None,
        class_dim: int = 1,
        adaptive_damping: bool | LevenbergMarquardt = True,
        cg_iterations: int = 20,
        cg_tolerance: float = 1e-6,
        on_nonfinite: str = "skip",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"natural_gradient needs the nn.Module (it re-runs it), got {type(model).__name__}"
            )
        if loss is None:
            raise TypeError(
                "natural_gradient: name the training loss, loss=... one of "
                f"{', '.join(map(repr, OUTPUT_LOSSES))} (see the docstring): the optimizer never "
                "sees the loss, and its Gauss-Newton matrix and step size depend on it"
            )
        self._init_guard(on_nonfinite)
        self.settings = NaturalGradientSettings(
            loss, cg_iterations, cg_tolerance, _adaptation(adaptive_damping), class_dim
        )
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        validate_hyperparams("natural_gradient", defaults)
        # A torch.compile wrapper shares its parameters with the eager module inside it. The hooks
        # and the curvature re-runs use the eager module (torch.func transforms on a compiled
        # graph would recompile it); messages and diagnostics use the names of the module the
        # caller passed (an OptimizedModule spells them with an `_orig_mod.` prefix).
        self._model = eager_module(model)
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._call_names = {id(p): name for name, p in self._model.named_parameters()}
        self._shown_names = {
            self._call_names[id(p)]: name for name, p in model.named_parameters() if
            self._call_names[id(p)] != name
        }
        params = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        if count > SMALL_MODEL:
            warnings.warn(
                f"natural_gradient: the model has {count} trainable parameters; every CG "
                f"iteration is a JVP and a VJP through it (meant for <= {SMALL_MODEL})",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(params, defaults)
        self._batch: _Batch | None = None
        self._replaying = False
        self.last_solve: CGResult | None = None
        # Levenberg–Marquardt: every group's damping is multiplied by this (state; in the tag).
        self._damping_scale = 1.0
        self._rejected_steps = 0
        self.last_ratio: float | None = None
        # How J v is computed: forward mode until an op turns out to lack it (then for good).
        self._jacobian: JacobianProducts = "forward"
        self._jacobian_reason: str | None = None
        self._jacobian_module: str | None = None
        self._jacobian_verified = False
        # The hook runs eagerly even where dynamo traces the module's call (the model compiled
        # after this, or with nn.Module.compile()): traced, its write to this optimizer would be
        # dropped without a word.
        ref = weakref.ref(self)
        self._handles = [
            self._model.register_forward_pre_hook(
                torch.compiler.disable(partial(_capture_inputs, ref)), with_kwargs=True
            ),
            self._model.register_forward_hook(
                torch.compiler.disable(partial(_capture_output_grad, ref)), with_kwargs=True
            ),
        ]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        foreign = [tuple(p.shape) for p in params if id(p) not in self._names]
        if foreign:
            raise ValueError(
                f"natural_gradient: parameters of shapes {foreign} are not parameters of the "
                "model it was built with"
            )
        extra = {k: v for k, v in param_group.items() if k != "params"}
        validate_hyperparams("natural_gradient (param group)", extra)
        super().add_param_group({**param_group, "params": params})

    def remove_hooks(self) -> None:
        """Stop recording the model's inputs (``step()`` then raises until hooks are back)."""
        for handle in self._handles:
            handle.remove()
        self._batch = None

    @contextmanager
    def _replay(self) -> Iterator[None]:
        """How the model is re-run for curvature: with gradients, without capturing its inputs,
        BatchNorm on batch statistics with running ones untouched, and attention through the
        math kernel of scaled_dot_product_attention (the fused CPU and GPU kernels have neither
        forward-mode nor double-backward derivatives; the math one is plain differentiable ops
        computing the same function)."""
        self._replaying = True
        try:
            with (
                torch.enable_grad(),
                _running_stats_frozen(self._model),
                sdpa_kernel([SDPBackend.MATH]),
            ):
                yield
        finally:
            self._replaying = False

    @torch.no_grad()
    def _update(self) -> None:
        try:
            self._natural_step()
        finally:
            self._batch = None  # never reuse a batch for a later step

    def _discard_step_statistics(self) -> None:
        self._batch = None

    def _natural_step(self) -> None:
        entries = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not entries:
            return
        batch = self._batch
        if batch is None:
            raise RuntimeError(
                "natural_gradient: step() needs the inputs of a forward pass of the model made "
                "in training mode with gradients enabled since the last step; none was seen "
                "(model in eval mode? forward under torch.no_grad? hooks removed?)"
            )
        dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in entries) else (
            torch.float32
        )
        names = [self._call_names[id(p)] for _, p in entries]
        sizes = [p.numel() for _, p in entries]
        b = torch.cat([p.grad.reshape(-1).to(dtype) for _, p in entries])
        forward = self._functional_forward(batch)
        primals = {name: p.detach() for name, (_, p) in zip(names, entries, strict=True)}
        lin: Linearization | None = None
        if not bool(b.any()):
            direction = torch.zeros_like(b)
            self.last_solve = CGResult(0, 0.0, True)
        else:
            scale = self._damping_scale if self.settings.adaptation is not None else 1.0
            damping = torch.cat(
                [torch.full((n,), scale * float(g["damping"]), dtype=dtype, device=b.device)
                 for (g, _), n in zip(entries, sizes, strict=True)]
            )
            with self._replay():
                lin, direction = self._solve(forward, primals, names, sizes, b, damping)
            direction = self._usable(direction, b)
        updated: dict[str, Tensor] = {}
        buffers: dict[str, Tensor | None] = {}
        offset = 0
        for (group, p), name, n in zip(entries, names, sizes, strict=True):
            updated[name], buffers[name] = self._updated(
                group, p, direction[offset : offset + n].view(p.shape)
            )
            offset += n
        self.last_ratio = None
        if lin is not None and self.settings.adaptation is not None:
            with self._replay():
                grad = batch.output_grad
                accepted = self._adapt(
                    lin, forward, primals, updated, None if grad is None else self._canonical(grad)
                )
            if not accepted:
                self._rejected_steps += 1
                for _, p in entries:
                    self._observe(p, update_rms=torch.zeros((), device=p.device))
                return
        for (_, p), name in zip(entries, names, strict=True):
            p.copy_(updated[name])
            if buffers[name] is not None:
                self.state[p][STATE_MOMENTUM] = buffers[name]

    def _solve(
        self,
        forward: Callable[[dict[str, Tensor]], Tensor],
        primals: dict[str, Tensor],
        names: list[str],
        sizes: list[int],
        b: Tensor,
        damping: Tensor,
    ) -> tuple[Linearization, Tensor]:
        def unflatten(v: Tensor) -> dict[str, Tensor]:
            parts = v.split(sizes)
            return {
                name: part.view(primals[name].shape)
                for name, part in zip(names, parts, strict=True)
            }

        while True:  # at most twice: forward mode, then double-VJP
            try:
                # Double-VJP graphs are checked once: their structure is the model's.
                lin = linearize(
                    forward, primals, self._jacobian, verify=not self._jacobian_verified
                )
                direction, self.last_solve = self._conjugate_gradient(
                    lin, primals, names, unflatten, b, damping
                )
                self._jacobian_verified = True
                return lin, direction
            except (NotImplementedError, RuntimeError) as error:
                self._jacobian_failed(error, forward, primals)

    def _adapt(
        self,
        lin: Linearization,
        forward: Callable[[dict[str, Tensor]], Tensor],
        primals: dict[str, Tensor],
        updated: dict[str, Tensor],
        output_grad: Tensor | None,
    ) -> bool:
        """Levenberg–Marquardt: compare the loss change the Gauss–Newton model predicted for the
        step about to be taken with the change on this batch, and scale the damping for the next
        step; whether to take the step. Costs one Jacobian product and one forward pass. Needs
        the loss's gradient with respect to the outputs (recorded in the backward pass); without
        it the damping stays and the step is taken."""
        if output_grad is None or output_grad.shape != lin.outputs.shape:
            return True
        moved = {name: updated[name].to(p.dtype) for name, p in primals.items()}
        delta = {name: moved[name] - p for name, p in primals.items()}
        loss = self.settings.loss
        predicted = model_loss_change(loss, lin.outputs, output_grad, lin.jvp(delta))
        with torch.no_grad():
            outputs = forward(moved)
        actual = output_loss_change(loss, lin.outputs, output_grad, outputs - lin.outputs)
        noise = loss_change_noise(lin.outputs, output_grad)
        self.last_ratio = reduction_ratio(actual, predicted, noise)
        rule = self.settings.adaptation
        assert rule is not None
        self._damping_scale = rule.update(self._damping_scale, self.last_ratio)
        return rule.accepts(self.last_ratio)

    def _conjugate_gradient(
        self,
        lin: Linearization,
        primals: dict[str, Tensor],
        names: list[str],
        unflatten: Callable[[Tensor], dict[str, Tensor]],
        b: Tensor,
        damping: Tensor,
    ) -> tuple[Tensor, CGResult]:
        loss = self.settings.loss

        def matvec(v: Tensor) -> Tensor:
            gv = gauss_newton_product(lin, primals, loss, b.dtype, unflatten(v))
            flat = torch.cat([gv[name].reshape(-1).to(b.dtype) for name in names])
            return flat + damping * v

        return conjugate_gradient(
            matvec,
            b,
            max_iterations=self.settings.cg_iterations,
            tolerance=self.settings.cg_tolerance,
        )

    def _canonical(self, outputs: Tensor) -> Tensor:
        """Logits with their class dimension at 1, where the loss functions expect it."""
        dim = self.settings.class_dim
        if self.settings.loss != "cross_entropy" or dim == 1 or outputs.dim() < 2:
            return outputs
        return outputs.movedim(dim, 1)

    def _functional_forward(self, batch: _Batch) -> Callable[[dict[str, Tensor]], Tensor]:
        """The model as a function of (some of) its parameters, on the captured batch."""
        args, kwargs = batch.args, batch.kwargs
        model = self._model

        # Eager even when the module was compiled in place (nn.Module.compile()).
        @torch.compiler.disable
        def forward(params: dict[str, Tensor]) -> Tensor:
            return self._canonical(torch.func.functional_call(model, params, args, kwargs))

        return forward

    def _jacobian_failed(
        self,
        error: NotImplementedError | RuntimeError,
        forward: Callable[[dict[str, Tensor]], Tensor],
        primals: dict[str, Tensor],
    ) -> None:
        """Switch to double-VJP products when forward mode is missing; else refuse in one line.

        Returns to retry with the other way; re-raises errors that are not about derivatives.
        """
        text = str(error).strip()
        message = text.splitlines()[0] if text else type(error).__name__
        for call, shown in self._shown_names.items():  # name parameters as the caller does
            message = message.replace(repr(call), repr(shown))
        if self._jacobian == "forward" and _forward_mode_missing(error):
            # Run the failing product again, recording which module it fails in.
            tangents = {name: torch.zeros_like(p) for name, p in primals.items()}
            self._jacobian_module = _failing_module(
                self._model, lambda: torch.func.jvp(forward, (primals,), (tangents,))
            )
            self._jacobian = "double_vjp"
            self._jacobian_verified = False
            self._jacobian_reason = (
                f"no forward-mode derivative in {self._jacobian_module}: {message}"
            )
            return
        if self._jacobian == "double_vjp" and _derivative_missing(error):
            where = self._jacobian_module or _suspect_modules(self._model)
            hint = (
                "; on CUDA, call step() under torch.backends.cudnn.flags(enabled=False)"
                if "cudnn" in message.lower()
                else ""
            )
            raise RuntimeError(
                f"natural_gradient: cannot form Jacobian-vector products through {where}: it has "
                f"neither a forward-mode derivative nor a differentiable backward ({message}); "
                "train this model with an optimizer that needs only gradients (adamw, shampoo, "
                f"muon), or give the op a jvp rule or a twice-differentiable backward{hint}"
            ) from error
        raise error

    def _usable(self, direction: Tensor, b: Tensor) -> Tensor:
        """``direction``, or the gradient ``b`` when the solve produced nothing usable."""
        solve = self.last_solve
        assert solve is not None
        finite = bool(torch.isfinite(direction).all())
        if finite and not solve.breakdown:
            return direction
        self._solve_failures += 1
        fallback = not finite or not bool(direction.any())
        if not self._warned_solve:
            self._warned_solve = True
            what = "produced NaN/Inf" if not finite else "broke down (pᵀAp <= 0 or not finite)"
            then = (
                "stepping along the plain gradient instead"
                if fallback
                else "using the iterate reached before the breakdown"
            )
            warnings.warn(
                f"natural_gradient: the CG solve {what} after {solve.iterations} iteration(s); "
                f"{then} (warned once; failures are counted in diagnostics())",
                RuntimeWarning,
                stacklevel=5,
            )
        return b.clone() if fallback else direction

    def _extra_tag(self) -> dict[str, Any]:
        return {
            "solve_failures": self._solve_failures,
            "damping_scale": self._damping_scale,
            "rejected_steps": self._rejected_steps,
        }

    def _load_extra_tag(self, tag: Mapping[str, Any]) -> None:
        self._solve_failures = int(tag.get("solve_failures", 0))
        self._damping_scale = float(tag.get("damping_scale", 1.0))
        self._rejected_steps = int(tag.get("rejected_steps", 0))

    def _param_name(self, p: Tensor) -> str | None:
        return self._names.get(id(p))

    def _param_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        solve = self.last_solve
        return {
            **super()._param_diagnostics(p, group),
            "preconditioner": "conjugate-gradient",
            # One joint solve for all parameters: its condition estimate is theirs.
            "condition_number": None if solve is None else json_float(solve.condition_estimate),
            "failures": self._solve_failures,
        }

    def _extra_diagnostics(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "last_solve": None,
            "jacobian_products": {"mode": self._jacobian, "reason": self._jacobian_reason},
            "damping_scale": self._damping_scale,
            "reduction_ratio": json_float(self.last_ratio),
            "rejected_steps": self._rejected_steps,
        }
        solve = self.last_solve
        if solve is not None:
            fields = dataclasses.asdict(solve)
            for key in ("relative_residual", "condition_estimate"):
                fields[key] = json_float(fields[key])
            extra["last_solve"] = fields
        return extra

    def _updated(
        self, group: dict[str, Any], p: Tensor, u: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """``p``'s value after the step along ``u``, and its new momentum buffer (``None``
        without momentum); neither is stored yet (the step's RMS is recorded)."""
        momentum = float(group["momentum"])
        buf = None
        if momentum != 0.0:
            old = self.state[p].get(STATE_MOMENTUM)
            # In the parameter's dtype, as torch.optim.SGD keeps it.
            buf = u.to(p.dtype) if old is None else old.mul(momentum).add_(u.to(old.dtype))
            u = buf
        lr = float(group["lr"])
        self._observe(p, update_rms=rms(u, lr))  # replaced by 0 if the step is rejected
        shrink = 1.0 - lr * float(group["weight_decay"])
        # Low-precision parameters: one rounding, after the float32 arithmetic.
        new = p.to(u.dtype, copy=True)
        if shrink != 1.0:
            new.mul_(shrink)
        return new.sub_(u, alpha=lr).to(p.dtype), buf


def natural_gradient(
    model: nn.Module,
    *,
    lr: float = DEFAULT_LR,
    damping: float = DEFAULT_DAMPING,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss: OutputLoss | None = None,
    class_dim: int = 1,
    adaptive_damping: bool | LevenbergMarquardt = True,
    cg_iterations: int = 20,
    cg_tolerance: float = 1e-6,
    on_nonfinite: str = "skip",
) -> NaturalGradient:
    """Build :class:`NaturalGradient` for ``model`` (see its docstring for the update)."""
    return NaturalGradient(
        model,
        lr=lr,
        damping=damping,
        momentum=momentum,
        weight_decay=weight_decay,
        loss=loss,
        class_dim=class_dim,
        adaptive_damping=adaptive_damping,
        cg_iterations=cg_iterations,
        cg_tolerance=cg_tolerance,
        on_nonfinite=on_nonfinite,
    )


register(
    OptimizerSpec(
        name="natural_gradient",
        family="second-order",
        rule="p -= lr * (G + sλI)⁻¹ g, G = JᵀHJ (Gauss–Newton = Fisher), solved by CG on "
        "Jacobian products; s adapted Levenberg–Marquardt style",
        state="none (1x momentum when momentum > 0); the latest batch's inputs and output "
        "gradient between forward and step",
        state_buffers=0.0,
        reference="Amari 1998 (Neural Computation 10(2)); Schraudolph 2002; Martens 2010 (ICML)",
        factory=natural_gradient,
        needs_model=True,
    )
)
