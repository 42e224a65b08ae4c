"""Which parameter goes to which update rule, and how a matrix method sees it.

Matrix methods (Muon, Shampoo, SOAP) are meant for the weight matrices inside a network. What
each method takes is part of the method: a :class:`RoutingPolicy` (Muon's, for example, sends the
output head, the embeddings, normalization gains and biases to AdamW, as its authors do). Given a
model, :func:`route` applies the policy to every trainable parameter and says why:

* **Roles come from the model's structure, not from registration order.** The *output head* is
  the weight of the matrix product nearest to the model's output, the *input layer* the one
  applied to the raw input; both are read off the autograd graph of one forward pass
  (:func:`trace` with ``example_inputs``, or the first forward pass the optimizer sees, before its
  first step). A weight tied to an ``nn.Embedding`` is an embedding wherever it is used. Without a
  forward pass the roles are *provisional*: the head is the ``nn.Linear`` whose output size is an
  embedding's vocabulary, else the last ``nn.Linear`` registered; the table says so.
* **Matrices inside other layers.** ``nn.MultiheadAttention``'s packed ``in_proj_weight``
  ``(3d, d)`` is three matrices, Q, K and V (view ``"split:3"``; per head with
  ``attention="heads"``), and ``q/k/v_proj_weight`` one each; the gate blocks of ``nn.GRU`` /
  ``nn.LSTM`` / ``nn.RNN`` (and their cells) are separate matrices (``"split:3"``, ``"split:4"``);
  a free parameter with three or more dimensions used in a matrix product is a stack of matrices
  (``"batch"``, e.g. ``(E, m, n)`` experts); convolution kernels are one matrix each
  (``"flatten"``). :mod:`guided_descent.preconditioners.views` defines the views.
* **Free parameters** (not the weight of a layer torch defines) go to the matrix method when the
  traced forward multiplies them as matrices and to AdamW when it only adds or scales with them
  (a learned positional embedding, a gain). Without a trace, a 2-D free parameter is taken for a
  matrix unless it is named like an embedding (``pos``, ``emb``, ``token``, ``cls``, ...), and a
  parameter with a broadcast (size-1) leading dimension for an additive one.

Name patterns (``fnmatch`` on the parameter's qualified name) override the rules, first match
wins. :class:`RoutingTable` prints as a table -- the one the optimizer applies -- and checks that
every trainable parameter is routed exactly once.
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from guided_descent.preconditioners.views import BATCH, FLATTEN, split_view

FALLBACK = "adamw"
_LINEAR = (nn.Linear,)
_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_MATRIX_MODULES = _LINEAR + _CONV
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)
_RNN = (nn.RNNBase, nn.RNNCellBase)

Attention = Literal["qkv", "heads", "whole"]
ATTENTION: tuple[str, ...] = get_args(Attention)


@dataclass(frozen=True)
class RoutingPolicy:
    """What a matrix method takes from a model (everything else goes to AdamW).

    ``head``: the output head; ``input_layer``: the first matrix layer when the model has no
    embedding; ``embeddings``: ``nn.Embedding`` tables (and weights tied to them); ``vectors``:
    biases, normalization gains and other parameters with fewer than two dimensions (only for
    methods that handle them, as Shampoo's and SOAP's diagonal paths do). ``attention``: Q, K, V
    of a packed attention projection as three matrices (``"qkv"``), one per head (``"heads"``), or
    one ``(3d, d)`` matrix (``"whole"``). ``gates``: recurrent gate blocks as separate matrices.
    """

    head: bool = False
    input_layer: bool = True
    embeddings: bool = False
    vectors: bool = False
    attention: Attention = "qkv"
    gates: bool = True

    def __post_init__(self) -> None:
        for key in ("head", "input_layer", "embeddings", "vectors", "gates"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"RoutingPolicy: {key} must be a bool, got {value!r}")
        if self.attention not in ATTENTION:
            raise ValueError(
                f"RoutingPolicy: attention must be one of {ATTENTION}, got {self.attention!r}"
            )


# The policy of each matrix method, registered by the method's module (see set_policy).
_POLICIES: dict[str, RoutingPolicy] = {}
DEFAULT_POLICY = RoutingPolicy()


def set_policy(algorithm: str, policy: RoutingPolicy) -> None:
    """Make ``policy`` the default routing of ``algorithm`` (each matrix method registers one)."""
    if not isinstance(policy, RoutingPolicy):
        raise TypeError(f"set_policy: expected a RoutingPolicy, got {type(policy).__name__}")
    _POLICIES[algorithm] = policy


def policy_for(algorithm: str) -> RoutingPolicy:
    """The registered policy of ``algorithm``, or :data:`DEFAULT_POLICY`."""
    return _POLICIES.get(algorithm, DEFAULT_POLICY)


@dataclass(frozen=True)
class Route:
    """One parameter's destination, how the matrix method sees it, and why.

    ``view`` is the matrix view the parameter has (or would have) under the matrix method;
    ``None`` for parameters with fewer than two dimensions. ``provisional``: the decision may
    change once a forward pass shows the model's structure.
    """

    name: str
    shape: tuple[int, ...]
    algorithm: str
    reason: str
    view: str | None = None
    provisional: bool = False


# --------------------------------------------------------------------------- model structure


@dataclass(frozen=True)
class Structure:
    """Roles read off a model: output-head and input-layer weights, how free parameters are used.

    Sets hold ``id()`` of parameters. ``traced``: read off a forward pass's autograd graph;
    otherwise guessed from the module tree (``note`` says how; ``certain`` when the tree settles
    the head and input layer).
    """

    traced: bool
    heads: frozenset[int]
    inputs: frozenset[int]
    products: frozenset[int] = frozenset()  # free parameters multiplied as matrices
    elementwise: frozenset[int] = frozenset()  # free parameters only added / scaled with
    certain: bool = True  # the head and input layer are known (traced, or settled by the tree)
    note: str = ""
    head_how: str = "nearest the output"  # how the head was found, for the routing table


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> every (attribute, module) that holds it, in registration order."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((attr, module))
    return owners


def _is_embedding(owners: list[tuple[str, nn.Module]]) -> bool:
    return any(isinstance(m, _EMBEDDINGS) for _, m in owners)


def _is_chain(model: nn.Module) -> bool:
    """Whether ``model`` runs its layers in registration order: an ``nn.Sequential`` of leaf
    modules and nested ``nn.Sequential``s."""
    if not isinstance(model, nn.Sequential):
        return False
    return all(
        isinstance(m, nn.Sequential) or not any(True for _ in m.children())
        for m in model.modules()
    )


def guess_structure(model: nn.Module) -> Structure:
    """Roles from the module tree alone (no forward pass): the provisional answer.

    Head: a weight tied to an embedding if there is one (then no ``nn.Linear`` is the head);
    else the ``nn.Linear`` whose output size is an embedding's vocabulary, if exactly one is;
    else the last ``nn.Linear`` registered. Input layer: the first ``nn.Linear`` / ``nn.Conv*``
    registered, when the model has no embedding. ``certain`` when the module tree settles it:
    a tied or vocabulary head, at most one ``nn.Linear``, or an ``nn.Sequential`` chain (which
    runs its layers in registration order).
    """
    owners = _owners(model)
    embeddings = [m for m in model.modules() if isinstance(m, _EMBEDDINGS)]
    linears = [m for m in model.modules() if isinstance(m, _LINEAR)]
    matrices = [m for m in model.modules() if isinstance(m, _MATRIX_MODULES)]
    tied = [m for m in linears if _is_embedding(owners.get(id(m.weight), []))]
    vocab = {m.num_embeddings for m in embeddings if isinstance(m, nn.Embedding)}
    lm = [m for m in linears if m.out_features in vocab]
    heads: frozenset[int] = frozenset()
    chain = _is_chain(model)
    certain = chain or len(linears) <= 1
    how = "last in the Sequential" if chain else "last registered"
    if tied:
        note, certain = "the output head is tied to an embedding", True
    elif len(lm) == 1:
        heads, certain, how = frozenset({id(lm[0].weight)}), True, "onto the vocabulary"
        note = "head: the nn.Linear onto the vocabulary"
    elif linears:
        heads, note = frozenset({id(linears[-1].weight)}), f"head: the nn.Linear {how}"
    else:
        note = "no nn.Linear: no output head"
    inputs = frozenset() if embeddings or not matrices else frozenset({id(matrices[0].weight)})
    if not certain:
        note += " (registration order: no forward pass seen yet)"
    return Structure(False, heads, inputs, certain=certain, note=note, head_how=how)


# Autograd node kinds (class name without "Backward<N>"): products of a weight with activations,
# and ops that only re-view their input (a weight reaches its product through them).
_PRODUCT = re.compile(
    r"^(Mm|Addmm|Bmm|Baddbmm|Addbmm|Mv|Addmv|Dot|Vdot|Matmul|Linear|Einsum|"
    r".*Convolution.*|.*Conv(olution)?(Transpose)?\d?[dD].*|.*Rnn.*|.*Lstm.*|.*Gru.*|"
    r"Mkldnn(Linear|Matmul).*|_?ScaledMm|.*Gemm.*)$"
)
_VIEW_OPS = {
    "View", "UnsafeView", "Reshape", "ReshapeAlias", "Alias", "T", "Transpose", "Permute",
    "Expand", "Clone", "ToCopy", "Contiguous", "Split", "UnsafeSplit", "SplitWithSizes",
    "UnsafeSplitWithSizes", "Unbind", "Select", "Slice", "Narrow", "Squeeze", "Unsqueeze",
    "AsStrided", "Unflatten", "Flatten", "Chunk", "Conj", "Resolve", "Detach",
    # Ops that pick, gather or combine whole entries: what reaches a product through them is
    # still multiplied as a matrix (experts picked per token, Q/K/V concatenated, ...).
    "Index", "IndexSelect", "Gather", "Cat", "Stack", "Repeat", "Sum", "Mean",
}
# Nodes that hide the ops they stand for: a compiled region, a reentrant checkpoint.
_HIDING = re.compile(r".*(CompiledFunction|CheckpointFunction).*")


def _kind(node: Any) -> str:
    return re.sub(r"Backward\d*$", "", type(node).__name__)


def _is_custom(node: Any) -> bool:
    """A user's ``torch.autograd.Function``: what it computes is unknown."""
    return isinstance(node, torch.autograd.function.BackwardCFunction)


