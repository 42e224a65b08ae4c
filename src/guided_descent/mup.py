"""Maximal update parametrization (μP): per-layer learning rates and initial scales across width.

Tune hyper-parameters on a narrow *base* model, then train a wide one with the same numbers: μP
(Yang et al. 2022, "Tensor Programs V", arXiv 2203.03466) rescales each parameter's learning rate
and initialisation with width so that every layer's activations move by Θ(1) per step at every
width, which makes the best learning rate (nearly) width-independent. At the base width μP *is*
the standard parametrization (SP), so a base model tuned as usual needs no change.

**Which formulation.** We implement the one that needs no change to the forward pass (TP5's
Table 3, written relative to the base shapes): only initial weights and per-parameter learning
rates change. The equivalent "output multiplier" form (the readout's output multiplied by
``1/width``, as in the ``mup`` package) would need the model's code to change; with a scale-
invariant optimizer such as Adam, scaling a layer's output by ``c`` is the same as scaling its
initial weights and learning rate by ``c``, which is how the two forms map onto each other.

**Classification** (:func:`classify`), from the module structure:

* *input* -- every ``nn.Embedding`` weight; if the model has no embedding, the weight of the
  first ``nn.Linear``/``nn.Conv*d`` (registration order): the layer that reads the data;
* *output* -- the weight of the last ``nn.Linear`` (the readout);
* *hidden* -- every other ``nn.Linear``/``nn.Conv*d`` weight;
* *vector* -- biases, normalization gains and biases, and free-standing parameters: things with
  one width-sized dimension at most (TP5 groups them with input weights; the rules agree).

``fnmatch`` patterns on parameter names override the rules, as in :mod:`guided_descent.routing`.

**Rules** (:func:`parametrize`), with ``r_in = fan_in / base_fan_in`` and ``r_out = fan_out /
base_fan_out`` of each weight (``(out, in, *k)``: ``fan_out = out``, ``fan_in = in·prod(k)``;
an embedding ``(vocab, d)``: ``fan_in = vocab``, ``fan_out = d``), and ``r`` a vector's size ratio:

=============  ============================  ==================  ========================
kind           initial scale (x model's)     Adam-like lr (x)    SGD-like lr (x)
=============  ============================  ==================  ========================
input          1                             1 / r_in  (= 1)     r_out / r_in
hidden         1                             1 / r_in            r_out / r_in  (= 1)
output         1 / sqrt(r_in)                1 / r_in            r_out / r_in  (= 1 / r_in)
vector         1                             1                   r
=============  ============================  ==================  ========================

The initial-scale column assumes the model initialises weights with variance ∝ 1/fan_in, as
``nn.Linear``, ``nn.Conv*d`` and Kaiming schemes do (``init="fan_in"``): μP keeps that for input
and hidden weights and wants variance ∝ 1/fan_in² for the readout. For a model whose initial
std does not depend on width, such as GPT-2's N(0, 0.02) (``init="fixed"``), the column becomes
1, 1/sqrt(r_in), 1/r_in. Vector-like parameters keep their initial values (biases that start
smaller than Θ(1), like torch's default, act in the limit like zero-initialised ones, which μP
allows).

*Adam-like* covers Adam, AdamW, NAdam, RMSprop, AdaGrad and Lion (updates invariant to the
gradient's scale: TP5 Appendix B.3); *SGD-like* covers SGD with or without (Nesterov) momentum.

**Matrix optimizers** (Muon, Shampoo, SOAP): the spectral condition of Yang, Simon & Bernstein
2023 (arXiv 2310.17813) asks each weight update to have spectral norm ∝ sqrt(fan_out/fan_in).
These optimizers produce updates whose spectral norm is known from the shape: ``lr·s(m, n)`` with
Muon's ``adjust_lr`` factor ``s`` (its update is orthogonal), and about ``lr`` for Shampoo without
grafting and for SOAP (whole-matrix preconditioning whitens the gradient's singular values: on a
single gradient both give ``U Vᵀ``). So a matrix parameter's lr multiplier is
``sqrt(r_out / r_in) · s(base shape) / s(shape)``: 1 for hidden matrices whose both sides grow
with width (Muon's own scaling already transfers), 1/sqrt(r_in) for a readout sent to Muon.
Shampoo with Adam/AdaGrad grafting takes the *size* of its step from the diagonal method, so its
matrix groups follow the Adam-like rule. The parameters a hybrid routes to AdamW follow the
Adam-like rule. Initial scales are those of the table (the spectral condition asks the same:
``std ∝ (1/sqrt(fan_in))·min(1, sqrt(fan_out/fan_in))`` scales like the table for input, hidden
and output weights).

Not covered: μP's ``1/d_head`` attention-logit scale is a change to the forward pass; grow a
Transformer by its number of heads at a fixed head size (as the tests do) or change the model.
A weight tied between the embedding and the readout cannot follow both rules; it is classified
as input and a warning says so (untie it for μP).

**Coordinate check** (:func:`coordinate_check`): mean ``|activation|`` of every layer at each of
the first training steps, per width, through forward hooks -- flat across widths under μP, growing
under SP. It is the standard test that a parametrization is implemented right.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from guided_descent.optimizers.muon import DEFAULT_ADAMW_LR as MUON_ADAMW_LR
from guided_descent.preconditioners.orthogonalize import ADJUST_LR, shape_scale
from guided_descent.routing import FALLBACK, Structure, guess_structure, route, trace

Kind = Literal["input", "hidden", "output", "vector"]
KINDS: tuple[str, ...] = get_args(Kind)
Init = Literal["fan_in", "fixed"]
INITS: tuple[str, ...] = get_args(Init)
Update = Literal["sgd", "adam", "spectral"]

SGD_LIKE: tuple[str, ...] = ("sgd", "momentum", "nesterov")
ADAM_LIKE: tuple[str, ...] = ("adam", "adamw", "nadam", "rmsprop", "adagrad", "lion")
MATRIX: tuple[str, ...] = ("muon", "shampoo", "soap")
SUPPORTED: tuple[str, ...] = (*SGD_LIKE, *ADAM_LIKE, *MATRIX)

_MATRIX_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


# --- classification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamKind:
    """One parameter's μP class, its fans (see the module docstring) and why."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    fan_in: int
    fan_out: int
    reason: str
    lookup: bool = False  # an embedding table: rows index the input, columns are the output


