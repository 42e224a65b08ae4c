"""The shared training loop: equivalence with a hand-written loop, logging, schedule, EMA, clip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent import EMA
from guided_descent.experiments.records import MetricsWriter
from guided_descent.experiments.training import train
from guided_descent.schedules import LinearDecay


def _setup(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(40, 3)
    y = torch.randint(0, 2, (40,))
    return model, x, y


def _batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def loss(step: int) -> torch.Tensor:
        idx = torch.arange(8) + 8 * ((step - 1) % 5)
        return nn.functional.cross_entropy(model(x[idx]), y[idx])

    return loss


def test_bit_identical_to_a_hand_written_loop():
    model_a, x, y = _setup()
    model_b, _, _ = _setup()
    opt_a = gd.create("adam", model_a)
    opt_b = gd.create("adam", model_b)
    loss_a = _batch_loss(model_a, x, y)
    for step in range(1, 26):
        loss = loss_a(step)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()
    result = train(model_b, opt_b, _batch_loss(model_b, x, y), 25)
    assert result.steps == 25 and not result.diverged
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_evaluations_and_metrics_records(tmp_path):
    model, x, y = _setup()
    opt = gd.create("sgd", model)
    calls = []
    writer = MetricsWriter(tmp_path / "m.jsonl")

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        return {"loss": float(nn.functional.cross_entropy(model(x), y))}

    result = train(
        model,
        opt,
        _batch_loss(model, x, y),
        10,
        evaluate=evaluate,
        eval_every=4,
        metrics=writer,
        tags={"run": "a"},
        on_step=calls.append,
    )
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 8, 10]
    assert rows[0]["batch_loss"] is None and rows[1]["batch_loss"] > 0
    assert all(r["event"] == "eval" and r["run"] == "a" and "loss" in r for r in rows)
    assert "lr" not in rows[0]  # only logged when a schedule drives it
    assert calls == list(range(1, 11))
    assert [h[0] for h in result.history] == [0, 4, 8, 10]
    assert result.scores == {"loss": rows[-1]["loss"]}


def test_mean_batch_loss_between_evaluations():
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen: every step sees the same model
    with torch.no_grad():
        losses = [float(_batch_loss(model, x, y)(s)) for s in range(1, 7)]
    result = train(model, opt, _batch_loss(model, x, y), 6, eval_every=3)
    means = [h[1] for h in result.history]
    assert means[0] is None
    assert means[1] == pytest.approx(sum(losses[:3]) / 3)
    assert means[2] == pytest.approx(sum(losses[3:]) / 3)


def test_schedule_drives_every_group(tmp_path):
    model, x, y = _setup()
    opt = gd.create("muon", model, lr=0.02, adamw_lr=1e-3)
    writer = MetricsWriter(tmp_path / "m.jsonl")
    train(model, opt, _batch_loss(model, x, y), 6, schedule=LinearDecay(8), metrics=writer)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx([0.02, 1e-3])
    assert rows[-1]["lr"] == pytest.approx([0.02 * 0.25, 1e-3 * 0.25])  # schedule(6) = 0.25


def test_ema_weights_are_evaluated_and_training_weights_kept():
    model, x, y = _setup()
    opt = gd.create("adam", model, lr=0.05)
    ema = EMA(model, decay=0.9)
    seen = []

    def evaluate() -> dict[str, float]:
        seen.append(model[0].weight.detach().clone())
        return {}

    train(model, opt, _batch_loss(model, x, y), 5, ema=ema, evaluate=evaluate)
    assert ema.num_updates == 5
    assert torch.equal(seen[-1], ema.module[0].weight)  # evaluated with the average
    assert not torch.equal(model[0].weight, ema.module[0].weight)  # trained weights back
    with pytest.raises(ValueError, match="another model"):
        train(_setup()[0], opt, _batch_loss(model, x, y), 1, ema=ema)


def test_gradient_clipping_matches_clip_grad_norm():
    model_a, x, y = _setup()
    model_b, _, _ = _setup()
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    loss = _batch_loss(model_a, x, y)(1)
    opt_a.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model_a.parameters(), 0.01)
    opt_a.step()
    train(model_b, opt_b, _batch_loss(model_b, x, y), 1, clip_grad_norm=0.01)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_stops_on_a_non_finite_loss():
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def bad(step: int) -> torch.Tensor:
        out = model(x).sum()
        return out * float("inf") if step == 3 else out * 0.0

    result = train(model, opt, bad, 100, eval_every=5, stop_on_nonfinite=True)
    assert result.diverged and result.steps == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"eval_every": 0}, "eval_every"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
    ],
)
def test_invalid_arguments(kwargs, match):
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = {"steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        train(model, opt, _batch_loss(model, x, y), args.pop("steps"), **args)


def test_a_schedule_free_optimizer_is_evaluated_at_its_average():
    """The parameters hold y while training; evaluations must see x (the point the method
    returns), and training must go on from y, bit for bit as a loop that never evaluated."""
    model, x, y = _setup()
    reference, _, _ = _setup()
    opt = gd.create("schedulefree_adamw", model, lr=0.05)
    ref_opt = gd.create("schedulefree_adamw", reference, lr=0.05)
    seen = []

    def evaluate() -> dict[str, float]:
        seen.append((opt.training, model[0].weight.detach().clone()))
        return {}

    train(model, opt, _batch_loss(model, x, y), 6, evaluate=evaluate, eval_every=3)
    loss = _batch_loss(reference, x, y)
    for step in range(1, 7):
        ref_opt.zero_grad(set_to_none=True)
        loss(step).backward()
        ref_opt.step()
    assert opt.training  # y is back in the parameters
    assert torch.equal(model[0].weight, reference[0].weight)  # evaluations changed nothing
    assert [training for training, _ in seen] == [False, False, False]
    with ref_opt.averaged():
        assert torch.equal(seen[-1][1], reference[0].weight)  # x, not y
    assert not torch.equal(seen[-1][1], model[0].weight)


def test_an_ema_beside_a_schedule_free_optimizer_averages_x():
    model, x, y = _setup()
    opt = gd.create("schedulefree_adamw", model, lr=0.05)
    ema = EMA(model, decay=0.0)  # decay 0: the EMA is the last point it was updated at
    train(model, opt, _batch_loss(model, x, y), 4, ema=ema)
    with opt.averaged():
        assert torch.equal(ema.module[0].weight, model[0].weight)
