"""The contract every registered optimizer keeps (DESIGN rule 8).

New optimizers join by registering: the tests are parametrized over ``guided_descent.optimizers()``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import guided_descent as gd

NAMES = list(gd.optimizers())


class Toy(nn.Module):
    """Parameters of every rank the contract covers: 0-d, 1-d, 2-d (Linear) and 4-d (Conv2d).

    The layers are real ``nn.Linear`` / ``nn.Conv2d`` modules so that optimizers which hook into
    layers (K-FAC) see them; the 0-d and 1-d parameters are plain tensors on top.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.3))  # 0-d
        self.shift = nn.Parameter(torch.linspace(-0.5, 0.5, 4))  # 1-d
        self.conv = nn.Conv2d(2, 3, kernel_size=3)  # 4-d weight, 1-d bias
        self.hidden = nn.Linear(12, 6)  # 2-d weight
        self.head = nn.Linear(6, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(images)).flatten(1)  # (B, 3*2*2)
        h = torch.tanh(self.hidden(h))
        return self.scale * self.head(h) + self.shift


def make_batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 2, 4, 4, generator=g).to(dtype)
    targets = torch.randn(16, 4, generator=g).to(dtype)
    return images, targets


def make_model(dtype: torch.dtype = torch.float32) -> Toy:
    torch.manual_seed(0)
    return Toy().to(dtype)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    images, targets = batch
    return ((model(images) - targets) ** 2).mean()


def closure_for(model: nn.Module, opt: torch.optim.Optimizer, batch):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    return closure


# Hyper-parameters an optimizer cannot do without: natural gradient must be told the training
# loss (here loss_fn, a mean squared error).
REQUIRED: dict[str, dict[str, str]] = {"natural_gradient": {"loss": "mse"}}


def create(name: str, target, **hp) -> torch.optim.Optimizer:
    """``gd.create`` with what ``name`` requires (:data:`REQUIRED`) filled in."""
    return gd.create(name, target, **{**REQUIRED.get(name, {}), **hp})


def build(name: str, model: nn.Module, **hp) -> torch.optim.Optimizer:
    return create(name, model, **hp)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(opt.state_dict()["state"])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_returns_an_optimizer_with_torch_group_names(name):
    opt = build(name, make_model())
    assert isinstance(opt, torch.optim.Optimizer)
    for group in opt.param_groups:
        assert "lr" in group
    spec = gd.optimizers()[name]
    if spec.torch_native:
        # A torch.optim class with the library's guard mixed in: same name, same update.
        torch_classes = [
            c for c in type(opt).__mro__[1:]
            if c.__module__.startswith("torch.optim") and c is not torch.optim.Optimizer
        ]
        assert torch_classes and isinstance(opt, torch_classes[0]), type(opt).__mro__
        assert type(opt).__name__ == torch_classes[0].__name__


@pytest.mark.parametrize("name", NAMES)
def test_step_with_closure_equals_step_after_backward(name):
    batch = make_batch()
    m1, m2 = make_model(), make_model()
    o1, o2 = build(name, m1), build(name, m2)
    for _ in range(3):
        returned = o1.step(closure_for(m1, o1, batch))
        assert torch.is_tensor(returned) and math.isfinite(returned.item())
        closure_for(m2, o2, batch)()
        assert o2.step() is None
    assert_same(params_of(m1), params_of(m2))
    initial = params_of(make_model())
    moved = [not torch.equal(a, b) for a, b in zip(params_of(m1), initial, strict=True)]
    assert any(moved)


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_are_left_alone(name):
    model = make_model()
    frozen = nn.Parameter(torch.randn(3, 3))
    model.register_parameter("unused", frozen)
    before = frozen.detach().clone()
    opt = build(name, model)
    batch = make_batch()
    for _ in range(2):
        opt.step(closure_for(model, opt, batch))
    assert frozen.grad is None
    assert torch.equal(frozen.detach(), before)