class Classification:
    """The μP classes of one model's trainable parameters, in ``named_parameters`` order."""

    def __init__(self, rows: list[ParamKind]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[ParamKind]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def kinds(self) -> dict[str, str]:
        """Parameter name -> kind."""
        return {r.name: r.kind for r in self.rows}

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [9])
        lines = [f"{'parameter':<{width}}  {'kind':<6}  {'shape':<14}  reason"]
        for r in self.rows:
            shape = "x".join(map(str, r.shape)) or "scalar"
            lines.append(f"{r.name:<{width}}  {r.kind:<6}  {shape:<14}  {r.reason}")
        return "\n".join(lines)

    __repr__ = __str__


def _fans(shape: tuple[int, ...], kind: Kind, lookup: bool) -> tuple[int, int]:
    """``(fan_out, fan_in)`` of a parameter of ``shape`` (see the module docstring)."""
    if kind == "vector":
        return math.prod(shape), 1
    if lookup:
        return shape[1], shape[0]  # an embedding (vocab, d) maps a one-hot vocab vector to d
    # (out, in, *kernel) seen as one (out, in·prod(kernel)) matrix, as Muon's "flatten" view.
    return shape[0], math.prod(shape[1:])


def classify(
    model: nn.Module,
    overrides: Mapping[str, str] | None = None,
    *,
    example_inputs: Any = None,
    structure: Structure | None = None,
) -> Classification:
    """The μP class of every trainable parameter of ``model`` (rules: the module docstring).

    ``overrides`` maps ``fnmatch`` patterns on parameter names to a kind; first match wins. The
    output head and the layer that reads the data are those routing finds
    (:func:`guided_descent.routing.guess_structure`, or :func:`~guided_descent.routing.trace`
    of one forward pass on ``example_inputs``): one answer for μP and for the optimizers.
    """
    overrides = dict(overrides or {})
    for pattern, kind in overrides.items():
        if kind not in KINDS:
            raise ValueError(f"μP override {pattern!r} -> {kind!r}: kind must be one of {KINDS}")
    embeddings: set[int] = set()
    linears: list[int] = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
        if isinstance(module, nn.Linear):
            linears.append(id(module.weight))
    if structure is None:
        structure = (
            guess_structure(model) if example_inputs is None else trace(model, example_inputs)
        )
    # A head tied to the embedding is the embedding's weight (warned about below).
    output = set(structure.heads) | (embeddings & set(linears))
    # The layer that reads the data: the embeddings if there are any, else the first matrix.
    first = set(structure.inputs)
    owners: dict[int, tuple[str, nn.Module]] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (attr, module))

    rows = []
    tied = []
    for name, p in model.named_parameters():  # a shared parameter appears once, by first name
        if not p.requires_grad:
            continue
        attr, owner = owners[id(p)]
        matched = next((pat for pat in overrides if fnmatch.fnmatchcase(name, pat)), None)
        if matched is not None:
            kind: Kind = overrides[matched]  # type: ignore[assignment]
            reason = f"override {matched!r}"
        else:
            kind, reason = _rule(p, attr, owner, embeddings, first, output)
            if id(p) in embeddings and id(p) in output:
                tied.append(name)
                reason += "; tied to the output head (the output rule is not applied)"
        if kind != "vector" and p.dim() < 2:
            raise ValueError(f"μP: {name} has shape {tuple(p.shape)}; a {kind} weight needs 2-D")
        lookup = isinstance(owner, nn.Embedding) and attr == "weight"
        fan_out, fan_in = _fans(tuple(p.shape), kind, lookup)
        rows.append(ParamKind(name, tuple(p.shape), kind, fan_in, fan_out, reason, lookup))
    if tied:
        warnings.warn(
            f"μP: {', '.join(tied)} is both an embedding and the output head (tied weights); it "
            "is treated as an input weight, so the readout gets no μP scaling. Untie the head "
            "for μP.",
            RuntimeWarning,
            stacklevel=2,
        )
    return Classification(rows)


