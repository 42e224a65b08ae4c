"""Routing decided by the model's structure: reported cases that used to go wrong silently.

Each test here failed on the registration-order routing it replaces: heads defined before the
hidden layers, a single nn.Linear, attention and recurrent weights, parameter lists, named
parameters, untagged param groups, expert stacks, and resuming a routed optimizer.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_descent as gd
from guided_descent.linalg.newton_schulz import newton_schulz
from guided_descent.routing import policy_for, route

MATRIX = ("muon", "shampoo", "soap")


class HeadFirst(nn.Module):
    """The head is registered before the hidden layers (a common way to write a model)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 10)
        self.inp = nn.Linear(16, 32)
        self.hidden = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def algorithms(table) -> dict[str, str]:
    return {r.name: r.algorithm for r in table.routes}


def head_route(name: str) -> str:
    """Where ``name``'s routing policy sends the output head (Shampoo: itself; others: AdamW)."""
    return name if policy_for(name).head else "adamw"


def groups_by_name(opt, model) -> dict[str, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["algorithm"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", MATRIX)
def test_a_head_defined_first_is_found_from_the_forward_pass(name):
    model = HeadFirst()
    x = torch.randn(4, 16)
    table = route(model, name, example_inputs=x)
    assert algorithms(table)["head.weight"] == head_route(name)
    assert algorithms(table)["hidden.weight"] == name
    assert "output head" in {r.name: r.reason for r in table.routes}["head.weight"]

    # The optimizer reads the same roles off its first forward pass, before its first step.
    opt = gd.create(name, model)
    assert opt.routing.provisional
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert not opt.routing.provisional
    assert groups_by_name(opt, model) == algorithms(table)
    hidden_before = model.hidden.weight.detach().clone()
    opt.step()
    opt.step()  # SOAP's first gradient only builds its bases; the weight moves on the second
    assert not torch.equal(model.hidden.weight, hidden_before)
    assert opt.state[model.hidden.weight].keys() != {"step", "exp_avg", "exp_avg_sq"}
    # route() and the optimizer print the same table.
    assert str(opt.routing) == str(table)


def test_stepping_without_a_forward_pass_warns_that_roles_were_guessed():
    model = HeadFirst()
    opt = gd.create("muon", model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="without seeing the model run"):
        opt.step()


def test_a_single_linear_is_not_silently_handed_to_adamw():
    model = nn.Linear(8, 3)
    with pytest.warns(UserWarning, match="no parameter of the model is routed to muon"):
        gd.create("muon", model, lr=0.05)
    # Overriding by name sends it to Muon, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = gd.create("muon", model, routing={"weight": "muon"})
    assert groups_by_name(opt, model)["weight"] == "muon"


class AttentionRNN(nn.Module):
    def __init__(self, rnn: type[nn.Module], d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.rnn = rnn(d, d, batch_first=True)
        self.out = nn.Linear(d, 20)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.out(self.rnn(x)[0])


@pytest.mark.parametrize("rnn, gates", [(nn.GRU, 3), (nn.LSTM, 4), (nn.RNN, 1)])
@pytest.mark.parametrize("name", MATRIX)
def test_attention_and_recurrent_weights_are_matrices(name, rnn, gates):
    model = AttentionRNN(rnn)
    table = route(model, name)
    rows = {r.name: r for r in table.routes}
    assert rows["attn.in_proj_weight"].algorithm == name
    assert rows["attn.in_proj_weight"].view == "split:3"  # Q, K, V separately
    assert rows["attn.out_proj.weight"].algorithm == name
    gate_view = "flatten" if gates == 1 else f"split:{gates}"
    for weight in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        assert rows[weight].algorithm == name and rows[weight].view == gate_view
    for vector in ("attn.in_proj_bias", "rnn.bias_ih_l0", "embed.weight"):
        assert rows[vector].algorithm == "adamw", vector
    assert rows["out.weight"].algorithm == head_route(name)
    heads = route(model, name, policy=gd.routing.RoutingPolicy(attention="heads"))
    assert {r.name: r.view for r in heads.routes}["attn.in_proj_weight"] == "split:6"


def test_muon_on_a_recurrent_model_runs_muon_on_its_gates():
    model = AttentionRNN(nn.GRU)
    opt = gd.create("muon", model)
    matrix = [g for g in opt.param_groups if g["algorithm"] == "muon"]
    assert sum(len(g["params"]) for g in matrix) == 4  # in_proj, out_proj, weight_ih, weight_hh


def test_muon_orthogonalizes_q_k_and_v_separately():
    torch.manual_seed(0)
    d = 8
    W = nn.Parameter(torch.randn(3 * d, d))
    opt = gd.create("muon", [{"params": [W], "algorithm": "muon", "matrix_view": "split:3"}],
                    momentum=0.0, nesterov=False, lr=0.1)
    g = torch.randn(3 * d, d)
    W.grad = g.clone()
    before = W.detach().clone()
    opt.step()
    expected = torch.cat([newton_schulz(block) for block in g.chunk(3)])  # square blocks: scale 1
    # Batched and per-matrix float32 products round differently: entries of size ~0.3 after five
    # iterations of three length-8 products differ by a few tens of ulp at most.
    atol = 50 * torch.finfo(torch.float32).eps
    torch.testing.assert_close((before - W.detach()) / 0.1, expected, rtol=0, atol=atol)


class MoE(nn.Module):
    """Top-1 mixture of experts with a (E, d, d) expert stack and a learned positional table."""

    def __init__(self, d: int = 8, experts: int = 3, ctx: int = 5) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.router = nn.Linear(d, experts)
        self.experts = nn.Parameter(torch.randn(experts, d, d) / d**0.5)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos
        choice = self.router(x).argmax(-1)  # (B, T)
        h = torch.einsum("btd,btde->bte", x, self.experts[choice])
        return self.head(h.mean(1))


def test_expert_stacks_are_batches_and_positional_tables_are_not_matrices():
    model = MoE()
    table = route(model, "muon", example_inputs=torch.randn(2, 5, 8))
    rows = {r.name: r for r in table.routes}
    assert rows["experts"].algorithm == "muon" and rows["experts"].view == "batch"
    assert rows["pos"].algorithm == "adamw"
    assert rows["router.weight"].algorithm == "muon"
    assert rows["head.weight"].algorithm == "adamw"


def test_a_tied_functional_head_is_the_embedding_not_the_last_linear():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(12, 8)
            self.fc = nn.Linear(8, 8)
            self.proj = nn.Linear(8, 8)

        def forward(self, idx):
            return self.proj(torch.relu(self.fc(self.emb(idx)))) @ self.emb.weight.T

    table = route(Tied(), "muon", example_inputs=torch.randint(0, 12, (2, 3)))
    assert algorithms(table) == {
        "emb.weight": "adamw", "fc.weight": "muon", "fc.bias": "adamw",
        "proj.weight": "muon", "proj.bias": "adamw",
    }


@pytest.mark.parametrize("name", MATRIX)
def test_named_parameters_are_accepted_and_routable_by_name(name):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="given parameters, not the model"):
        opt = gd.create(name, model.named_parameters())
    assert {g["algorithm"]: g["param_names"] for g in opt.param_groups} == {
        name: ["0.weight", "2.weight"], "adamw": ["0.bias", "2.bias"]}
    opt = gd.create(name, model.named_parameters(), routing={"2.*": "adamw"})
    assert {g["algorithm"]: g["param_names"] for g in opt.param_groups} == {
        name: ["0.weight"], "adamw": ["0.bias", "2.weight", "2.bias"]}


@pytest.mark.parametrize("name", MATRIX)
def test_untagged_groups_follow_one_rule_for_every_method(name):
    w, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    opt = gd.create(name, [nn.Parameter(torch.randn(2, 2))])
    opt.add_param_group({"params": [w, b]})
    added = opt.param_groups[-2:]
    assert [(g["algorithm"], [tuple(p.shape) for p in g["params"]]) for g in added] == [
        (name, [(4, 4)]), ("adamw", [(4,)])]


@pytest.mark.parametrize("name", MATRIX)
def test_parameters_and_module_route_alike_where_shapes_can_tell(name):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3))
    by_model = groups_by_name(gd.create(name, model), model)
    with pytest.warns(UserWarning, match="cannot be recognised"):
        by_list = groups_by_name(gd.create(name, list(model.parameters())), model)
    # Everything but the head agrees; the head is the one thing a list cannot show.
    assert {n: a for n, a in by_list.items() if n != "3.weight"} == {
        n: a for n, a in by_model.items() if n != "3.weight"}
    assert by_model["3.weight"] == head_route(name) and by_list["3.weight"] == name