@pytest.mark.parametrize("name", NAMES)
def test_zero_grads_leave_params_unchanged(name):
    model = make_model()
    hp = {"weight_decay": 0.0} if "weight_decay" in gd.optimizers()[name].hyperparams else {}
    opt = build(name, model, **hp)
    before = params_of(model)
    images, _ = make_batch()
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        # A forward pass so model-aware optimizers see activations; gradients are zero.
        (model(images) * 0.0).sum().backward()
        opt.step()
    assert_same(params_of(model), before)
    for t in state_tensors(opt):
        if t.is_floating_point():
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_keep_their_own_hyperparameters(name):
    model = make_model()
    spec = gd.optimizers()[name]
    if spec.needs_model:
        pytest.skip("model-aware optimizers build their own groups from the model")
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = gd.create(name, [{"params": rest}, {"params": head, "lr": 0.0}])
    # Hybrid optimizers may split a group (matrices vs vectors); every part keeps the group's lr.
    head_ids = {id(p) for p in head}
    head_groups = [g for g in opt.param_groups if any(id(p) in head_ids for p in g["params"])]
    assert head_groups and all(g["lr"] == 0.0 for g in head_groups)
    before = params_of(model)
    batch = make_batch()
    for _ in range(3):
        opt.step(closure_for(model, opt, batch))
    after = dict(zip([n for n, _ in model.named_parameters()], params_of(model), strict=True))
    old = dict(zip([n for n, _ in model.named_parameters()], before, strict=True))
    assert torch.equal(after["head.weight"], old["head.weight"])
    assert not torch.equal(after["hidden.weight"], old["hidden.weight"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(name, dtype):
    batch = make_batch(dtype)
    model = make_model(dtype)
    opt = build(name, model)
    for _ in range(3):
        opt.step(closure_for(model, opt, batch))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)

    for _ in range(4):  # the uninterrupted run
        opt.step(closure_for(model, opt, batch))
    expected = params_of(model)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = make_model(dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = build(name, resumed)
    opt2.load_state_dict(saved["opt"])
    for _ in range(4):
        opt2.step(closure_for(resumed, opt2, batch))
    assert_same(params_of(resumed), expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_and_ranks_stay_finite(name, dtype):
    model = make_model(dtype)
    ranks = {p.dim() for p in model.parameters()}
    assert {0, 1, 2, 4} <= ranks
    opt = build(name, model)
    batch = make_batch(dtype)
    first = closure_for(model, opt, batch)().item()
    for _ in range(10):
        opt.step(closure_for(model, opt, batch))
    for p in model.parameters():
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
    for t in state_tensors(opt):
        if t.is_floating_point():
            assert torch.isfinite(t).all()
    assert math.isfinite(first)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_is_deep_copyable_and_picklable_state(name):
    model = make_model()
    opt = build(name, model)
    opt.step(closure_for(model, opt, make_batch()))
    copy.deepcopy(opt.state_dict())


BAD_VALUES = [
    ("lr", -1.0),
    ("lr", float("nan")),
    ("betas", (1.0, 0.5)),
    ("betas", (0.9, -0.1)),
    ("momentum", 1.5),
    ("weight_decay", -0.1),
    ("eps", -1e-8),
]


@pytest.mark.parametrize(
    "name, key, bad",
    [
        (name, key, bad)
        for name in NAMES
        for key, bad in BAD_VALUES
        if key in gd.optimizers()[name].hyperparams
    ],
)
def test_invalid_hyperparameters_raise_naming_the_value(name, key, bad):
    with pytest.raises(ValueError) as err:
        gd.create(name, make_model(), **{key: bad})
    assert key.split("_")[0] in str(err.value)
    assert repr(bad) in str(err.value) or str(bad) in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter_is_a_type_error_listing_accepted(name):
    with pytest.raises(TypeError, match="accepted:"):
        gd.create(name, make_model(), not_a_hyperparameter=1)


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_stays_connected_after_loading_state_before_the_first_step(name):
    """What training frameworks do on resume: build, attach a scheduler, load, then train."""
    batch = make_batch()

    def train(load: bool) -> list[torch.Tensor]:
        model = make_model()
        opt = build(name, model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
        if load:  # a state_dict saved before any step, e.g. from a fresh checkpoint
            opt.load_state_dict(build(name, make_model()).state_dict())
        for _ in range(3):
            opt.step(closure_for(model, opt, batch))
            sched.step()
        for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
            assert group["lr"] == pytest.approx(base * 0.5**3)
        return params_of(model)

    assert_same(train(load=True), train(load=False))
