"""Muon against references: torch.optim.Muon, newton_schulz itself, and the routing rules.

``torch.optim.Muon`` always runs Newton–Schulz in bfloat16 and accepts 2-D parameters only. With
``ns_dtype=torch.bfloat16`` our step does the same arithmetic in the same order, so the results
agree to float32 rounding (bit for bit on the build these tests were written on). Our CPU default
runs Newton–Schulz in float32, and then the gap is bf16 rounding in torch's result: a few units of
u = 2^-8 relative (measured 2-4.4 u), bounded in the tests by 8 u.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from float_rounding import newton_schulz_rounding_bound as rounding_bound
from torch import nn

import guided_descent as gd
from guided_descent.linalg.newton_schulz import (
    JORDAN,
    POLAR_EXPRESS,
    coefficient_schedule,
    newton_schulz,
)
from guided_descent.optimizers.muon import Muon, muon
from guided_descent.preconditioners.orthogonalize import (
    matrix_shape,
    momentum_direction,
    orthogonalize,
    shape_scale,
)
from guided_descent.routing import route

BF16_U = 2.0**-8


def bf16_tolerance(steps: int, lr: float, scale: float = 1.0) -> float:
    """How far two bfloat16 Newton-Schulz implementations may drift apart on a parameter.

    Batched and one-matrix-at-a-time bf16 products may round differently on another CPU
    (oneDNN, AMX or not): an orthogonalized entry (at most 1 in size) then moves by a couple of
    bf16 units, 2 * 2**-8, and the parameter by lr * scale times that, every step.
    """
    return steps * lr * scale * 2 * BF16_U


def random_steps(shapes, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return init, grads


def run(opt_cls, init, grads, **hp):
    params = [nn.Parameter(p.clone()) for p in init]
    opt = opt_cls(params, **hp)
    for step_grads in grads:
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr.clone()
        opt.step()
    return params, opt


def ours(params, **hp):
    return Muon(params, **hp)


# Two (32, 16) matrices exercise the same-shape batching; the others tall/wide/square scaling.
SHAPES = [(32, 16), (16, 48), (24, 24), (32, 16)]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("adjust_lr, lr", [("original", 0.02), ("match_rms_adamw", 3e-3)])
def test_equals_torch_muon_with_bf16_newton_schulz(adjust_lr, lr, weight_decay, nesterov):
    init, grads = random_steps(SHAPES, steps=5)
    hp = dict(lr=lr, weight_decay=weight_decay, nesterov=nesterov, momentum=0.95)
    a, oa = run(ours, init, grads, adjust_lr=adjust_lr, ns_dtype=torch.bfloat16, **hp)
    b, ob = run(torch.optim.Muon, init, grads, adjust_lr_fn=adjust_lr, **hp)
    for p, q in zip(a, b, strict=True):
        # The same ops in the same order; torch runs one matrix at a time and we batch, which
        # may round bf16 products differently on another CPU (bf16_tolerance). The momentum
        # buffer involves no bf16 at all: equal.
        m, n = p.shape
        scale = shape_scale(m, n, adjust_lr)
        torch.testing.assert_close(p, q, rtol=0, atol=bf16_tolerance(5, lr, scale))
        torch.testing.assert_close(
            oa.state[p]["momentum_buffer"], ob.state[q]["momentum_buffer"], rtol=0, atol=0
        )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("adjust_lr, lr", [("original", 0.02), ("match_rms_adamw", 3e-3)])
def test_float32_step_is_within_bf16_rounding_of_torch_muon(adjust_lr, lr, weight_decay):
    init, grads = random_steps(SHAPES, steps=5, seed=1)
    hp = dict(lr=lr, weight_decay=weight_decay)
    a, _ = run(ours, init, grads, adjust_lr=adjust_lr, **hp)  # NS in float32 on CPU
    b, _ = run(torch.optim.Muon, init, grads, adjust_lr_fn=adjust_lr, **hp)
    for p, q, p0 in zip(a, b, init, strict=True):
        moved = q.detach() - p0  # torch's total displacement
        gap = (p.detach() - q.detach()).norm() / moved.norm()
        assert gap <= 8 * BF16_U, gap.item()


def test_one_step_is_lr_times_scale_times_newton_schulz():
    # momentum 0, no Nesterov: the direction is the gradient itself.
    init, grads = random_steps([(40, 10), (10, 40)], steps=1, seed=2)
    params, _ = run(ours, init, grads, lr=0.05, momentum=0.0, nesterov=False)
    for p, p0, g in zip(params, init, grads[0], strict=True):
        m, n = p.shape
        expected = p0.add(newton_schulz(g), alpha=-0.05 * math.sqrt(max(1.0, m / n)))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    assert shape_scale(40, 10, "original") == 2.0 and shape_scale(10, 40, "original") == 1.0
    assert shape_scale(40, 10, "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(40))


def test_momentum_direction_is_the_ema_and_its_lookahead():
    g, buf = torch.randn(3, 4), torch.randn(3, 4)
    old, g0 = buf.clone(), g.clone()
    d = momentum_direction(g, buf, 0.9, nesterov=True)
    torch.testing.assert_close(buf, 0.9 * old + 0.1 * g)
    torch.testing.assert_close(d, 0.1 * g + 0.9 * buf)
    assert torch.equal(g, g0)  # the gradient is never modified
    assert momentum_direction(g, buf, 0.9, nesterov=False) is buf


def test_conv_kernels_are_flattened_to_out_by_in_times_kernel():
    conv = nn.Conv2d(3, 8, kernel_size=3)  # weight (8, 3, 3, 3) -> one (8, 27) matrix
    assert matrix_shape(conv.weight.shape, "flatten") == (1, 8, 27)
    init, grads = random_steps([(8, 3, 3, 3)], steps=3, seed=3)
    a, _ = run(ours, init, grads, lr=0.02, ns_dtype=torch.bfloat16)
    flat_init = [init[0].reshape(8, 27)]
    flat_grads = [[gs[0].reshape(8, 27)] for gs in grads]
    b, _ = run(torch.optim.Muon, flat_init, flat_grads, lr=0.02, weight_decay=0.0)
    torch.testing.assert_close(
        a[0].detach().reshape(8, 27), b[0].detach(), rtol=0, atol=bf16_tolerance(3, 0.02)
    )


def test_3d_params_are_batches_of_matrices_with_matrix_view_batch():
    # A stack of 4 expert matrices (4, 16, 8): each is orthogonalized and scaled on its own,
    # exactly as if it were a separate 2-D parameter.
    init, grads = random_steps([(4, 16, 8)], steps=3, seed=4)
    a, opt = run(ours, init, grads, lr=0.02, matrix_view="batch", ns_dtype=torch.bfloat16)
    assert opt.param_groups[0]["matrix_view"] == "batch"
    b, _ = run(
        torch.optim.Muon,
        list(init[0].unbind(0)),
        [list(gs[0].unbind(0)) for gs in grads],
        lr=0.02,
        weight_decay=0.0,
    )
    torch.testing.assert_close(a[0].detach(), torch.stack([q.detach() for q in b]),
                               rtol=0, atol=bf16_tolerance(3, 0.02, math.sqrt(2)))
    # The same tensor with the default "flatten" view is one (4, 128) matrix: a different update.
    c, _ = run(ours, init, grads, lr=0.02, ns_dtype=torch.bfloat16)
    assert not torch.allclose(a[0], c[0])


@pytest.mark.parametrize("view", ["flatten", "batch"])
def test_same_shape_batching_equals_one_at_a_time(view):
    g = torch.Generator().manual_seed(5)
    shapes = [(6, 4), (3, 6, 4), (6, 4), (5, 7), (2, 6, 4), (6, 2, 2)]
    updates = [torch.randn(s, generator=g) for s in shapes]
    together = orthogonalize(updates, view, steps=5, coefficients=JORDAN)
    schedule = coefficient_schedule(JORDAN, 5)

    def close(a: torch.Tensor, b: torch.Tensor, m: int, n: int) -> None:
        # Batched and single float32 products round differently: per matrix, twice the
        # worst-case rounding bound of Newton-Schulz (tests/float_rounding.py) apart at most.
        bound = 2 * rounding_bound(m, n, schedule, torch.float32)
        for x, y in zip(a.reshape(-1, m, n), b.reshape(-1, m, n), strict=True):
            assert torch.linalg.matrix_norm(x - y) <= bound

    for u, t in zip(updates, together, strict=True):
        alone = orthogonalize([u], view, steps=5, coefficients=JORDAN)[0]
        assert t.shape == u.shape
        _, m, n = matrix_shape(u.shape, view)
        close(t, alone, m, n)
    # And each matrix of a "batch" view is newton_schulz of that matrix.
    if view == "batch":
        close(together[1][2], newton_schulz(updates[1][2]), 6, 4)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.ln1(x)
        q, k, v = (
            f(h).view(B, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, d))
        return x + self.proj(torch.relu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 17, d: int = 16, context: int = 8, layers: int = 2,
                 tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads=2) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(model: TinyGPT, seed: int = 0) -> torch.Tensor:
    idx = torch.randint(0, 17, (4, 8), generator=torch.Generator().manual_seed(seed))
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 17), idx[:, 1:].reshape(-1))


HIDDEN = {f"blocks.{i}.{w}.weight" for i in range(2) for w in ("q", "k", "v", "o", "fc", "proj")}


@pytest.mark.parametrize("tied", [False, True])
def test_gpt_routing_sends_hidden_matrices_to_muon_and_the_rest_to_adamw(tied):
    torch.manual_seed(0)
    model = TinyGPT(tied=tied)
    table = route(model, "muon")
    text = str(table)
    print(text)  # shown with pytest -s: the table a user sees
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines()[1:]}
    assert text.splitlines()[0].split()[:4] == ["parameter", "optimizer", "view", "shape"]
    assert {n for n, a in rows.items() if a == "muon"} == HIDDEN
    for name in ["tok.weight", "pos", "ln_f.weight", "ln_f.bias", "blocks.0.ln1.weight",
                 "blocks.1.q.bias", "blocks.0.fc.bias"]:
        assert rows[name] == "adamw", name
    assert ("lm_head.weight" in rows) != tied  # a tied head is the embedding, listed once
    if not tied:
        assert rows["lm_head.weight"] == "adamw"

    opt = gd.create("muon", model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["algorithm"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    print({a: sorted(ns) for a, ns in groups.items()})
    assert groups["muon"] == HIDDEN
    assert groups["adamw"] == set(names.values()) - HIDDEN
    assert [g["lr"] for g in opt.param_groups] == [0.02, 3e-4]
    assert opt.param_groups[1]["betas"] == (0.9, 0.95)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    lm_loss(model).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n
    state_keys = {n: set(opt.state[p]) for n, p in model.named_parameters()}
    assert all(state_keys[n] == {"momentum_buffer"} for n in HIDDEN)
    assert state_keys["tok.weight"] == {"step", "exp_avg", "exp_avg_sq"}


def test_routing_overrides_reach_the_factory():
    model = TinyGPT()
    opt = gd.create("muon", model, routing={"blocks.*.fc.weight": "adamw"})
    muon_names = {n for n, p in model.named_parameters()
                  if any(p is q for q in opt.param_groups[0]["params"])}
    assert muon_names == HIDDEN - {"blocks.0.fc.weight", "blocks.1.fc.weight"}


def test_lambda_lr_drives_both_kinds_of_groups_at_their_ratio():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = gd.create("muon", model, momentum=0.0, nesterov=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    w = model.blocks[0].fc.weight  # (64, 16): tall, scale sqrt(4) = 2
    for step in range(3):
        factor = 1.0 / (1 + step)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * factor)
        assert opt.param_groups[1]["lr"] == pytest.approx(3e-4 * factor)
        before = w.detach().clone()
        opt.zero_grad()
        lm_loss(model, seed=step).backward()
        expected = before.add(newton_schulz(w.grad), alpha=-0.02 * factor * 2.0)
        opt.step()
        # The Muon group's lr key is the step size that was applied.
        torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-7)
        sched.step()


def test_state_dict_round_trip_keeps_schedule_dtype_and_buffers():
    def build(model):
        return gd.create("muon", model, ns_coefficients=POLAR_EXPRESS, ns_dtype=torch.bfloat16,
                         weight_decay=0.01, adjust_lr="match_rms_adamw", lr=1e-3)

    torch.manual_seed(0)
    model = TinyGPT()
    opt = build(model)
    for step in range(2):
        opt.zero_grad()
        lm_loss(model, seed=step).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for step in range(2, 4):
        opt.zero_grad()
        lm_loss(model, seed=step).backward()
        opt.step()
    expected = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = TinyGPT()
    resumed.load_state_dict(saved["model"])
    opt2 = gd.create("muon", resumed)  # plain defaults: load_state_dict restores the groups
    opt2.load_state_dict(saved["opt"])
    group = opt2.param_groups[0]
    assert group["ns_coefficients"] == POLAR_EXPRESS and group["ns_dtype"] == torch.bfloat16
    assert group["adjust_lr"] == "match_rms_adamw"
    for step in range(2, 4):
        opt2.zero_grad()
        lm_loss(resumed, seed=step).backward()
        opt2.step()
    for p, q in zip(resumed.parameters(), expected, strict=True):
        assert torch.equal(p, q)


def test_bf16_params_keep_bf16_buffers_and_grads_are_untouched():
    p = nn.Parameter(torch.randn(12, 6, dtype=torch.bfloat16))
    p.grad = torch.randn(12, 6, dtype=torch.bfloat16)
    grad = p.grad.clone()
    opt = Muon([p])
    opt.step()
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    assert torch.equal(p.grad, grad)


def test_param_groups_can_mix_views_and_coefficients():
    conv = nn.Parameter(torch.randn(4, 2, 3))  # a Conv1d kernel: flatten to (4, 6)
    experts = nn.Parameter(torch.randn(3, 5, 4))  # a stack: three (5, 4) matrices
    bias = nn.Parameter(torch.zeros(4))
    opt = Muon([
        {"params": [conv], "algorithm": "muon"},
        {"params": [experts], "algorithm": "muon", "matrix_view": "batch",
         "ns_coefficients": POLAR_EXPRESS},
        {"params": [bias], "algorithm": "adamw"},
    ])
    assert [g["matrix_view"] for g in opt.param_groups[:2]] == ["flatten", "batch"]
    for q in (conv, experts, bias):
        q.grad = torch.randn_like(q)
    opt.step()
    assert all(torch.isfinite(q).all() for q in (conv, experts, bias))


def test_registry_entry():
    spec = gd.optimizers()["muon"]
    assert spec.family == "layer-wise" and spec.routes and not spec.needs_model
    assert spec.state_buffers == 1.0 and "kellerjordan.github.io" in spec.reference
    for key in ("lr", "momentum", "nesterov", "ns_steps", "ns_coefficients", "weight_decay",
                "adjust_lr", "adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay",
                "routing"):
        assert key in spec.hyperparams, key
    opt = gd.create("muon", [nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, Muon) and [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw"]
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["ns_steps"], g["weight_decay"]) == (
        0.02, 0.95, True, 5, 0.0)
    assert g["ns_coefficients"] == JORDAN and g["adjust_lr"] == "original"


@pytest.mark.parametrize(
    "hp, match",
    [
        (dict(adjust_lr="rms"), "adjust_lr.*'rms'"),
        (dict(matrix_view="stack"), "matrix_view.*'stack'"),
        (dict(ns_steps=0), "ns_steps.*0"),
        (dict(ns_coefficients=POLAR_EXPRESS, ns_steps=3), "5 triples but steps=3"),
        (dict(ns_coefficients=(1.0, 2.0)), r"\(1.0, 2.0\)"),
        (dict(momentum=1.0), "momentum.*1.0"),
        (dict(lr=-0.1), "lr.*-0.1"),
        (dict(ns_dtype=torch.int8), "ns_dtype.*int8"),
        (dict(adamw_betas=(0.9, 1.0)), r"betas.*1.0"),
        (dict(adamw_eps=-1.0), "eps.*-1.0"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_value(hp, match):
    with pytest.raises(ValueError, match=match):
        gd.create("muon", TinyGPT(), **hp)


def test_invalid_group_override_names_the_group():
    w = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"param group 1.*adjust_lr.*'bogus'"):
        Muon([{"params": [nn.Parameter(torch.zeros(2, 2))]},
              {"params": [w], "adjust_lr": "bogus"}])
    with pytest.raises(ValueError, match=">= 2 dimensions"):
        Muon([{"params": [nn.Parameter(torch.zeros(3))], "algorithm": "muon"}])


def test_factory_matches_the_class():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    opt = muon(model, lr=0.01)
    assert isinstance(opt, Muon) and opt.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="routing overrides match parameter names"):
        muon(list(model.parameters()), routing={"*": "adamw"})


def test_diagnostics_record_the_newton_schulz_dtype_chosen(monkeypatch):
    import sys

    import guided_descent.linalg.newton_schulz as ns_module

    muon_module = sys.modules[Muon.__module__]  # the package's `muon` attribute is the factory

    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    for hardware, big in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(ns_module, "cpu_bf16_matmul", lambda hardware=hardware: hardware)
        monkeypatch.setattr(muon_module, "cpu_bf16_matmul", lambda hardware=hardware: hardware)
        for ns_dtype, expected in ((None, {(256, 64): "float32", (256, 256): big}),
                                   (torch.float32, {(256, 64): "float32", (256, 256): "float32"})):
            opt = gd.create("muon", model, ns_dtype=ns_dtype)
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            report = opt.diagnostics()
            assert report["cpu_bf16_matmul"] is hardware
            chosen = {tuple(e["shape"]): e["ns_dtype"] for e in report["params"]
                      if e["algorithm"] == "muon"}
            assert chosen == expected
            model.zero_grad()