@pytest.mark.parametrize("name", MATRIX)
def test_resuming_restores_the_routing_the_state_was_saved_with(name):
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    model = HeadFirst()
    copy = HeadFirst()
    copy.load_state_dict(model.state_dict())
    opt = gd.create(name, model)
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    train(model, opt, 2)

    resumed = HeadFirst()
    resumed.load_state_dict(saved["model"])
    fresh = gd.create(name, resumed)  # provisional: it has not seen a forward pass
    fresh.load_state_dict(saved["opt"])
    assert not fresh.routing.provisional
    assert groups_by_name(fresh, resumed) == groups_by_name(opt, model)
    train(resumed, fresh, 2)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    del copy


@pytest.mark.parametrize("name", ("shampoo", "soap"))
def test_a_routing_policy_decides_what_the_method_takes(name):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    policy = gd.routing.RoutingPolicy(head=True, vectors=True, input_layer=False)
    opt = gd.create(name, model, routing_policy=policy)
    assert groups_by_name(opt, model) == {
        "0.weight": "adamw", "0.bias": name, "1.weight": name, "1.bias": name,
        "2.weight": name, "2.bias": name,
    }
    with pytest.raises(ValueError, match="needs parameters with >= 2 dimensions"):
        gd.create("muon", model, routing_policy=gd.routing.RoutingPolicy(vectors=True))