def _first_tensor(output: Any) -> Tensor | None:
    leaves, _ = tree_flatten(output)
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.grad_fn is not None and leaf.is_floating_point():
            return leaf
    return None


def structure_from_output(model: nn.Module, output: Any) -> Structure | None:
    """Roles read off the autograd graph of ``output`` (a forward pass's result), or ``None``.

    ``None`` when the graph cannot show them: no tensor with a gradient history (a forward under
    ``torch.no_grad``), or the model's ops are hidden in a compiled region (``torch.compile``) or
    a reentrant checkpoint. The head is the weight of every matrix product met first on the
    paths from the output back to the input; an input layer is a product none of whose operands
    has a gradient history except its parameters.
    """
    root = _first_tensor(output)
    if root is None:
        return None
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    consumers: dict[Any, list[Any]] = {}
    param_of: dict[Any, int] = {}
    order: list[Any] = []
    seen = {root.grad_fn}
    queue = deque([root.grad_fn])
    while queue:
        node = queue.popleft()
        order.append(node)
        if _HIDING.fullmatch(_kind(node)):
            return None
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in params:
            param_of[node] = id(variable)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            consumers.setdefault(nxt, []).append(node)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)

    def weights(node: Any) -> tuple[set[int], bool]:
        """Parameters (>= 2-D) feeding ``node`` through view ops, and whether any other operand
        has a gradient history (an activation)."""
        found: set[int] = set()
        activation = False
        pending = [n for n, _ in node.next_functions if n is not None]
        while pending:
            nxt = pending.pop()
            if nxt in param_of:
                if params[param_of[nxt]].dim() >= 2:
                    found.add(param_of[nxt])
            elif _kind(nxt) in _VIEW_OPS:
                pending.extend(n for n, _ in nxt.next_functions if n is not None)
            else:
                activation = True
        return found, activation

    # Heads: breadth-first from the output, stopping at the first product on every path (a
    # product without a visible weight -- a frozen head, q @ kᵀ -- stops the search there too).
    heads: set[int] = set()
    frontier = deque([root.grad_fn])
    visited = {root.grad_fn}
    while frontier:
        node = frontier.popleft()
        if _PRODUCT.match(_kind(node)):
            heads |= weights(node)[0]
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in visited:
                visited.add(nxt)
                frontier.append(nxt)

    inputs: set[int] = set()
    for node in order:
        if _PRODUCT.match(_kind(node)):
            found, activation = weights(node)
            if found and not activation:
                inputs |= found

    # How each parameter is consumed, looking through view ops.
    products: set[int] = set()
    elementwise: set[int] = set()
    for acc, pid in param_of.items():
        uses: list[Any] = []
        pending = list(consumers.get(acc, []))
        while pending:
            node = pending.pop()
            if _kind(node) in _VIEW_OPS:
                pending.extend(consumers.get(node, []))
            else:
                uses.append(node)
        if any(_PRODUCT.match(_kind(u)) for u in uses):
            products.add(pid)
        elif uses and not any(_is_custom(u) for u in uses):
            elementwise.add(pid)
    return Structure(
        True,
        frozenset(heads),
        frozenset(inputs),
        frozenset(products),
        frozenset(elementwise),
        note="roles from a traced forward pass",
    )


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    raise TypeError(
        "example_inputs must be a Tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments for the model's forward, got {type(example_inputs).__name__}"
    )