def _rule(
    p: Tensor,
    attr: str,
    owner: nn.Module,
    embeddings: set[int],
    first: set[int],
    output: set[int],
) -> tuple[Kind, str]:
    kind = type(owner).__name__
    if id(p) in embeddings:
        return "input", "embedding"
    if isinstance(owner, _NORMS):
        return "vector", f"normalization ({kind}) {attr}"
    if attr == "bias":
        return "vector", f"bias of {kind}"
    if isinstance(owner, _MATRIX_MODULES) and attr == "weight" and p.dim() >= 2:
        if id(p) in output:
            return "output", f"output head ({kind})"
        if id(p) in first:
            return "input", f"first {kind}: reads the data"
        return "hidden", f"hidden matrix ({kind})"
    return "vector", f"not a Linear/Conv/Embedding weight ({kind}.{attr}, {p.dim()}-D)"


# --- the rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How one kind of optimizer's learning rates scale with width.

    ``update``: ``"adam"`` (scale-invariant updates), ``"sgd"``, or ``"spectral"`` (an update of
    known spectral norm ``lr · s(m, n)``). ``spectral_scale``: for ``"spectral"``, Muon's
    ``adjust_lr`` name (``"original"``, ``"match_rms_adamw"``) or ``"none"`` (``s = 1``).
    """

    update: Update
    spectral_scale: str = "none"

    def __post_init__(self) -> None:
        if self.update not in get_args(Update):
            raise ValueError(
                f"μP rule: update must be one of {get_args(Update)}, got {self.update!r}"
            )
        allowed = ("none", *ADJUST_LR)
        if self.spectral_scale not in allowed:
            raise ValueError(
                f"μP rule: spectral_scale must be one of {allowed}, got {self.spectral_scale!r}"
            )

    def scale(self, fan_out: int, fan_in: int) -> float:
        """The optimizer's own shape factor on its update's spectral norm."""
        if self.spectral_scale == "none":
            return 1.0
        return shape_scale(fan_out, fan_in, self.spectral_scale)  # type: ignore[arg-type]


ADAM_RULE = Rule("adam")
SGD_RULE = Rule("sgd")


def lr_multiplier(
    kind: Kind, rule: Rule, fans: tuple[int, int], base_fans: tuple[int, int]
) -> float:
    """The μP learning-rate multiplier of one parameter; ``fans`` are ``(fan_out, fan_in)``."""
    (fan_out, fan_in), (base_out, base_in) = fans, base_fans
    r_out, r_in = fan_out / base_out, fan_in / base_in
    if kind == "vector":
        return r_out if rule.update == "sgd" else 1.0
    if rule.update == "adam":
        return 1.0 / r_in
    if rule.update == "sgd":
        return r_out / r_in
    return math.sqrt(r_out / r_in) * rule.scale(base_out, base_in) / rule.scale(fan_out, fan_in)


def init_multiplier(kind: Kind, r_in: float, init: Init) -> float:
    """The factor μP applies to a parameter's initial values (the model's init is ``init``)."""
    if init not in INITS:
        raise ValueError(f"μP: init must be one of {INITS}, got {init!r}")
    if kind == "output":
        return 1.0 / math.sqrt(r_in) if init == "fan_in" else 1.0 / r_in
    if kind == "hidden" and init == "fixed":
        return 1.0 / math.sqrt(r_in)
    return 1.0


def rules_for(
    optimizer: str, *, adjust_lr: str = "original", grafting: str = "adam"
) -> tuple[str | None, Rule, Rule]:
    """(matrix algorithm or None, rule for its matrix groups, rule for everything else).

    ``adjust_lr``: Muon's option of that name; ``grafting``: Shampoo's.
    """
    if optimizer in SGD_LIKE:
        return None, SGD_RULE, SGD_RULE
    if optimizer in ADAM_LIKE:
        return None, ADAM_RULE, ADAM_RULE
    if optimizer == "muon":
        return "muon", Rule("spectral", adjust_lr), ADAM_RULE
    if optimizer == "soap":
        return "soap", Rule("spectral"), ADAM_RULE
    if optimizer == "shampoo":
        if grafting not in ("adam", "adagrad", "none"):
            raise ValueError(f"μP: grafting must be 'adam', 'adagrad' or 'none', got {grafting!r}")
        # With grafting the step's size is the diagonal method's: Adam's rule applies.
        return "shampoo", (Rule("spectral") if grafting == "none" else ADAM_RULE), ADAM_RULE
    raise ValueError(f"μP: no rule for optimizer {optimizer!r}; supported: {', '.join(SUPPORTED)}")


# --- the parametrization ------------------------------------------------------------------------


@dataclass(frozen=True)
class MuParam:
    """One parameter under μP: its class, width ratios and multipliers."""

    name: str
    shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    kind: Kind
    r_in: float
    r_out: float
    algorithm: str | None
    init_mult: float
    lr_mult: float
    reason: str


class MuP:
    """μP for one model and optimizer: a printable table and the optimizer's param groups."""

    def __init__(
        self, model: nn.Module, rows: list[MuParam], optimizer: str, matrix: str | None
    ) -> None:
        self.rows = rows
        self.optimizer = optimizer
        self.matrix = matrix
        self._params = dict(model.named_parameters())

    def __iter__(self) -> Iterator[MuParam]:
        return iter(self.rows)

    def param_groups(self, lr: float, adamw_lr: float | None = None) -> list[dict[str, Any]]:
        """Param groups with ``lr`` times each parameter's multiplier, for ``optimizer``.

        Parameters with equal multipliers share a group. For a hybrid (Muon, Shampoo, SOAP) the
        groups carry ``"algorithm"``; the matrix groups scale ``lr`` and the AdamW groups scale
        ``adamw_lr`` (default: Muon's AdamW default, 3e-4; Shampoo and SOAP: ``lr``, as those
        optimizers do). ``LambdaLR`` and every torch scheduler keep the ratios, as they scale
        each group's own initial ``lr``.
        """
        for what, value in (("lr", lr), ("adamw_lr", adamw_lr)):
            if value is None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not 0.0 <= value < math.inf:
                raise ValueError(f"μP: {what} must be a finite number >= 0, got {value!r}")
        if adamw_lr is None:
            adamw_lr = MUON_ADAMW_LR if self.matrix == "muon" else lr
        groups: dict[tuple[str | None, float], list[nn.Parameter]] = {}
        for row in self.rows:
            groups.setdefault((row.algorithm, row.lr_mult), []).append(self._params[row.name])
        out = []
        for (algorithm, mult), params in groups.items():
            group: dict[str, Any] = {"params": params}
            if algorithm is None:
                group["lr"] = lr * mult
            else:
                group["algorithm"] = algorithm
                group["lr"] = (adamw_lr if algorithm == FALLBACK else lr) * mult
            out.append(group)
        return out

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [9])
        head = f"{'parameter':<{width}}  {'kind':<6}  {'shape':<12}  {'r_in':>6}  {'r_out':>6}"
        if self.matrix:
            head += f"  {'optimizer':<9}"
        lines = [head + f"  {'init x':>7}  {'lr x':>8}  reason"]
        for r in self.rows:
            shape = "x".join(map(str, r.shape)) or "scalar"
            line = f"{r.name:<{width}}  {r.kind:<6}  {shape:<12}  {r.r_in:>6.3g}  {r.r_out:>6.3g}"
            if self.matrix:
                line += f"  {r.algorithm:<9}"
            lines.append(line + f"  {r.init_mult:>7.4g}  {r.lr_mult:>8.4g}  {r.reason}")
        return "\n".join(lines)

    __repr__ = __str__


