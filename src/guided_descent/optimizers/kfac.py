"""K-FAC: Kronecker-factored approximate natural gradient for Linear and Conv2d layers.

Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature" (arXiv 1503.05671); convolutions: Grosse & Martens 2016, "A Kronecker-factored
approximate Fisher matrix for convolution layers" (arXiv 1602.01407). The mathematics lives in
:mod:`guided_descent.preconditioners.kfac`; this module is the ``torch.optim`` shell, the layer
hooks and the registry entry.

**How statistics reach the optimizer.** :class:`KFAC` takes the model and puts a forward hook on
each ``nn.Linear`` / ``nn.Conv2d``. When the coming ``step()`` will refresh the factors, a
forward pass *in training mode with gradients enabled* adds the layer's ``Σ ā āᵀ`` and its row
count to running sums and attaches a gradient hook to the layer's output, which adds the
``Σ g gᵀ`` of the output gradients ``g`` that the backward pass delivers, and their count (rows
for a Linear layer, examples for a Conv2d layer). ``step()`` turns ``Σ g gᵀ`` into the
per-example ``Σ δ δᵀ`` (below), folds the means into the EMAs and clears the sums, so between
steps a layer holds at most one ``A``-sized and two ``S``-sized matrices, whatever the number of
forward passes. Eval-mode or ``no_grad`` forwards are ignored. ``remove_hooks()`` detaches
everything; the hooks hold the optimizer only weakly, so a dropped optimizer stops recording by
itself. A step skipped for non-finite gradients (``on_nonfinite="skip"``) drops what was recorded
for it.

**Gradient accumulation and the loss's reduction.** The factors of a step are those of the whole
batch behind it: the same (up to float rounding) whether the batch is back-propagated at once or
as ``k`` micro-batches with ``(loss / k).backward()`` each, and under DistributedDataParallel the
same as one process on the global batch. A mean loss over ``N`` rows delivers ``g = δ / N``,
where ``N`` is only known once the last micro-batch is in, so the rescaling by ``N²`` happens in
``step()`` with the count of the whole step (on each rank before the ranks' sums are added).
``loss_reduction="sum"`` declares a loss summed over the rows (``g = δ``): ``loss.sum()`` with it
gives the same factors as ``loss.mean()`` with the default ``"mean"``. Precisely, with
``loss_reduction="mean"`` the training loss of a step must be the mean over all rows (Linear:
every leading index of its input, so each token of a ``(B, T, d)`` sequence batch, and each call
when a layer is applied several times in one forward) or examples (Conv2d) that the layer
processed since the last step. Scaling ``p.grad`` after ``backward()`` instead of the loss
(``loss.backward(); p.grad /= k``) is not seen by the hooks and makes ``S`` ``k²`` too large.

**torch.compile.** ``gd.create("kfac", model)`` then ``torch.compile(model)``, or
``gd.create("kfac", torch.compile(model))`` (its layers are found under ``_orig_mod.``), both
record the eager statistics: the hook bodies are excluded from compilation
(``torch.compiler.disable``), so dynamo breaks the graph at each preconditioned layer and runs the
rest compiled (``fullgraph=True`` is therefore refused by dynamo). Build the optimizer before the
compiled model's first call: compiled code keeps the hooks it was traced with, and a model traced
before any K-FAC optimizer hooked it never records (the step warns, naming torch.compile; later
optimizers on an already hooked model are reached through the same hooks).

**Empirical Fisher** (``fisher="empirical"``, default): ``S`` comes from the gradients of the
training loss itself; a plain loop works unchanged::

    opt = gd.create("kfac", model)
    loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()

**Sampled ("true") Fisher** (``fisher="sampled"``): ``S`` must come from targets drawn from the
model's own predictive distribution, which only the user's outputs can provide. Call
:meth:`KFAC.sample_fisher` on the model outputs before back-propagating the training loss; it
runs one extra backward pass through the (retained) graph with sampled targets, records ``S``
and leaves ``p.grad`` untouched::

    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    if opt.factors_due:                      # skip the extra backward when nothing is recorded
        opt.sample_fisher(out, "categorical")   # or "gaussian"; or opt.fisher_backward(my_nll)
    loss.backward()
    opt.step()

A factor refresh that finds activations but no sampled gradients raises ``RuntimeError``.

**Parameters K-FAC cannot precondition** (free parameters, norms, embeddings, grouped convs,
weights shared between modules, biases of frozen weights) go to a first-order ``fallback``
optimizer chosen by registry name. Its param groups are param groups of this one optimizer
(tagged ``"algorithm": <fallback name>``), so LR schedulers drive both kinds, and one
``state_dict`` holds everything. ``repr(opt)`` / :meth:`KFAC.describe` list which parameter went
where and why.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from guided_descent.distributed.dtensor import is_dtensor
from guided_descent.distributed.plan import inverse_root_flops
from guided_descent.distributed.split import (
    Distributed,
    TensorSpec,
    WorkSplit,
    distributed_report,
    resolve,
)
from guided_descent.linalg.finite import all_finite
from guided_descent.linalg.matrix_functions import MatrixFunctionError
from guided_descent.optimizers.diagnostics import rms
from guided_descent.optimizers.guard import GuardedOptimizer
from guided_descent.optimizers.registry import OptimizerSpec, create, get_spec, register
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.kfac import (
    ConvGeometry,
    DampedInverses,
    Likelihood,
    LossReduction,
    check_loss_reduction,
    conv2d_input_rows,
    conv2d_output_grad_rows,
    damped_inverses,
    gradient_matrix,
    kl_clip_factor,
    linear_input_rows,
    linear_output_grad_rows,
    per_example_outer_sum,
    precondition,
    sampled_nll,
    statistics_dtype,
    update_ema,
)

ALGORITHM = "kfac"
Fisher = Literal["empirical", "sampled", "true"]
FISHER_TYPES: tuple[str, ...] = get_args(Fisher)

@dataclass(frozen=True)
class KFACSettings:
    """Optimizer-wide K-FAC choices (the per-group ones live in ``param_groups``).

    ``fisher``: ``"empirical"`` or ``"sampled"`` (``"true"`` is accepted as a synonym and stored
    as ``"sampled"``). ``factor_frequency`` / ``inverse_frequency``: refresh the factor EMAs /
    their damped inverses on steps ``k`` with ``k % frequency == 0`` (``k`` counts a layer's
    steps from 0). ``kl_clip``: bound on a step's predicted KL divergence ``lr² ν² Σ ⟨G, U⟩``;
    ``None`` disables the clipping. ``loss_reduction``: ``"mean"`` or ``"sum"``, how the training
    loss reduces over rows (Linear) / examples (Conv2d), which sets the scale of the recorded
    output gradients (see :func:`~guided_descent.preconditioners.kfac.per_example_outer_sum`).
    """

    fisher: str = "empirical"
    factor_frequency: int = 1
    inverse_frequency: int = 10
    kl_clip: float | None = 1e-3
    loss_reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.fisher not in FISHER_TYPES:
            raise ValueError(f"kfac: fisher must be one of {FISHER_TYPES}, got {self.fisher!r}")
        check_loss_reduction("kfac", self.loss_reduction)
        if self.fisher == "true":
            object.__setattr__(self, "fisher", "sampled")
        validate_hyperparams(
            "kfac",
            {
                "factor_frequency": self.factor_frequency,
                "inverse_frequency": self.inverse_frequency,
                "kl_clip": self.kl_clip,
            },
        )


@dataclass(eq=False)
class _Layer:
    """One preconditioned layer and the statistics of the batches since the last step."""

    name: str
    module: nn.Linear | nn.Conv2d
    weight: nn.Parameter
    bias: nn.Parameter | None  # folded into the factors as a last weight column
    geometry: ConvGeometry | None  # None for nn.Linear
    a_sum: Tensor | None = None  # Σ ā āᵀ over recorded rows
    a_count: int = 0
    # Σ g gᵀ of back-propagated output gradients of the loss not yet folded into s_sum, and the
    # rows (Linear) / examples (Conv2d) behind it: its scale is known only once that loss's
    # whole batch (every micro-batch of the step) has been seen.
    g_sum: Tensor | None = None
    g_count: int = 0
    s_sum: Tensor | None = None  # Σ δ δᵀ of per-example output gradients
    s_count: int = 0  # rows / examples behind s_sum

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight seen as a matrix (a conv kernel flattened)."""
        return self.weight.shape[0], math.prod(self.weight.shape[1:])

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def record_inputs(self, x: Tensor) -> None:
        fold = self.bias is not None
        if self.geometry is None:
            rows = linear_input_rows(x, fold)
        else:
            rows = conv2d_input_rows(x, self.geometry, fold)
        self.a_sum = _accumulate(self.a_sum, rows.mT @ rows)
        self.a_count += rows.shape[0]

    def record_output_grad(self, grad: Tensor) -> None:
        if self.geometry is None:
            rows, count = linear_output_grad_rows(grad)
        else:
            rows, count = conv2d_output_grad_rows(grad)
        self.g_sum = _accumulate(self.g_sum, rows.mT @ rows)
        self.g_count += count

    def fold_output_grads(self, reduction: LossReduction) -> None:
        """Close one loss: its ``Σ g gᵀ``, rescaled to per-example ``Σ δ δᵀ``, joins ``s_sum``."""
        if self.g_sum is None:
            return
        per_example = per_example_outer_sum(self.g_sum, self.g_count, reduction)
        self.s_sum = _accumulate(self.s_sum, per_example)
        self.s_count += self.g_count
        self.g_sum, self.g_count = None, 0

    def reset(self) -> None:
        self.a_sum, self.a_count, self.s_sum, self.s_count = None, 0, None, 0
        self.g_sum, self.g_count = None, 0


