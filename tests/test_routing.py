"""Routing parameters between a matrix method and AdamW, and the hybrid optimizer base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from guided_descent.optimizers.hybrid import HybridOptimizer, adamw_defaults, build_groups
from guided_descent.routing import route


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, ctx: int = 8, tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, ctx, d))
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.tok.weight


def test_gpt_routing_sends_hidden_matrices_to_the_matrix_method():
    model = TinyGPT()
    table = route(model, "muon")
    algo = {r.name: r.algorithm for r in table.routes}
    hidden = [n for n in algo if n.startswith("blocks.") and n.endswith(("qkv.weight",
              "proj.weight", "fc.weight", "out.weight"))]
    assert len(hidden) == 8
    for name, a in algo.items():
        assert a == ("muon" if name in hidden else "adamw"), name
    reasons = {r.name: r.reason for r in table.routes}
    assert reasons["tok.weight"] == "embedding"
    assert reasons["lm_head.weight"] == "output head (Linear, onto the vocabulary)"
    assert "normalization" in reasons["ln_f.weight"]
    assert "bias" in reasons["blocks.0.qkv.bias"]
    assert "broadcast" in reasons["pos"]  # (1, ctx, d): added to activations, not a matrix
    text = str(table)
    assert text.splitlines()[0].split() == ["parameter", "optimizer", "view", "shape", "reason"]
    assert "blocks.0.fc.weight" in text and "64x16" in text


def test_every_trainable_parameter_is_routed_exactly_once():
    model = TinyGPT(tied=True)
    model.blocks[1].fc.weight.requires_grad_(False)
    table = route(model, "muon")
    ids = [id(p) for g in table.param_groups() for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    # The tied head shares the embedding's tensor: it appears once, as the embedding.
    assert "lm_head.weight" not in {r.name for r in table.routes}
    assert table.count("muon") == 7


def test_overrides_win_and_are_validated():
    model = TinyGPT()
    table = route(model, "muon", {"blocks.*.qkv.weight": "adamw", "lm_head.weight": "muon"})
    algo = {r.name: r.algorithm for r in table.routes}
    assert algo["blocks.0.qkv.weight"] == "adamw" and algo["lm_head.weight"] == "muon"
    assert "override" in {r.name: r.reason for r in table.routes}["lm_head.weight"]
    with pytest.raises(ValueError, match="'sgd'"):
        route(model, "muon", {"*": "sgd"})


def test_conv_kernels_are_matrices_and_the_classifier_is_the_head():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 10))
    algo = {r.name: r.algorithm for r in route(model, "soap").routes}
    assert algo == {
        "0.weight": "soap", "0.bias": "adamw", "1.weight": "adamw", "1.bias": "adamw",
        "3.weight": "adamw", "3.bias": "adamw",
    }


class SignDescent(HybridOptimizer):
    """A minimal matrix method for testing the base: p -= lr * sign(g)."""

    ALGORITHM = "signdescent"

    def __init__(self, params, lr=0.1, adamw_lr=1e-3):
        super().__init__(params, {"lr": lr}, adamw_defaults(adamw_lr, (0.9, 0.999), 1e-8, 0.0))

    def matrix_step(self, group):
        for p in group["params"]:
            if p.grad is not None:
                p.add_(p.grad.sign(), alpha=-group["lr"])


def test_hybrid_adamw_groups_match_torch_adamw_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    ref.load_state_dict(model.state_dict())
    opt = SignDescent(build_groups(model, "signdescent", None), adamw_lr=1e-2)
    adamw_names = [r.name for r in route(model, "signdescent").routes if r.algorithm == "adamw"]
    ref_params = dict(ref.named_parameters())
    torch_opt = torch.optim.AdamW([ref_params[n] for n in adamw_names], lr=1e-2, weight_decay=0.0)
    x = torch.randn(16, 4)
    for _ in range(5):
        for m, o in ((model, opt), (ref, torch_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
        with torch.no_grad():  # the matrix-routed weights follow ours; only AdamW is compared
            for n, p in model.named_parameters():
                if n not in adamw_names:
                    ref_params[n].copy_(p)
    ours = dict(model.named_parameters())
    for n in adamw_names:
        torch.testing.assert_close(ours[n], ref_params[n], rtol=0, atol=0)
    assert opt.state[ours["0.bias"]].keys() == {"step", "exp_avg", "exp_avg_sq"}


def test_hybrid_groups_and_schedulers_keep_the_lr_ratio():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = SignDescent(build_groups(model, "signdescent", None), lr=0.5, adamw_lr=1e-3)
    assert [g["algorithm"] for g in opt.param_groups] == ["signdescent", "adamw"]
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-3]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 ** step)
    opt.step()
    sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(1e-4)


def test_hybrid_splits_plain_parameter_lists_by_dimension():
    w, b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))
    opt = SignDescent([w, b])
    assert [(g["algorithm"], len(g["params"])) for g in opt.param_groups] == [
        ("signdescent", 1), ("adamw", 1)]
    assert opt.param_groups[1]["lr"] == 1e-3  # the AdamW default, not the matrix lr


def test_hybrid_rejects_bad_groups():
    w, b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="'sgd'"):
        SignDescent([{"params": [w], "algorithm": "sgd"}])
    with pytest.raises(ValueError, match=r"\(3,\)"):
        SignDescent([{"params": [b], "algorithm": "signdescent"}])
    with pytest.raises(ValueError, match="lr"):
        SignDescent([{"params": [b], "algorithm": "adamw", "lr": -1.0}])
    with pytest.raises(ValueError, match="routing overrides match parameter names"):
        build_groups([w], "signdescent", {"*": "adamw"})