def _base_shapes(base: nn.Module | Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if isinstance(base, nn.Module):
        return {n: tuple(p.shape) for n, p in base.named_parameters()}
    if isinstance(base, Mapping):
        return {str(n): tuple(int(d) for d in s) for n, s in base.items()}
    raise TypeError(
        f"μP: base must be an nn.Module or a mapping name -> shape, got {type(base).__name__}"
    )


def parametrize(
    model: nn.Module,
    base: nn.Module | Mapping[str, Sequence[int]],
    optimizer: str,
    *,
    init: Init = "fan_in",
    rescale_init: bool = True,
    overrides: Mapping[str, str] | None = None,
    routing: Mapping[str, str] | None = None,
    adjust_lr: str = "original",
    grafting: str = "adam",
    example_inputs: Any = None,
) -> MuP:
    """Put ``model`` in μP relative to ``base`` for ``optimizer``; return the plan.

    ``base`` is the same architecture at the base width (build it on the meta device: ``with
    torch.device("meta"): base = make(64)``) or a mapping parameter name -> shape. With
    ``rescale_init`` (default) the model's initial weights are multiplied in place by their init
    multipliers -- call this once, right after building the model. ``init`` says how the model
    initialises (``"fan_in"``: variance ∝ 1/fan_in, torch's default; ``"fixed"``: a
    width-independent std). ``optimizer`` is a registry name (see :data:`SUPPORTED`);
    ``routing`` (Muon/Shampoo/SOAP: ``fnmatch`` patterns -> ``"adamw"`` or the method) is passed to
    :func:`guided_descent.routing.route`; ``adjust_lr`` is Muon's and ``grafting`` Shampoo's
    option of that name, so that the rules match the optimizer you build. ``example_inputs``
    (the arguments of one forward pass) let the output head and input layer be read off the
    model's graph, as :func:`guided_descent.routing.route` does with them.

    Then ``gd.create(optimizer, plan.param_groups(lr=...), ...)``.
    """
    if init not in INITS:
        raise ValueError(f"μP: init must be one of {INITS}, got {init!r}")
    if adjust_lr not in ADJUST_LR:
        raise ValueError(f"μP: adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")
    matrix, matrix_rule, other_rule = rules_for(optimizer, adjust_lr=adjust_lr, grafting=grafting)
    base_shapes = _base_shapes(base)
    structure = None if example_inputs is None else trace(model, example_inputs)
    table = classify(model, overrides, structure=structure)
    names = [r.name for r in table]
    missing = [n for n in names if n not in base_shapes]
    if missing:
        raise ValueError(f"μP: the base has no parameter(s) {', '.join(missing)}")
    algorithms: dict[str, str] = {}
    if matrix is not None:
        table_ = route(model, matrix, routing, structure=structure)
        algorithms = {r.name: r.algorithm for r in table_.routes}
    elif routing:
        raise ValueError(f"μP: routing applies to {', '.join(MATRIX)}, not to {optimizer!r}")

    rows = []
    for r in table:
        base_shape = base_shapes[r.name]
        if len(base_shape) != len(r.shape):
            raise ValueError(
                f"μP: {r.name} has shape {r.shape} but {base_shape} in the base (different rank)"
            )
        base_fans = _fans(base_shape, r.kind, r.lookup)
        r_out, r_in = r.fan_out / base_fans[0], r.fan_in / base_fans[1]
        algorithm = algorithms.get(r.name)
        rule = matrix_rule if algorithm not in (None, FALLBACK) else other_rule
        rows.append(
            MuParam(
                name=r.name,
                shape=r.shape,
                base_shape=base_shape,
                kind=r.kind,
                r_in=r_in,
                r_out=r_out,
                algorithm=algorithm,
                init_mult=init_multiplier(r.kind, r_in, init),
                lr_mult=lr_multiplier(r.kind, rule, (r.fan_out, r.fan_in), base_fans),
                reason=r.reason,
            )
        )
    plan = MuP(model, rows, optimizer, matrix)
    if rescale_init:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for row in rows:
                if row.init_mult != 1.0:
                    params[row.name].mul_(row.init_mult)
    return plan


# --- coordinate check ---------------------------------------------------------------------------


class ActivationScales:
    """Forward hooks recording the mean ``|output|`` of chosen modules at every forward call.

    ``modules``: name -> module (default: every ``nn.Linear``, ``nn.Conv*d`` and ``nn.Embedding``
    of the model, whose outputs are the pre-activations and logits). Use as a context manager;
    ``history[name]`` lists one float per forward. Reading each value is a device sync: this is a
    diagnostic for a handful of steps, not for a whole run.
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> None:
        if modules is None:
            modules = {
                n: m
                for n, m in model.named_modules()
                if isinstance(m, (*_MATRIX_MODULES, nn.Embedding))
            }
        if not modules:
            raise ValueError("ActivationScales: no module to watch")
        self.modules = dict(modules)
        self.history: dict[str, list[float]] = {n: [] for n in self.modules}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.history[name].append(float(out.detach().abs().float().mean()))

        return record

    def __enter__(self) -> ActivationScales:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def coordinate_check(
    build: Callable[[int], tuple[nn.Module, torch.optim.Optimizer]],
    widths: Sequence[int],
    loss: Callable[[nn.Module, int], Tensor],
    steps: int = 5,
) -> dict[int, dict[str, list[float]]]:
    """width -> layer -> mean ``|activation|`` at the forward of step 0, 1, ..., ``steps - 1``.

    ``build(width)`` returns a fresh model and its optimizer; ``loss(model, t)`` runs one forward
    on step ``t``'s batch and returns the loss (one forward per step: the record at step ``t``
    shows the model after ``t`` updates). Under μP each layer's curve should sit at the same
    height for every width; under SP the later steps grow with width.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"coordinate_check: steps must be an integer >= 1, got {steps!r}")
    out: dict[int, dict[str, list[float]]] = {}
    for width in widths:
        model, opt = build(width)
        with ActivationScales(model) as scales:
            for t in range(steps):
                opt.zero_grad(set_to_none=True)
                loss(model, t).backward()
                opt.step()
        out[width] = scales.history
    return out


__all__ = [
    "ADAM_LIKE",
    "INITS",
    "KINDS",
    "MATRIX",
    "SGD_LIKE",
    "SUPPORTED",
    "ActivationScales",
    "Classification",
    "MuP",
    "MuParam",
    "ParamKind",
    "Rule",
    "classify",
    "coordinate_check",
    "init_multiplier",
    "lr_multiplier",
    "parametrize",
    "rules_for",
]