def _accumulate(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total.add_(term)


# How a layer reaches its optimizers. A hooked module carries one forward hook, the module-level
# function _on_forward, and a list of (weak reference to a KFAC, its _Layer) that the hook reads
# when it runs. The optimizer is held weakly (the model keeps its hooks, and a strong reference
# would keep a discarded optimizer and its factors alive with it).
#
# torch.compile: both hook functions run eagerly (torch.compiler.disable), so dynamo breaks the
# graph around them instead of tracing a weakref call and a tensor-hook registration it cannot
# model; the statistics are those of the eager layer and the rest of the forward stays compiled.
# Compiled code keeps calling the hooks it found when it was traced (dynamo does not guard on
# module hooks by default), which is why the hook is the same function for every optimizer and
# looks up the recorders at run time: an optimizer built after a compiled forward whose module
# was already hooked (e.g. by an earlier optimizer) records like the first one.
_RECORDERS = "_kfac_recorders"  # module attribute: list[tuple[weakref to KFAC, _Layer]]
_HOOK = "_kfac_hook"  # module attribute: the RemovableHandle of _on_forward
_EAGER_REASON = (
    "K-FAC records layer statistics in eager hooks; compile the model without fullgraph=True"
)


def _eager(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` excluded from torch.compile; the reason shows in dynamo's fullgraph error."""
    try:
        return torch.compiler.disable(fn, reason=_EAGER_REASON)
    except TypeError:  # older torch: no reason argument
        return torch.compiler.disable(fn)


@_eager
def _on_forward(module: nn.Module, args: tuple, output: Any) -> None:
    if not module.training or not torch.is_grad_enabled():
        return
    if not args or not isinstance(args[0], Tensor):
        return
    for ref, layer in list(module.__dict__.get(_RECORDERS, ())):
        opt = ref()
        if opt is None or not opt._due(layer):
            continue
        with torch.no_grad():
            layer.record_inputs(args[0])
        if isinstance(output, Tensor) and output.requires_grad:
            # A tensor hook sees ∂L/∂output even when later ops modify the output in place.
            output.register_hook(partial(_on_output_grad, ref, layer))


@_eager
def _on_output_grad(ref: weakref.ReferenceType[KFAC], layer: _Layer, grad: Tensor) -> None:
    opt = ref()
    if opt is None:
        return
    if opt.settings.fisher == "sampled" and not opt._sampling:
        return  # the training loss's backward: its gradients are not the sampled Fisher's
    with torch.no_grad():
        layer.record_output_grad(grad)


def _attach(ref: weakref.ReferenceType[KFAC], layer: _Layer) -> None:
    module = layer.module
    recorders = module.__dict__.setdefault(_RECORDERS, [])
    # Entries of collected optimizers go now, so the list does not grow with every rebuild.
    recorders[:] = [(r, lay) for r, lay in recorders if r() is not None]
    recorders.append((ref, layer))
    if _HOOK not in module.__dict__:
        module.__dict__[_HOOK] = module.register_forward_hook(_on_forward)


def _detach(ref: weakref.ReferenceType[KFAC], layer: _Layer) -> None:
    module = layer.module
    recorders = module.__dict__.get(_RECORDERS, [])
    recorders[:] = [(r, lay) for r, lay in recorders if r() is not None and r is not ref]
    if not recorders:
        handle = module.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()
        module.__dict__.pop(_RECORDERS, None)


_FALLBACK_REASON = "not a parameter of an nn.Linear / nn.Conv2d"


def find_layers(model: nn.Module) -> tuple[list[_Layer], list[tuple[str, nn.Parameter, str]]]:
    """The layers K-FAC preconditions, and ``(name, parameter, reason)`` for everything else."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    why: dict[int, str] = {}
    layers: list[_Layer] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        kind = type(m).__name__
        bias = m.bias if m.bias is not None and m.bias.requires_grad else None
        if isinstance(m, NonDynamicallyQuantizableLinear):
            reason = "nn.MultiheadAttention's out_proj (its forward is never called)"
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            reason = f"grouped {kind} (groups={m.groups})"
        elif not m.weight.requires_grad:
            reason = f"bias of {kind} {name!r} whose weight is frozen"
        elif owners[id(m.weight)] > 1:
            reason = f"{kind} weight shared between modules"
        else:
            if bias is not None and owners[id(bias)] > 1:
                why[id(bias)] = f"{kind} bias shared between modules"
                bias = None
            geometry = ConvGeometry.of(m) if isinstance(m, nn.Conv2d) else None
            layers.append(_Layer(name, m, m.weight, bias, geometry))
            continue
        for p in m.parameters(recurse=False):
            why.setdefault(id(p), reason)
    claimed = {id(p) for layer in layers for p in layer.params}
    rest = [
        (name, p, why.get(id(p), _FALLBACK_REASON))
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in claimed
    ]
    return layers, rest


class KFAC(GuardedOptimizer, torch.optim.Optimizer):
    """K-FAC (Martens & Grosse 2015, arXiv 1503.05671; KFC for Conv2d, arXiv 1602.01407).

    Update, per preconditioned layer with weight-and-bias gradient ``G`` ``(d_out, d_in+1)``,
    on step ``k`` (all layers together)::

        every factor_frequency steps:   A ← ε A + (1-ε) E[ā āᵀ],  S ← ε S + (1-ε) E[δ δᵀ]
        every inverse_frequency steps:  π = sqrt((tr A/dim A) / (tr S/dim S))
                                        A⁻ = (A + π√λ I)⁻¹,  S⁻ = (S + √λ/π I)⁻¹  (via eigh)
        U = S⁻ G A⁻
        ν = min(1, sqrt(kl_clip / (lr² Σ_layers ⟨G, U⟩)))       # KL clipping
        m ← μ m + ν U                                           # momentum (μ = 0: m = ν U)
        W ← W (1 - lr·weight_decay) - lr m                      # decoupled weight decay

    with ``ε = stat_decay`` and ``λ = damping``; the first refresh sets ``A, S`` to the batch's,
    and the first step already inverts them (as the references do), so every step is
    preconditioned. ``E`` is the mean over the rows (Linear) or examples (Conv2d) of the step's
    whole batch, ``δ`` a row's own output gradient (see the module docstring for accumulation,
    ``loss_reduction`` and data parallelism). Other parameters are updated by the ``fallback``
    optimizer (see the module docstring).

    **Defaults** (measured, see "Why these defaults" below): ``lr=0.01``, ``momentum=0.5``,
    ``damping=1e-3``, ``stat_decay=0.95``, ``kl_clip=1e-3``, inverses every 10 steps.

    Args:
        model: the network; its ``nn.Linear`` and ungrouped ``nn.Conv2d`` layers with trainable
            weights are preconditioned (biases folded in), the rest goes to ``fallback``.
        lr: step size of the preconditioned update. Default 0.01.
        momentum: heavy-ball coefficient ``μ`` on the clipped update, in [0, 1). Default 0.5
            (with 0.9 the loss of small networks spiked far above its start, see below).
        damping: Tikhonov damping ``λ >= 0``, split between the factors by π. Default 1e-3.
        weight_decay: decoupled weight decay (multiplied by ``lr``); also passed to the fallback
            unless ``fallback_hyperparams`` sets its own. Default 0.
        stat_decay: EMA decay ``ε`` of the factors in [0, 1); 0 keeps only the latest batch.
            Default 0.95.
        kl_clip: bound on the step's predicted KL divergence: the update is scaled by ν so
            that ``lr² ν² Σ ⟨G, U⟩ = Δθᵀ F̂ Δθ <= kl_clip``; ``None`` disables. Default 1e-3.
        factor_frequency: refresh the factors every this many steps. Default 1.
        inverse_frequency: recompute the damped inverses every this many steps. Default 10.
        fisher: ``"empirical"`` (training-loss gradients) or ``"sampled"`` / ``"true"``
            (gradients for targets sampled from the model: call :meth:`sample_fisher`).
        loss_reduction: how the training loss reduces over the rows of a Linear layer (every
            leading index of its input: a token of a sequence is a row) and the examples of a
            Conv2d layer: ``"mean"`` (default, torch's default reduction) or ``"sum"``. Only the
            scale of the output gradients depends on it; with the right value the factors are
            the same for ``loss.mean()`` and ``loss.sum()`` (see "Gradient accumulation").
        fallback: registry name of the first-order optimizer for the other parameters.
            Default ``"adamw"``.
        fallback_hyperparams: keyword arguments for the fallback (its registry defaults
            otherwise). The fallback runs with ``on_nonfinite="off"``: this optimizer checks all
            gradients, the fallback's included, once.
        distributed: sum the factor statistics over data-parallel ranks and split the inverses
            between them (see "Data parallelism" below). ``None`` (default): when ``model`` is a
            ``DistributedDataParallel`` module; ``True``, a process group or a
            :class:`~guided_descent.distributed.WorkSplit`: always; ``False``: never.
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`). A skipped step
            also drops the statistics the layer hooks gathered for it.

    Factors are estimates of per-example second moments. State per layer (on its weight):
    ``kfac.A``, ``kfac.S`` (float32, float64 for float64 layers), ``kfac.A_inv``, ``kfac.S_inv``,
    ``kfac.momentum_buffer`` (``(d_out, d_in+1)``), ``kfac.step`` and ``kfac.inverse_failures``
    (ints), ``kfac.inverted_at`` (the step count after the last
    successful inversion; ``diagnostics()`` reports the age ``kfac.step - kfac.inverted_at``).
    A failed inversion (``MatrixFunctionError``) keeps the last good inverses, warns once per
    layer and counts the failure. A batch whose factor statistics hold NaN/Inf (possible only with
    ``on_nonfinite="off"`` or overflowing activations) is not folded into the factors, so one bad
    batch cannot spoil every later inversion; it is counted in ``kfac.rejected_statistics``.

    **Data parallelism.** Each rank's hooks see only its own examples, so under DDP the factors
    of the replicas would differ and so would their updates. With a
    :class:`~guided_descent.distributed.WorkSplit` (``distributed``: automatic when ``model`` is
    a ``DistributedDataParallel`` module; ``True`` or a process group otherwise) the statistics
    are summed over the ranks before they are folded in -- the factors of single-process training
    on the whole batch -- and the damped inverses of a refresh are split between the ranks (each
    layer's by one rank, balanced by FLOPs) and all-gathered. FSDP2-sharded (DTensor)
    parameters are not supported.

    **Why these defaults.** KL clipping bounds the predicted KL divergence of the *fresh* direction
    ``ν U``; heavy-ball momentum then adds up to ``1 / (1 - μ)`` such directions, taken under
    earlier preconditioners, so the step actually taken can exceed the bound by ``1 / (1 - μ)²``
    (100x at ``μ = 0.9``) just when the first inverses of a fast-changing network are refreshed.
    With the former ``momentum=0.9``, on the CPU workloads of ``guided-descent bench train``
    under its warm-up + cosine schedule, the minibatch loss rose above its starting value a few
    steps after the warm-up on digits-mlp (8.6x), digits-cnn (25x; 186x with another seed),
    digits-autoencoder (36x) and mnist1d-mlp (1.2x). At ``μ = 0.9`` neither ``damping=1e-2``,
    ``kl_clip`` 1e-4 or 1e-5, ``lr=1e-3``, inverses at every step nor ``stat_decay=0.99``
    prevented it (``damping=0.1`` did, at the price of a much slower descent); ``momentum=0.5``
    did on every workload and seed (0, 1, 2) tried, and trained faster than ``momentum=0``,
    while 0.7 still spiked once (digits-cnn, 1.8x). On kron-quadratic, where the preconditioner
    is exact, 0.9 reaches the benchmark's target sooner (130 steps against 320-410).
    """

    STATE_NAME = "KFAC"
    work_split: WorkSplit | None = None  # class-level: a copy rebuilt by pickle has none
    _attached = False  # whether this optimizer's layers are on their modules' recorder lists

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        momentum: float = 0.5,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        *,
        kl_clip: float | None = 1e-3,
        factor_frequency: int = 1,
        inverse_frequency: int = 10,
        fisher: Fisher = "empirical",
        loss_reduction: LossReduction = "mean",
        fallback: str = "adamw",
        fallback_hyperparams: Mapping[str, Any] | None = None,
        on_nonfinite: str = "skip",
        distributed: Distributed = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"kfac needs the nn.Module (it hooks into its layers), got {model!r}")
        sharded = [name for name, p in model.named_parameters() if is_dtensor(p)]
        if sharded:
            raise ValueError(
                f"kfac does not support FSDP2-sharded (DTensor) parameters, got {sharded[:3]}; "
                "use DistributedDataParallel (K-FAC's factors are summed over its ranks)"
            )
        self._init_guard(on_nonfinite)
        self.work_split = resolve(distributed, model)
        self.settings = KFACSettings(
            fisher, factor_frequency, inverse_frequency, kl_clip, loss_reduction
        )
        defaults: dict[str, Any] = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            weight_decay=weight_decay,
            stat_decay=stat_decay,
            algorithm=ALGORITHM,
        )
        validate_hyperparams("kfac", defaults)
        if fallback_hyperparams is not None and not isinstance(fallback_hyperparams, Mapping):
            raise TypeError(
                f"kfac: fallback_hyperparams must be a mapping, got {fallback_hyperparams!r}"
            )

        self._layers, self._fallback_params = find_layers(model)
        self._by_weight = {id(layer.weight): layer for layer in self._layers}
        self._by_bias = {id(layer.bias): layer for layer in self._layers if layer.bias is not None}
        self._names = {id(p): name for name, p in model.named_parameters()}
        self.fallback_name = fallback
        self._fallback_hyperparams = dict(fallback_hyperparams or {})
        self._default_weight_decay = weight_decay
        self._fallback: torch.optim.Optimizer | None = None
        groups: list[dict[str, Any]] = []
        if self._layers:
            groups.append(
                {"params": [p for layer in self._layers for p in layer.params],
                 "algorithm": ALGORITHM}
            )
        if self._fallback_params:
            self._fallback = self._make_fallback([p for _, p, _ in self._fallback_params])
            groups.extend(self._fallback.param_groups)
        else:
            get_spec(fallback)  # an unknown name is an error even when nothing falls back

        self._sampling = False
        self._warned: set[tuple[str, str]] = set()
        self._constructing = True
        super().__init__(groups, defaults)
        self._constructing = False
        if self._fallback is not None:
            self._fallback.state = self.state  # one state, so one state_dict holds both kinds

        self._ref = weakref.ref(self)
        for layer in self._layers:
            _attach(self._ref, layer)
        self._attached = True
        if not self._layers:
            warnings.warn(
                f"kfac: the model has no nn.Linear / nn.Conv2d layer to precondition; all "
                f"{len(self._fallback_params)} parameter(s) are updated by the fallback "
                f"{fallback!r}",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------ set-up

    def _make_fallback(self, params: list[Any]) -> torch.optim.Optimizer:
        spec = get_spec(self.fallback_name)
        if spec.needs_model:
            raise ValueError(
                f"kfac: the fallback must optimize a parameter list; {self.fallback_name!r} "
                "needs the model"
            )
        hyperparams: dict[str, Any] = {}
        if "weight_decay" in spec.hyperparams:
            hyperparams["weight_decay"] = self._default_weight_decay
        hyperparams.update(self._fallback_hyperparams)
        # This optimizer checks every gradient, the fallback's included, before its step.
        hyperparams["on_nonfinite"] = "off"
        return create(self.fallback_name, params, **hyperparams)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; after construction, new groups go to the fallback optimizer.

        The preconditioned layers are found from the model when the optimizer is built, so a
        ``"kfac"`` group cannot be added later.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if param_group.get("algorithm") == ALGORITHM:
            if not self._constructing:
                raise ValueError(
                    "kfac: preconditioned layers are fixed when the optimizer is built; add "
                    "new parameters without an 'algorithm' key (they go to the fallback "
                    f"{self.fallback_name!r})"
                )
            validate_hyperparams("kfac (kfac group)", param_group)
            super().add_param_group(param_group)
            return
        fallback = self._fallback
        if fallback is not None and any(param_group is g for g in fallback.param_groups):
            group = param_group  # one of the fallback's own groups, shared as is
        else:
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            self._check_disjoint(params)
            extra = {**param_group, "params": params}
            extra.pop("algorithm", None)
            if fallback is None:
                self._fallback = fallback = self._make_fallback([extra])
                fallback.state = self.state
            else:
                fallback.add_param_group(extra)
            group = fallback.param_groups[-1]
        self._check_disjoint(group["params"])
        group.setdefault("algorithm", self.fallback_name)
        self.param_groups.append(group)

    def _check_disjoint(self, params: list[Tensor]) -> None:
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("some parameters appear in more than one parameter group")

    def remove_hooks(self) -> None:
        """Detach the layer hooks: no more statistics are recorded (the last inverses stay).

        A module's forward hook goes when no optimizer records from it any more.
        """
        if self._attached:
            for layer in self._layers:
                _detach(self._ref, layer)
            self._attached = False
        for layer in self._layers:
            layer.reset()

    # ------------------------------------------------------------------------------ Fisher

    def _due(self, layer: _Layer) -> bool:
        """Whether the layer's coming step refreshes its factors (so statistics are wanted)."""
        step = self.state.get(layer.weight, {}).get("kfac.step", 0)
        return step % self.settings.factor_frequency == 0

    @property
    def factors_due(self) -> bool:
        """True when the next ``step()`` refreshes some layer's factors."""
        return any(self._due(layer) for layer in self._layers)

    def fisher_backward(self, nll: Tensor, reduction: LossReduction | None = None) -> None:
        """Record ``S`` from the backward pass of ``nll``, a loss on *sampled* targets.

        Runs ``torch.autograd.grad`` with ``retain_graph=True`` (the training loss can still be
        back-propagated) and discards the result: ``p.grad`` is not touched. Only for
        ``fisher="sampled"``. ``nll`` is reduced over the rows (Linear) / examples (Conv2d) of
        *this* forward pass by ``reduction`` (default: the optimizer's ``loss_reduction``); each
        call is a loss of its own, so under gradient accumulation call it once per micro-batch
        without dividing by the number of micro-batches.
        """
        if self.settings.fisher != "sampled":
            raise RuntimeError(
                f"kfac: fisher_backward/sample_fisher need fisher='sampled', this optimizer "
                f"uses fisher={self.settings.fisher!r}"
            )
        if not isinstance(nll, Tensor) or nll.dim() != 0 or not nll.requires_grad:
            raise ValueError(
                "kfac: fisher_backward needs a scalar loss that requires grad, got "
                f"{nll if not isinstance(nll, Tensor) else tuple(nll.shape)!r}"
            )
        reduction = self.settings.loss_reduction if reduction is None else reduction
        check_loss_reduction("kfac.fisher_backward", reduction)
        weights = [layer.weight for layer in self._layers]
        if not weights:
            return
        self._sampling = True
        try:
            torch.autograd.grad(nll, weights, retain_graph=True, allow_unused=True)
        finally:
            self._sampling = False
        for layer in self._layers:
            layer.fold_output_grads(reduction)

    def sample_fisher(
        self,
        outputs: Tensor,
        likelihood: Likelihood = "categorical",
        generator: torch.Generator | None = None,
    ) -> None:
        """Draw targets from the model's predictive distribution and record the true-Fisher ``S``.

        ``outputs`` are the model's outputs of this forward pass (logits for
        ``"categorical"``, means of a unit-variance Gaussian for ``"gaussian"``); see
        :func:`guided_descent.preconditioners.kfac.sampled_nll` (a mean over the rows: pass
        sequence outputs ``(B, T, D)`` as ``(B·T, D)`` for ``"gaussian"``).
        """
        self.fisher_backward(sampled_nll(outputs, likelihood, generator), reduction="mean")

    # ------------------------------------------------------------------------------ step

    @torch.no_grad()
    def _update(self) -> None:
        try:
            self._kfac_step()
        finally:
            self._discard_step_statistics()
        if self._fallback is not None:
            self._fallback.step()

    def _discard_step_statistics(self) -> None:
        for layer in self._layers:
            layer.reset()

    def _kfac_step(self) -> None:
        if self.settings.fisher == "sampled":
            self._check_sampled_statistics()
        # (layer, its group, its state) of every layer with a gradient, in parameter order
        entries: list[tuple[_Layer, dict[str, Any], dict[str, Any]]] = []
        for group in self.param_groups:
            if group["algorithm"] != ALGORITHM:
                continue
            for p in group["params"]:
                layer = self._by_weight.get(id(p))
                if layer is None:
                    continue  # a folded bias: updated with its weight
                bias_grad = None if layer.bias is None else layer.bias.grad
                if layer.weight.grad is None and bias_grad is None:
                    continue
                state = self.state[layer.weight]
                if not state:
                    state["kfac.step"] = 0
                    state["kfac.inverse_failures"] = 0
                    if layer.bias is not None:
                        # The folded bias keeps no state of its own (it lives on the weight);
                        # an empty entry tells DCP's set_optimizer_state_dict it is not missing.
                        self.state[layer.bias]  # noqa: B018
                entries.append((layer, group, state))

        # Layers are independent: factors of all, then inverses of all (one batch of work to
        # split between ranks), then the preconditioned directions.
        factor_due = [e for e in entries if e[2]["kfac.step"] % self.settings.factor_frequency == 0]
        if self.settings.fisher == "empirical":
            # The training loss of this step is complete: rescale its output gradients by the
            # size of its whole batch, on each rank before the ranks' sums are added.
            for layer, _, _ in factor_due:
                layer.fold_output_grads(self.settings.loss_reduction)
        if self.work_split is not None:
            self._sum_statistics([layer for layer, _, _ in factor_due], self.work_split)
        for layer, group, state in factor_due:
            self._update_factors(layer, state, float(group["stat_decay"]))
        inverse_due = [
            e
            for e in entries
            if e[2]["kfac.step"] % self.settings.inverse_frequency == 0 and "kfac.A" in e[2]
        ]
        self._update_inverses(inverse_due)

        work: list[tuple[_Layer, dict[str, Any], Tensor]] = []
        predicted_kl = 0.0
        for layer, group, state in entries:
            G, U = self._preconditioned(layer, state)
            inner = float((G * U).sum())  # the sync K-FAC needs anyway, for KL clipping
            if not math.isfinite(inner):
                U, inner = self._finite_direction(layer, G, U)
            predicted_kl += float(group["lr"]) ** 2 * inner
            work.append((layer, group, U))
        nu = kl_clip_factor(predicted_kl, self.settings.kl_clip)
        for layer, group, U in work:
            self._apply(layer, group, U if nu == 1.0 else U * nu)

    def _finite_direction(self, layer: _Layer, G: Tensor, U: Tensor) -> tuple[Tensor, float]:
        """``(U, ⟨G, U⟩)`` when ``⟨G, U⟩`` only overflowed; else the gradient ``G`` itself.

        Inverses of nearly singular factors (``damping`` 0 or tiny) can be large enough that
        ``S⁻¹ G A⁻¹`` overflows: such a direction would write Inf/NaN into the weights, so the
        layer takes its plain gradient this step (as before its first inversion), counted as a
        failure and warned once.
        """
        if all_finite(U):
            return U, float((G.double() * U.double()).sum())
        if not all_finite(G):
            return U, float("nan")  # the gradient itself (on_nonfinite="off"): nothing to save
        state = self.state[layer.weight]
        state["kfac.inverse_failures"] += 1
        self._warn_once(
            layer,
            "overflow",
            "got a non-finite preconditioned gradient (its damped inverses are too large: raise "
            "damping); it takes the unpreconditioned gradient for such steps",
        )
        return G, float((G.double() * G.double()).sum())

    def _preconditioned(self, layer: _Layer, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        weight, bias = layer.weight, layer.bias
        bias_grad = None if bias is None else bias.grad
        like = torch.empty(0, dtype=statistics_dtype(weight.dtype), device=weight.device)
        G = gradient_matrix(weight.grad, bias_grad, layer.shape, bias is not None, like)
        if "kfac.A_inv" not in state:
            self._warn_once(
                layer,
                "no-inverse",
                "has a gradient but no curvature estimate yet (run its forward pass in training "
                "mode with gradients enabled, after building the optimizer; a torch.compile'd "
                "model called before any K-FAC optimizer was built keeps running without the "
                "hooks: build the optimizer before its first call, or call "
                "torch._dynamo.reset()); it takes the unpreconditioned gradient",
            )
            return G, G
        return G, precondition(G, state["kfac.A_inv"], state["kfac.S_inv"])

    @staticmethod
    def _sum_statistics(layers: list[_Layer], split: WorkSplit) -> None:
        """Replace each rank's sums by the sums over all ranks (one all-reduce per dtype).

        Under data parallelism each rank records the statistics of its own examples; the
        factors of single-process training on the whole batch are the means over all of them,
        ``Σ_ranks Σ ā āᵀ / Σ_ranks rows``. A rank without a recording sends zeros.
        """
        if not layers or split.world_size == 1:
            return
        tensors: list[Tensor] = []
        for layer in layers:
            d_out, d_in = layer.shape
            a_dim = d_in + (layer.bias is not None)
            dtype = statistics_dtype(layer.weight.dtype)
            device = layer.weight.device
            zeros_a = torch.zeros(a_dim, a_dim, dtype=dtype, device=device)
            zeros_s = torch.zeros(d_out, d_out, dtype=dtype, device=device)
            tensors.append(zeros_a if layer.a_sum is None else layer.a_sum)
            tensors.append(zeros_s if layer.s_sum is None else layer.s_sum)
            # Counts in float64: exact for any realistic number of rows.
            counts = [float(layer.a_count), float(layer.s_count)]
            tensors.append(torch.tensor(counts, dtype=torch.float64, device=device))
        summed = split.sum("statistics", tensors)
        for k, layer in enumerate(layers):
            a_sum, s_sum, counts = summed[3 * k : 3 * k + 3]
            a_count, s_count = (int(c) for c in counts.tolist())
            layer.a_sum, layer.a_count = (a_sum, a_count) if a_count else (None, 0)
            layer.s_sum, layer.s_count = (s_sum, s_count) if s_count else (None, 0)

    def _check_sampled_statistics(self) -> None:
        # Before anything changes, so that a forgotten sample_fisher() leaves no half-done step.
        for layer in self._layers:
            if layer.a_sum is not None and layer.s_sum is None and self._due(layer):
                raise RuntimeError(
                    f"kfac (fisher='sampled'): layer {layer.name!r} recorded activations but no "
                    "sampled output gradients; call opt.sample_fisher(outputs) (or "
                    "opt.fisher_backward(nll)) after the forward pass whenever opt.factors_due"
                )

    def _update_factors(self, layer: _Layer, state: dict[str, Any], decay: float) -> None:
        if layer.a_sum is None or layer.s_sum is None:
            # No training-mode forward since the last step, or its output did not reach the
            # loss: keep the factors.
            return
        if not (all_finite(layer.a_sum) and all_finite(layer.s_sum)):
            # An EMA never forgets a NaN: folding it in would make every later inversion fail.
            state["kfac.rejected_statistics"] = state.get("kfac.rejected_statistics", 0) + 1
            self._warn_once(
                layer,
                "statistics",
                "recorded NaN/Inf activation or output-gradient statistics; they were not "
                "folded into its factors (counted in state['kfac.rejected_statistics'])",
            )
            return
        state["kfac.A"] = update_ema(state.get("kfac.A"), layer.a_sum / layer.a_count, decay)
        state["kfac.S"] = update_ema(state.get("kfac.S"), layer.s_sum / layer.s_count, decay)

    def _update_inverses(self, due: list[tuple[_Layer, dict[str, Any], dict[str, Any]]]) -> None:
        """Recompute the damped inverses of the ``(layer, group, state)`` entries, split between
        ranks when this optimizer has a :class:`~guided_descent.distributed.WorkSplit`."""
        if not due:
            return
        results: list[DampedInverses | str]
        if self.work_split is None:
            results = [self._inverses(state, float(group["damping"])) for _, group, state in due]
        else:
            results = self._split_inverses(due, self.work_split)
        for (layer, _group, state), result in zip(due, results, strict=True):
            if isinstance(result, str):
                state["kfac.inverse_failures"] += 1
                kept = (
                    "keeping its last good inverse"
                    if "kfac.A_inv" in state
                    else "using the unpreconditioned gradient until an inversion succeeds"
                )
                self._warn_once(
                    layer, "inverse", f"could not invert its damped factors ({result}); {kept}"
                )
                continue
            state["kfac.A_inv"], state["kfac.S_inv"] = result.A_inv, result.S_inv
            state["kfac.inverted_at"] = state["kfac.step"] + 1  # the count after this step
            self._observe(layer.weight, condition=result.condition)

    @staticmethod
    def _inverses(state: dict[str, Any], damping: float) -> DampedInverses | str:
        """The damped inverses, or why they could not be computed."""
        try:
            return damped_inverses(state["kfac.A"], state["kfac.S"], damping)
        except MatrixFunctionError as err:
            return str(err)

    def _split_inverses(
        self, due: list[tuple[_Layer, dict[str, Any], dict[str, Any]]], split: WorkSplit
    ) -> list[DampedInverses | str]:
        """Each rank inverts the factors of its share of the layers; the inverses, condition
        numbers and success flags reach every rank, so every replica keeps the same state."""
        specs, costs = [], []
        for _layer, _group, state in due:
            A, S = state["kfac.A"], state["kfac.S"]
            specs.append(
                [
                    TensorSpec.of(A),
                    TensorSpec.of(S),
                    TensorSpec((), A.dtype, A.device),  # condition number
                    TensorSpec((), torch.bool, A.device),  # succeeded
                ]
            )
            costs.append(inverse_root_flops(A.shape[0]) + inverse_root_flops(S.shape[0]))

        def compute(indices: list[int]) -> list[list[Tensor]]:
            out = []
            for i in indices:
                _layer, group, state = due[i]
                A, S = state["kfac.A"], state["kfac.S"]
                result = self._inverses(state, float(group["damping"]))
                if isinstance(result, str):
                    failed = A.new_zeros((), dtype=torch.bool)
                    out.append([torch.zeros_like(A), torch.zeros_like(S), A.new_zeros(()), failed])
                else:
                    ok = A.new_ones((), dtype=torch.bool)
                    condition = result.condition.to(A.dtype)
                    out.append([result.A_inv, result.S_inv, condition, ok])
            return out

        shared = split.map("inverse", costs, specs, compute)
        return [
            DampedInverses(A_inv, S_inv, condition)
            if bool(ok)
            else "eigh failed on the rank that computed it"
            for A_inv, S_inv, condition, ok in shared
        ]

    def _warn_once(self, layer: _Layer, kind: str, message: str) -> None:
        if (layer.name, kind) in self._warned:
            return
        self._warned.add((layer.name, kind))
        warnings.warn(f"kfac: layer {layer.name!r} {message}", RuntimeWarning, stacklevel=4)

    def _apply(self, layer: _Layer, group: dict[str, Any], U: Tensor) -> None:
        state = self.state[layer.weight]
        momentum = float(group["momentum"])
        if momentum != 0.0:
            buf = state.get("kfac.momentum_buffer")
            if buf is None:
                buf = state["kfac.momentum_buffer"] = torch.zeros_like(U)
            U = buf.mul_(momentum).add_(U)
        lr = float(group["lr"])
        shrink = 1.0 - lr * float(group["weight_decay"])
        d_in = layer.shape[1]
        updates = [(layer.weight, U[:, :d_in].reshape(layer.weight.shape))]
        if layer.bias is not None:
            updates.append((layer.bias, U[:, d_in]))
        for p, update in updates:
            if p.grad is None:
                continue
            self._observe(p, update_rms=rms(update, lr))
            if p.dtype == U.dtype:
                if shrink != 1.0:
                    p.mul_(shrink)
                p.sub_(update, alpha=lr)
            else:  # bf16/fp16 weights: one rounding, after the float32 arithmetic
                p.copy_(p.to(U.dtype).mul_(shrink).sub_(update, alpha=lr))
        state["kfac.step"] += 1

    # ------------------------------------------------------------------------------ state

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        if group["algorithm"] != ALGORITHM:
            assert self._fallback is not None  # a fallback group exists only with a fallback
            return self._fallback.expected_state(p, group)  # type: ignore[attr-defined]
        layer = self._by_weight.get(id(p))
        if layer is None:
            return (), {}  # a folded bias: its layer's state lives on the weight
        d_out, d_in = layer.shape
        a_dim = d_in + (layer.bias is not None)
        shapes = {
            "kfac.A": (a_dim, a_dim),
            "kfac.A_inv": (a_dim, a_dim),
            "kfac.S": (d_out, d_out),
            "kfac.S_inv": (d_out, d_out),
            "kfac.momentum_buffer": (d_out, a_dim),
        }
        return ("kfac.step", "kfac.inverse_failures"), shapes

    def _param_name(self, p: Tensor) -> str | None:
        return self._names.get(id(p))

    def _extra_diagnostics(self) -> dict[str, Any]:
        return distributed_report(self.state, [self.work_split])

    def _param_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        if group["algorithm"] != ALGORITHM:
            assert self._fallback is not None
            return self._fallback._param_diagnostics(p, group)  # type: ignore[attr-defined]
        layer = self._by_weight.get(id(p)) or self._by_bias.get(id(p))
        out = super()._param_diagnostics(p, group)
        state = self.state.get(layer.weight) if layer is not None else None
        if layer is None or not state:
            return out
        inverted_at = state.get("kfac.inverted_at")
        return {
            **out,
            "preconditioner": "kfac",
            "preconditioner_age": None if inverted_at is None else state["kfac.step"] - inverted_at,
            "condition_number": self._observation(layer.weight).get("condition"),
            "failures": state["kfac.inverse_failures"] + state.get("kfac.rejected_statistics", 0),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to its parameter's dtype on load; K-FAC keeps its
        # statistics in float32 for bf16 layers, so put back the saved tensors as they were.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key.startswith("kfac.") and isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        if self._fallback is not None:
            self._fallback.param_groups = [
                g for g in self.param_groups if g["algorithm"] != ALGORITHM
            ]
            self._fallback.state = self.state
        # Warn-once memory describes the replaced state (or the zero-gradient step DCP runs to
        # build a template): forget it.
        self._warned.clear()

    # ------------------------------------------------------------------------------ display

    def describe(self) -> str:
        """Which parameters K-FAC preconditions and which go to the fallback, and why."""
        lines: list[str] = []
        if self._layers:
            lines.append(f"K-FAC preconditions {len(self._layers)} layer(s) (fisher="
                         f"{self.settings.fisher!r}):")
            width = max(len(layer.name) for layer in self._layers)
            for layer in self._layers:
                d_out, d_in = layer.shape
                a_dim = d_in + (layer.bias is not None)
                bias = "bias folded" if layer.bias is not None else "no bias"
                lines.append(
                    f"  {layer.name:<{width}}  {type(layer.module).__name__:<6}  "
                    f"A {a_dim}x{a_dim}  S {d_out}x{d_out}  {bias}"
                )
        else:
            lines.append("K-FAC found no nn.Linear / nn.Conv2d layer: it preconditions nothing.")
        if self._fallback_params:
            lines.append(f"fallback {self.fallback_name!r} updates "
                         f"{len(self._fallback_params)} parameter(s):")
            width = max(len(name) for name, _, _ in self._fallback_params)
            for name, p, reason in self._fallback_params:
                shape = "x".join(map(str, p.shape)) or "scalar"
                lines.append(f"  {name:<{width}}  {shape:<12}  {reason}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{self.describe()}\n{super().__repr__()}"


def kfac(
    model: nn.Module,
    *,
    lr: float = 0.01,
    momentum: float = 0.5,
    damping: float = 1e-3,
    weight_decay: float = 0.0,
    stat_decay: float = 0.95,
    kl_clip: float | None = 1e-3,
    factor_frequency: int = 1,
    inverse_frequency: int = 10,
    fisher: Fisher = "empirical",
    loss_reduction: LossReduction = "mean",
    fallback: str = "adamw",
    fallback_hyperparams: Mapping[str, Any] | None = None,
    on_nonfinite: str = "skip",
    distributed: Distributed = None,
) -> KFAC:
    """Build :class:`KFAC` for ``model`` (see its docstring for the update and the arguments)."""
    return KFAC(
        model,
        lr=lr,
        momentum=momentum,
        damping=damping,
        weight_decay=weight_decay,
        stat_decay=stat_decay,
        kl_clip=kl_clip,
        factor_frequency=factor_frequency,
        inverse_frequency=inverse_frequency,
        fisher=fisher,
        loss_reduction=loss_reduction,
        fallback=fallback,
        fallback_hyperparams=fallback_hyperparams,
        on_nonfinite=on_nonfinite,
        distributed=distributed,
    )


register(
    OptimizerSpec(
        name="kfac",
        family="layer-wise",
        rule="p -= lr * (S + √λ/π I)⁻¹ G (A + π√λ I)⁻¹ per Linear/Conv2d layer; "
        "KL-clipped, momentum; fallback optimizer for the rest",
        state="per layer: A (d_in+1)², S d_out² and their inverses, 1x momentum; "
        "the fallback's state for other parameters",
        state_buffers=1.0,
        reference="Martens & Grosse 2015, arXiv 1503.05671; Grosse & Martens 2016, "
        "arXiv 1602.01407",
        factory=kfac,
        needs_model=True,
    )
)
