"""Checks of ``state_dtype=bfloat16`` shared by the Kronecker methods' test modules.

``tests/test_state_dtype_soap.py`` (SOAP, KL-SOAP, KL-Shampoo) and
``tests/test_state_dtype_shampoo.py`` build their optimizers and name the buffers the option governs
differently; what a sync-free step and a resumed run must do with those buffers is the same.
A :class:`Method` carries one module's way of building, stepping and reading them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Method:
    """One optimizer configuration of a test module: fresh parameters, an optimizer over them
    (``build(params, **hyper)``), the gradients of step ``i``, the parameters flattened, and the
    buffers ``state_dtype`` governs in parameter order."""

    parameters: Callable[[], list[nn.Parameter]]
    build: Callable[..., torch.optim.Optimizer]
    gradients: Callable[[list[nn.Parameter], int], None]
    flat: Callable[[list[nn.Parameter]], torch.Tensor]
    governed: Callable[[torch.optim.Optimizer], list[torch.Tensor]]

    def train(self, steps: int, **hyper: Any) -> tuple[list[nn.Parameter], Any]:
        params = self.parameters()
        opt = self.build(params, **hyper)
        for i in range(steps):
            self.gradients(params, i)
            opt.step()
        return params, opt


def sync_free_steps_equal_host_decided_steps(m: Method) -> None:
    runs = []
    for sync_free in (False, True):
        params = m.parameters()
        opt = m.build(params, state_dtype=torch.bfloat16)
        opt.sync_free = sync_free
        for i in range(6):
            m.gradients(params, i)
            opt.step()
        runs.append((m.flat(params), m.governed(opt)))
    # The masked path computes the same values with the same kernels (its refreshes are the
    # flagged ones, same arithmetic): the same bits.
    assert torch.equal(runs[1][0], runs[0][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[1][1], runs[0][1], strict=True))


def state_dict_round_trip_resumes_exactly(m: Method) -> None:
    params, opt = m.train(3, state_dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    for i in range(3, 7):
        m.gradients(params, i)
        opt.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = m.parameters()
    with torch.no_grad():
        for p, value in zip(resumed, saved["params"], strict=True):
            p.copy_(value)
    # Built without the option: the saved groups carry state_dtype and the buffers come back in
    # bf16 (torch's own load would cast them to the parameters' float32).
    again = m.build(resumed)
    again.load_state_dict(saved["opt"])
    assert all(g["state_dtype"] is torch.bfloat16 for g in again.param_groups)
    assert all(b.dtype == torch.bfloat16 for b in m.governed(again))
    for i in range(3, 7):
        m.gradients(resumed, i)
        again.step()
    assert torch.equal(m.flat(resumed), m.flat(params))
    ours, theirs = m.governed(again), m.governed(opt)
    assert len(ours) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


class Regression(nn.Module):
    """A small tanh regression MLP (8 -> 32 -> 32 -> 1) for the 50-step tracking checks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def fifty_steps_track_the_float32_state_run(
    create: Callable[[nn.Module, torch.dtype | None], torch.optim.Optimizer],
) -> None:
    """50 full-batch steps on :class:`Regression`, once with float32 (``None``) state and once
    with bf16 state, from the same start: both train and the runs stay on the same path.

    Each step stores a buffer within 2**-8 (relative) of the float32-state one. No bound on 50
    nonlinear steps follows from that: the runs drift apart in the parameters (signs flip where a
    coordinate is within a rounding of 0, Newton–Schulz is steep on small singular values, Adam
    and the graft divide by square roots, refreshed bases and roots move with the statistics), so
    the parameters are only asked to stay within half of the distance travelled -- two unrelated
    runs from this start differ by about all of it. The loss, an average over 128 samples of a
    smooth function of them, moves far less (measured 0.02-1.5 % for every method, with the
    default, AVX2 and AVX512 kernels alike); 5 % still separates "tracks" from "trains
    differently" where the loss falls by over 30 %.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    results = []
    for state_dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        model = Regression()
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = create(model, state_dtype)
        first = None
        for _ in range(50):
            loss = (model(x) - y).pow(2).mean()
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        final = (model(x) - y).pow(2).mean().item()
        moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
        results.append((first, final, moved))
    (first, final32, moved32), (_, final16, moved16) = results
    assert final32 < 0.7 * first and final16 < 0.7 * first  # both train
    assert (moved16 - moved32).norm() <= 0.5 * moved32.norm()
    assert abs(final16 - final32) <= 0.05 * final32
