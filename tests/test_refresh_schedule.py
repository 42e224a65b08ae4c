"""The staggered refresh schedule of the Kronecker methods (``stagger_refresh``).

Every refresh unit (a Shampoo block, a SOAP parameter) still refreshes once per
``precondition_frequency`` steps; with staggering the units are spread over the steps of a period
so that no step pays for all of them, and off it is the references' schedule, exactly.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.optimizers import shampoo as shampoo_module
from guided_descent.optimizers import soap as soap_module

FREQ = 4
STEPS = 3 * FREQ + 2


def model() -> nn.Module:
    torch.manual_seed(0)
    # Six hidden matrices of three sizes, so that a period has units to spread.
    return nn.Sequential(
        nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 40), nn.Tanh(),
        nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
        nn.Linear(24, 3),
    )


def refreshes(name: str, stagger: bool, monkeypatch) -> dict[int, Counter]:
    """{step: Counter of refreshed parameter shapes} over STEPS steps."""
    seen: dict[int, Counter] = {}
    if name == "shampoo":
        original = shampoo_module.Shampoo._refresh_roots

        def spy(self, due, *args, **kwargs):
            for p, state, _key, _b, _F, _root in due:
                seen.setdefault(int(state["step"].item()), Counter())[tuple(p.shape)] += 1
            return original(self, due, *args, **kwargs)

        monkeypatch.setattr(shampoo_module.Shampoo, "_refresh_roots", spy)
    else:
        original = soap_module.SOAP._refresh_bases

        def spy(self, jobs, *args, **kwargs):
            for p, state, _d, _key in jobs:
                seen.setdefault(int(state["step"].item()), Counter())[tuple(p.shape)] += 1
            return original(self, jobs, *args, **kwargs)

        monkeypatch.setattr(soap_module.SOAP, "_refresh_bases", spy)
    net = model()
    opt = gd.create(name, net, precondition_frequency=FREQ, stagger_refresh=stagger,
                    example_inputs=torch.zeros(2, 8))
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        opt.zero_grad()
        net(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
        opt.step()
    return seen


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_off_is_the_references_schedule(name, monkeypatch):
    seen = refreshes(name, False, monkeypatch)
    assert sorted(seen) == list(range(FREQ, STEPS + 1, FREQ))  # every unit on the same steps


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_staggered_units_refresh_once_per_period_spread_over_it(name, monkeypatch):
    off = refreshes(name, False, monkeypatch)
    monkeypatch.undo()
    on = refreshes(name, True, monkeypatch)
    per_period = sum(off[FREQ].values())  # all units, counted once
    # After the first refresh (all units for Shampoo), each later period refreshes each unit
    # once: the same total as the references', spread over more steps.
    first = FREQ + 1 if name == "shampoo" else FREQ
    for start in range(first, STEPS - FREQ + 2, FREQ):
        window = Counter()
        for t in range(start, start + FREQ):
            window.update(on.get(t, Counter()))
        assert sum(window.values()) == per_period, (start, on)
    if name == "shampoo":
        assert on[FREQ] == off[FREQ]  # the first refresh still builds every root
    assert len([t for t in on if t > FREQ]) > len([t for t in off if t > FREQ])
    assert max(sum(c.values()) for t, c in on.items() if t > FREQ) < per_period


def test_slots_are_balanced_by_cost_and_stable():
    net = model()
    opt = gd.create("shampoo", net, precondition_frequency=FREQ, example_inputs=torch.zeros(2, 8))
    (group,) = [g for g in opt.param_groups if g["algorithm"] == "shampoo"]
    slots = [opt.refresh_slot(p, group) for p in group["params"]]
    assert set(slots) <= set(range(FREQ)) and len(set(slots)) > 1
    # The largest unit (the 24x40 / 40x24 matrices) do not share a slot.
    big = [s for p, s in zip(group["params"], slots, strict=True) if 40 in p.shape]
    assert len(set(big)) == len(big)
    assert slots == [opt.refresh_slot(p, group) for p in group["params"]]  # cached, same answer
    group["stagger_refresh"] = False
    assert {opt.refresh_slot(p, group) for p in group["params"]} == {0}


def test_stagger_refresh_must_be_a_bool():
    with pytest.raises(ValueError, match="stagger_refresh"):
        gd.create("soap", model(), stagger_refresh="yes")


@pytest.mark.parametrize("name", ["shampoo", "soap", "kl_soap"])
def test_vectors_in_a_matrix_group_have_no_refresh_unit(name):
    """Biases routed into a SOAP group (the diagonal path) refresh nothing: stepping them must not
    ask for an offset they do not have (it raised IndexError)."""
    from guided_descent.routing import policy_for

    policy = dataclasses.replace(policy_for(name), vectors=True)
    net = model()
    opt = gd.create(name, net, precondition_frequency=2, routing_policy=policy,
                    example_inputs=torch.zeros(2, 8))
    (group,) = [g for g in opt.param_groups if g["algorithm"] == name]
    assert any(p.dim() == 1 for p in group["params"])
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    if name != "shampoo":  # Shampoo's vectors are blocks with diagonal roots: units of their own
        assert all(opt.refresh_slot(p, group) == 0 for p in group["params"] if p.dim() == 1)