def trace(model: nn.Module, example_inputs: Any) -> Structure:
    """Roles from one forward pass on ``example_inputs`` (a tensor, a tuple of arguments or a
    dict of keyword arguments). The pass runs in eval mode with gradients enabled; the model's
    modes, buffers and every RNG state are left as they were. Falls back to
    :func:`guess_structure` (with a note) when the graph hides the model's ops."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.eval()
            output = _call(model, example_inputs)
            structure = structure_from_output(model, output)
    finally:
        for m, training in modes:
            m.training = training
    if structure is None:
        guess = guess_structure(model)
        return replace(guess, note=guess.note + "; the traced graph hid the model's ops")
    return structure


# --------------------------------------------------------------------------- the routing table


class RoutingTable:
    """The routes of one model's parameters, in ``named_parameters`` order."""

    def __init__(
        self,
        routes: list[Route],
        params: Mapping[str, nn.Parameter],
        algorithm: str,
        structure: Structure | None = None,
    ) -> None:
        self.routes = routes
        self.algorithm = algorithm
        self.structure = structure
        self._params = dict(params)

    @property
    def provisional(self) -> bool:
        """Whether a forward pass may still change some route (the roles were guessed)."""
        return any(r.provisional for r in self.routes)

    def parameter(self, name: str) -> nn.Parameter:
        return self._params[name]

    def group_keys(self) -> list[tuple[str, str | None]]:
        """``(algorithm, view)`` of every param group :meth:`param_groups` makes, in order.

        The matrix method's ``"flatten"`` group and the AdamW group always exist (possibly
        empty), and so does the group of every view a provisional route could move to, so that
        finalizing a route after a forward pass only moves parameters between existing groups.
        """
        views = {r.view for r in self.routes if r.algorithm == self.algorithm}
        views |= {r.view for r in self.routes if r.provisional and r.view is not None}
        views.discard(None)
        views.add(FLATTEN)
        matrix = [(self.algorithm, v) for v in sorted(views, key=lambda v: (v != FLATTEN, v))]
        return [*matrix, (FALLBACK, None)]

    def key(self, route: Route) -> tuple[str, str | None]:
        """The ``(algorithm, view)`` of the group ``route``'s parameter belongs to (vectors a
        method takes go with its plain matrices: a view does not apply to them)."""
        if route.algorithm != self.algorithm:
            return route.algorithm, None
        return route.algorithm, route.view or FLATTEN

    def param_groups(self) -> list[dict]:
        """One param group per ``(algorithm, view)``, tagged ``algorithm`` (and the matrix
        groups ``matrix_view``), with ``param_names``; see :meth:`group_keys`."""
        groups: dict[tuple[str, str | None], dict[str, Any]] = {}
        for algorithm, view in self.group_keys():
            group: dict[str, Any] = {"params": [], "param_names": [], "algorithm": algorithm}
            if view is not None:
                group["matrix_view"] = view
            groups[(algorithm, view)] = group
        for r in self.routes:
            group = groups[self.key(r)]
            group["params"].append(self._params[r.name])
            group["param_names"].append(r.name)
        return list(groups.values())

    def count(self, algorithm: str) -> int:
        return sum(1 for r in self.routes if r.algorithm == algorithm)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.routes] + [9])
        lines = [f"{'parameter':<{width}}  {'optimizer':<9}  {'view':<9}  {'shape':<14}  reason"]
        for r in self.routes:
            shape = "x".join(map(str, r.shape)) or "scalar"
            view = r.view if r.algorithm == self.algorithm and r.view else "-"
            mark = " (provisional)" if r.provisional else ""
            lines.append(
                f"{r.name:<{width}}  {r.algorithm:<9}  {view:<9}  {shape:<14}  {r.reason}{mark}"
            )
        if self.structure is not None and self.structure.note:
            lines.append(f"[{self.structure.note}]")
        return "\n".join(lines)

    __repr__ = __str__


def _check_overrides(overrides: Mapping[str, str], algorithm: str) -> None:
    for pattern, target in overrides.items():
        if target not in (algorithm, FALLBACK):
            raise ValueError(
                f"routing override {pattern!r} -> {target!r}: the target must be "
                f"{algorithm!r} or {FALLBACK!r}"
            )


def route(
    model: nn.Module,
    algorithm: str,
    overrides: Mapping[str, str] | None = None,
    *,
    policy: RoutingPolicy | None = None,
    example_inputs: Any = None,
    structure: Structure | None = None,
) -> RoutingTable:
    """Route every trainable parameter of ``model`` to ``algorithm`` or to AdamW.

    ``overrides`` maps ``fnmatch`` patterns on parameter names to ``algorithm`` or ``"adamw"``;
    e.g. ``{"blocks.*.attn.*": "adamw"}``. ``policy``: default :func:`policy_for` ``algorithm``.
    ``example_inputs`` (the arguments of one forward pass) let the roles be read off the model's
    graph (:func:`trace`); without them (or a ``structure``) the table is provisional.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"route needs an nn.Module, got {type(model).__name__}")
    overrides = dict(overrides or {})
    _check_overrides(overrides, algorithm)
    policy = policy_for(algorithm) if policy is None else policy
    if structure is None:
        structure = guess_structure(model) if example_inputs is None else trace(
            model, example_inputs
        )
    owners = _owners(model)
    params = dict(model.named_parameters())  # shared parameters appear once, by first name
    routes = []
    for name, p in params.items():
        if not p.requires_grad:
            continue
        target, reason, view, provisional = _rule(
            p, owners[id(p)], structure, policy, algorithm, name
        )
        matched = next((pat for pat in overrides if fnmatch.fnmatchcase(name, pat)), None)
        if matched is not None:
            target, reason, provisional = overrides[matched], f"override {matched!r}", False
        routes.append(Route(name, tuple(p.shape), target, reason, view, provisional))
    table = RoutingTable(routes, params, algorithm, structure)
    _check_exactly_once(model, table)
    return table


# Names of free parameters that are, by near-universal convention, added to activations.
_EMBEDDING_NAME = re.compile(
    r"(^|[._])(pos|position|positional|pos_emb|emb|embed|embedding|embeddings|wpe|wte|tok|token|"
    r"tokens|cls|cls_token|register|registers|pe)($|[._\d])"
)


def _natural_view(p: Tensor, owner: nn.Module | None) -> str | None:
    """The view of a parameter sent to the matrix method by an override or a policy flag."""
    if p.dim() < 2:
        return None
    if p.dim() == 2 or isinstance(owner, (*_MATRIX_MODULES, *_EMBEDDINGS)):
        return FLATTEN
    return BATCH


def _attention_view(module: nn.MultiheadAttention, attr: str, policy: RoutingPolicy) -> str:
    heads = module.num_heads
    if attr == "in_proj_weight":
        return {"qkv": split_view(3), "heads": split_view(3 * heads), "whole": FLATTEN}[
            policy.attention
        ]
    return split_view(heads) if policy.attention == "heads" else FLATTEN


def _rnn_gates(module: nn.Module, p: Tensor) -> int:
    hidden = module.hidden_size
    return max(1, p.shape[0] // hidden) if p.shape[0] % hidden == 0 else 1


def _rule(
    p: Tensor,
    owners: list[tuple[str, nn.Module]],
    structure: Structure,
    policy: RoutingPolicy,
    algorithm: str,
    name: str,
) -> tuple[str, str, str | None, bool]:
    """``(algorithm, reason, view, provisional)`` of one parameter under ``policy``."""
    attr, owner = owners[0]
    kind = type(owner).__name__
    pid = id(p)

    def matrix(yes: bool, reason: str, view: str | None, provisional: bool = False):
        return (algorithm if yes else FALLBACK), reason, view, provisional

    if _is_embedding(owners):
        tied = " (tied to a Linear: the output head)" if len(owners) > 1 else ""
        return matrix(policy.embeddings, f"embedding{tied}", _natural_view(p, owner))
    if isinstance(owner, _NORMS):
        return matrix(policy.vectors, f"normalization ({kind}) {attr}", None)
    if p.dim() < 2:
        what = f"bias of {kind}" if "bias" in attr else f"vector ({kind}.{attr}, {p.dim()}-D)"
        return matrix(policy.vectors, what, None)
    if isinstance(owner, _MATRIX_MODULES) and attr == "weight":
        guessed = not structure.certain
        if pid in structure.heads:
            reason = f"output head ({kind}, {structure.head_how})"
            return matrix(policy.head, reason, FLATTEN, guessed)
        if pid in structure.inputs:
            reason = f"input layer ({kind})"
            return matrix(policy.input_layer, reason, FLATTEN, guessed)
        return matrix(True, f"hidden matrix ({kind})", FLATTEN, guessed)
    if isinstance(owner, nn.MultiheadAttention) and attr.endswith("_weight"):
        view = _attention_view(owner, attr, policy)
        what = {"in_proj_weight": "Q, K, V"}.get(attr, attr.split("_")[0].upper())
        return matrix(True, f"attention projection ({what})", view)
    if isinstance(owner, _RNN) and attr.startswith("weight"):
        gates = _rnn_gates(owner, p) if policy.gates and not attr.startswith("weight_hr") else 1
        what = f"{gates} gate blocks" if gates > 1 else "one matrix"
        return matrix(True, f"recurrent weight ({kind}, {what})", split_view(gates))
    # A free parameter: a matrix (stack) if the traced graph multiplies it, else additive.
    view = FLATTEN if p.dim() == 2 else BATCH
    where = f"{kind}.{attr}" if owner is not None else attr
    if structure.traced and pid in structure.products:
        return matrix(True, f"free parameter in a matrix product ({where})", view)
    if structure.traced and pid in structure.elementwise:
        return matrix(False, f"free parameter added or scaled, not multiplied ({where})", view)
    broadcast = p.dim() >= 3 and 1 in p.shape[:-2]
    if broadcast:
        return matrix(False, f"free parameter with a broadcast dimension ({where})", view, True)
    if _EMBEDDING_NAME.search(name):
        return matrix(False, f"free parameter named like an embedding ({where})", view, True)
    if p.dim() == 2:
        return matrix(True, f"free 2-D parameter, taken for a matrix ({where})", view, True)
    return matrix(True, f"free {p.dim()}-D parameter, a stack of matrices ({where})", view, True)


def _check_exactly_once(model: nn.Module, table: RoutingTable) -> None:
    routed = [id(table._params[r.name]) for r in table.routes]
    if len(routed) != len(set(routed)):
        raise RuntimeError("a parameter was routed twice")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    missing = trainable - set(routed)
    if missing:
        raise RuntimeError(f"{len(missing)} trainable parameter(s) were not routed")


# --------------------------------------------------------------------------- parameter lists


def split_by_ndim(params: Iterable[Any], algorithm: str, min_ndim: int = 2) -> list[dict]:
    """Groups for a plain parameter list: ``min_ndim``-D and up to ``algorithm``, the rest AdamW.

    ``params`` may hold tensors or ``(name, tensor)`` pairs (``named_parameters()``); names are
    kept as the groups' ``param_names``.
    """
    items = list(params)
    named = bool(items) and all(isinstance(x, tuple) and len(x) == 2 for x in items)
    pairs = items if named else [(None, x) for x in items]
    groups = []
    for target, keep in ((algorithm, lambda p: p.dim() >= min_ndim), (FALLBACK, None)):
        chosen = [(n, p) for n, p in pairs if (keep(p) if keep else p.dim() < min_ndim)]
        if chosen:
            group: dict[str, Any] = {"params": [p for _, p in chosen], "algorithm": target}
            if named:
                group["param_names"] = [n for n, _ in chosen]
            groups.append(group)
    return groups


# --------------------------------------------------------------------------- a lazy router


class Router:
    """Routing for an optimizer built from a model, finalized by the first forward pass.

    Built without ``example_inputs``, the roles are provisional (:func:`guess_structure`); a
    forward hook on the model reads them off the first forward pass with gradients and calls
    ``on_final(table)`` so that the optimizer moves parameters between its groups before its first
    step. :meth:`finalize` settles the routing at the first step when no such pass was seen.
    """

    def __init__(
        self,
        model: nn.Module,
        algorithm: str,
        overrides: Mapping[str, str] | None = None,
        policy: RoutingPolicy | None = None,
        example_inputs: Any = None,
    ) -> None:
        self.model = model
        self.algorithm = algorithm
        self.overrides = dict(overrides or {})
        self.policy = policy_for(algorithm) if policy is None else policy
        self.table = route(
            model, algorithm, self.overrides, policy=self.policy, example_inputs=example_inputs
        )
        self.final = not self.table.provisional
        self._handle: Any = None
        self._hidden = False  # a forward pass was seen but its graph hid the model's ops

    def watch(self, on_final: Callable[[RoutingTable], None]) -> None:
        """Read the roles off the model's next forward pass with gradients (until final)."""
        if self.final or self._handle is not None:
            return

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.final:
                return
            if torch.compiler.is_compiling():
                # Inside a compiled graph the tensors are stand-ins with no autograd history.
                self._hidden = True
                return
            if not torch.is_grad_enabled():
                return
            structure = structure_from_output(self.model, output)
            if structure is None:
                self._hidden = _first_tensor(output) is not None
                return
            self.settle(structure)
            on_final(self.table)

        self._handle = self._hooked_module().register_forward_hook(hook)

    def _hooked_module(self) -> nn.Module:
        # A torch.compile'd model (OptimizedModule) runs its hooks only on the original module.
        return getattr(self.model, "_orig_mod", self.model)

    def settle(self, structure: Structure | None) -> list[str]:
        """Make the routing final (from ``structure``, or the provisional roles); stop watching.

        Returns warnings to emit: how provisional roles were kept.
        """
        self.unwatch()
        notes = []
        if structure is not None:
            self.table = route(
                self.model, self.algorithm, self.overrides, policy=self.policy,
                structure=structure,
            )
        elif self.table.provisional:
            why = (
                "its forward pass ran inside torch.compile, whose graph hides the model's layers"
                if self._hidden
                else "no forward pass with gradients was seen before the first step"
            )
            kept = [r for r in self.table.routes if r.provisional]
            heads = [r.name for r in kept if r.reason.startswith("output head")]
            what = (
                f"the output head was taken to be {heads[0]!r}" if heads else "roles were guessed"
            )
            if len(kept) > 1:
                notes.append(
                    f"{self.algorithm}: routing decided without seeing the model run ({why}); "
                    f"{what} from the module tree. Pass example_inputs= to create()/route() to "
                    "decide from the model's graph, or routing= to set it by name"
                )
            self.table = RoutingTable(
                [replace(r, provisional=False) for r in self.table.routes],
                self.table._params,
                self.algorithm,
                self.table.structure,
            )
        self.final = True
        return notes

    def adopt(self, assignment: Mapping[str, tuple[str, str | None]]) -> None:
        """Final routing as ``assignment`` (name -> ``(algorithm, view)``) says: the membership
        of a loaded state dict. Routes that change say so in their reason."""
        self.unwatch()
        routes = []
        for r in self.table.routes:
            algorithm, view = assignment.get(r.name, (r.algorithm, r.view))
            changed = algorithm != r.algorithm
            routes.append(
                replace(
                    r,
                    algorithm=algorithm,
                    view=view if view is not None else r.view,
                    reason=r.reason + " -> as in the loaded state dict" if changed else r.reason,
                    provisional=False,
                )
            )
        self.table = RoutingTable(routes, self.table._params, self.algorithm, self.table.structure)
        self.final = True

    def unwatch(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
