"""`guided-descent bench train`: protocol pieces, a tiny end-to-end run, peers optional."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from guided_descent.cli.main import main
from guided_descent.experiments import peers as peer_lib
from guided_descent.experiments.bench_train import (
    WORKLOADS,
    Config,
    build_optimizer,
    clears_spread,
    make_schedule,
    run_one,
    time_to_target,
)
from guided_descent.experiments.records import MetricsWriter, read_metrics

QUICK = ["--quick", "--quiet", "--threads", "1"]


def _bench(tmp_path, name: str, *flags: str) -> dict:
    out = tmp_path / name
    assert main(["bench", "train", *flags, *QUICK, "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def test_quick_run_writes_table_figures_and_claims(tmp_path, capsys):
    summary = _bench(tmp_path, "digits", "digits-mlp")  # TASK positional, as in the README
    out = tmp_path / "digits"
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    res = summary["results"]
    assert list(res["optimizers"]) == ["adamw", "muon"]  # the CI variant's list, AdamW first
    for row in res["optimizers"].values():
        assert row["seeds"] == 2 and row["finite"]
        assert row["opt_step_ms"]["median"] > 0 and row["state_bytes"] > 0
        assert "steps" in row["target"] and "steps" in row["adamw_target"]
    assert res["optimizers"]["adamw"]["vs_adamw"]["opt_step_ms"] == 1.0
    names = [c["name"] for c in summary["claims"]]
    assert names[0] == "all-finite" and summary["claims"][0]["passed"]
    assert "all-reach" in names and any(n.startswith("ranking:") for n in names)
    report = (out / "report.md").read_text()
    for figure in ("loss_vs_steps.png", "loss_vs_time.png"):
        assert f"./{figure}" in report and (out / figure).stat().st_size > 1000
    assert "| optimizer | final test_acc | steps to target |" in report
    assert "This is the CI-sized variant" in report
    env = json.loads((out / "env.json").read_text())
    assert "mnist1d" in env["packages"] and "heavyball" in env["packages"]
    assert env["command"].startswith("guided-descent bench train digits-mlp --quick")
    assert f"Command: `{env['command']}`" in report
    # Every evaluation is in metrics.jsonl with the training clock, so curves can be redrawn.
    evals = [r for r in read_metrics(out) if r.get("event") == "eval"]
    assert {r["optimizer"] for r in evals} == {"adamw", "muon"}
    assert all("train_seconds" in r and "test_acc" in r for r in evals)


def test_charlm_quick_in_bfloat16_autocast_keeps_float32_state(tmp_path):
    summary = _bench(tmp_path, "lm", "--task", "charlm", "--precision", "bf16",
                     "--optimizers", "muon", "--seeds", "1")
    res = summary["results"]
    assert res["autocast"] == "bfloat16"
    assert res["versions"]["corpus_sha256"] == res["problem"]["corpus_sha256"]
    env = json.loads((tmp_path / "lm" / "env.json").read_text())
    assert env["corpus_sha256"] == res["versions"]["corpus_sha256"]
    # fp32 Adam state: 8 bytes per parameter (+ step counters).
    assert 8.0 <= res["optimizers"]["adamw"]["state_bytes_per_param"] < 8.1
    for row in res["optimizers"].values():
        assert row["finite"] and math.isfinite(row["final_loss"]["median"])


def test_bf16_autocast_run_one_shapes_and_dtypes(tmp_path):
    config = Config(task="charlm", ci=True, seeds=1, warmup_steps=1, precision="bf16",
                    budget_steps=3, eval_every=3)
    problem = config.workload.build(0, 3, 2, True, torch.device("cpu"))
    model = problem.model()
    x = torch.zeros(2, 8, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, 8, 256) and logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    record = run_one(config, problem, "adamw", 0, 1.0, metrics)
    metrics.close()
    assert record["finite"] and record["steps_done"] == 3


def test_mnist1d_transformer_quick_run_end_to_end(tmp_path):
    summary = _bench(tmp_path, "tf", "mnist1d-transformer")
    res = summary["results"]
    assert list(res["optimizers"]) == ["adamw", "muon"]
    assert res["targets"]["protocol"]["metric"] == "test_acc"
    assert res["problem"]["layout"]["d_model"] == 16  # the CI-sized model
    for row in res["optimizers"].values():
        assert row["seeds"] == 2 and row["finite"]
        assert 0.0 <= row["final_metric"]["median"] <= 1.0
    assert summary["claims"][0]["name"] == "all-finite" and summary["claims"][0]["passed"]
    report = (tmp_path / "tf" / "report.md").read_text()
    assert "| optimizer | final test_acc | steps to target |" in report


def test_mnist1d_transformer_every_listed_optimizer_steps(tmp_path):
    """Each optimizer of the full list runs a few steps on the CI model, finite; natural
    gradient, which cannot differentiate forward through attention, is refused up front."""
    workload = WORKLOADS["mnist1d-transformer"]
    config = Config(task="mnist1d-transformer", ci=True, seeds=1, warmup_steps=1,
                    budget_steps=3, eval_every=3)
    problem = workload.build(0, 3, 20, True, torch.device("cpu"))
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    for name in workload.optimizers:
        record = run_one(config, problem, name, 0, 1.0, metrics)
        assert record["finite"] and record["steps_done"] == 3, name
    metrics.close()
    with pytest.raises(ValueError, match="natural_gradient cannot run on mnist1d-transformer"):
        Config(task="mnist1d-transformer", optimizers=("natural_gradient",))


def test_mnist1d_gru_every_listed_optimizer_steps_on_its_gates(tmp_path):
    """The recurrent workload: every optimizer of its list runs a few finite steps on the CI
    model, and the matrix methods take the GRU's weights as one matrix per gate."""
    workload = WORKLOADS["mnist1d-gru"]
    config = Config(task="mnist1d-gru", ci=True, seeds=1, warmup_steps=1, budget_steps=3,
                    eval_every=3)
    problem = workload.build(0, 3, 20, True, torch.device("cpu"))
    assert problem.info["layout"] == {"patch": 4, "hidden": 16, "layers": 1}
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    for name in workload.optimizers:
        record = run_one(config, problem, name, 0, 1.0, metrics)
        assert record["finite"] and record["steps_done"] == 3, name
    metrics.close()
    model = problem.model()
    for name in ("muon", "shampoo", "soap"):
        opt = build_optimizer(name, model, config).optimizer
        views = {id(p): g.get("matrix_view") for g in opt.param_groups
                 if g["algorithm"] == name for p in g["params"]}
        for weight in (model.rnn.weight_ih_l0, model.rnn.weight_hh_l0):
            assert views.get(id(weight)) == "split:3", name


def test_warmup_then_restore_reproduces_the_unwarmed_run(tmp_path):
    """The untimed warm-up must leave no trace: same weights, fresh state, same RNG."""
    finals = []
    for warmup in (0, 4):
        config = Config(task="digits-mlp", ci=True, seeds=1, warmup_steps=warmup,
                        budget_steps=12, eval_every=6)
        problem = config.workload.build(0, 12, 16, True, torch.device("cpu"))
        metrics = MetricsWriter(tmp_path / f"w{warmup}.jsonl")
        finals.append([run_one(config, problem, name, 0, 1.0, metrics)["final"]
                       for name in ("adamw", "muon")])
        metrics.close()
    assert finals[0] == finals[1]


def test_budget_minutes_stops_a_run_and_still_ends_on_an_evaluation(tmp_path):
    config = Config(task="mnist1d-mlp", ci=True, seeds=1, warmup_steps=0,
                    budget_steps=100_000, eval_every=1000, budget_minutes=0.2 / 60)
    problem = config.workload.build(0, config.budget, config.batch, True, torch.device("cpu"))
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    record = run_one(config, problem, "adamw", 0, 1.0, metrics)
    metrics.close()
    assert record["stopped_by_clock"] and 0 < record["steps_done"] < 100_000
    assert record["train_seconds"] >= 0.2
    assert record["curve"][-1][0] == record["steps_done"]
    last = [r for r in read_metrics(tmp_path) if r.get("event") == "eval"][-1]
    assert last["step"] == record["steps_done"] and "test_acc" in last


def test_lr_sweep_tries_every_factor_and_keeps_one(tmp_path):
    summary = _bench(tmp_path, "sweep", "--task", "kron-quadratic", "--optimizers", "adamw",
                     "--seeds", "1", "--lr-sweep", "--sweep-factors", "0.5,1,2")
    res = summary["results"]
    assert set(res["sweep"]["adamw"]) == {"0.5", "1", "2"}
    assert res["lr_factors"]["adamw"] in (0.5, 1.0, 2.0)


def test_task_given_twice_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "digits-mlp", "--task", "charlm", *QUICK,
              "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "task given twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_time_to_target_and_misses():
    curve = [(0, 0.0, 0.1, 2.0), (10, 1.0, 0.5, 1.0), (20, 2.5, 0.8, 0.5)]
    hit = time_to_target(curve, 0.75, True, 0, budget=20, samples_per_step=4)
    assert hit == {"steps": 20, "samples": 80, "seconds": 2.5, "reached": True, "lost": False}
    assert time_to_target(curve, 1.0, False, 1, 20, 4)["steps"] == 10
    miss = time_to_target(curve, 0.9, True, 0, 20, 4)
    assert miss["steps"] == 21 and miss["seconds"] is None and not miss["reached"]


def test_clears_spread_is_paired_and_strict():
    assert clears_spread([100, 110, 120], [50, 60, 70])
    assert not clears_spread([100, 110, 120], [50, 130, 70])  # slower in one seed
    assert not clears_spread([100], [10])  # one seed: no spread to clear
    assert clears_spread([math.inf, 100], [40, 50])  # AdamW missed where the other hit
    assert not clears_spread([100, 100], [math.inf, 50])
    # A mean gain that does not clear 3.09 standard errors: d = (1, 30, 1).
    assert not clears_spread([101, 130, 101], [100, 100, 100])


def test_schedule_family():
    s = make_schedule("cosine", 100, 0.05)
    assert s(0) == pytest.approx(0.1) and s(5) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.1)
    assert make_schedule("constant", 100, 0.0)(50) == 1.0
    assert make_schedule("wsd", 100, 0.1)(99) < 0.3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task": "mnist"}, "unknown task"),
        ({"steps": 50}, "budget-steps"),
        ({"optimizers": ("auto", "muon")}, "auto"),
        ({"optimizers": ("nope",)}, "unknown optimizer"),
        ({"task": "charlm", "optimizers": ("natural_gradient",)}, "natural_gradient"),
        ({"optimizers": ("kfac",), "compile": True}, "compile"),
        ({"target": "fast"}, "target"),
        ({"schedule": "linear"}, "schedule"),
        ({"hyper": ("muon.ns_dtype",)}, "NAME.KEY=VALUE"),
        ({"hyper": ("muon.nope=1",)}, "unknown hyper-parameter"),
        ({"hyper": ("pto-muon.lr=1",)}, "not one of our optimizers"),
        ({"hyper": ("soap.lr=1",), "optimizers": ("muon",)}, "not among the optimizers"),
    ],
)
def test_config_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(**changes)


def test_every_workload_has_a_ci_variant_and_a_target():
    for w in WORKLOADS.values():
        assert w.ci.get("steps", w.steps) <= 200, w.name
        assert (w.target_value is None) != (w.baseline_fraction is None), w.name
        for ranking in w.rankings:
            assert ranking.op in ("<", "<=") and len(ranking.tiers) >= 2


# ---- peers -------------------------------------------------------------------------------------


def test_missing_peer_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "heavyball", None)  # as if not installed
    assert "not installed" in peer_lib.availability("heavyball-soap")
    summary = _bench(tmp_path, "nopeer", "--task", "kron-quadratic",
                     "--optimizers", "heavyball-soap", "--seeds", "1")
    res = summary["results"]
    assert list(res["optimizers"]) == ["adamw"]
    assert "not installed" in res["skipped"]["heavyball-soap"]
    assert "skipped `heavyball-soap`" in (tmp_path / "nopeer" / "report.md").read_text()


def test_a_failing_peer_is_noted_and_the_benchmark_goes_on(tmp_path, monkeypatch):
    def broken(hidden):
        raise RuntimeError("this library's step is broken")

    fake = peer_lib.Peer("fake-peer", "torch", "torch.optim.SGD", "adamw", broken)
    monkeypatch.setitem(peer_lib.PEERS, "fake-peer", fake)
    summary = _bench(tmp_path, "broken", "--task", "kron-quadratic",
                     "--optimizers", "fake-peer", "--seeds", "1")
    res = summary["results"]
    assert list(res["optimizers"]) == ["adamw"]
    assert res["skipped"]["fake-peer"].startswith("failed: RuntimeError")


def test_chain_shares_param_groups_with_its_parts():
    a, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    chain = peer_lib.Chain([torch.optim.SGD([a], lr=0.1), torch.optim.SGD([b], lr=0.2)])
    assert chain.param_groups[0] is chain.parts[0].param_groups[0]
    sched = torch.optim.lr_scheduler.LambdaLR(chain, lambda t: 0.5)
    assert [g["lr"] for g in chain.parts[0].param_groups] == [0.05]
    a.grad, b.grad = torch.ones(3, 3), torch.ones(3)
    chain.step()
    sched.step()
    assert torch.allclose(a, torch.full((3, 3), 0.95)) and torch.allclose(b, torch.full((3,), 0.9))
    with pytest.raises(ValueError, match="two parts"):
        peer_lib.Chain([torch.optim.SGD([a]), torch.optim.SGD([a])])


def _peer_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("name", [n for n in peer_lib.PEERS if n.startswith("heavyball")])
def test_heavyball_peers_step(name):
    pytest.importorskip("heavyball")
    _step_peer(name)


@pytest.mark.parametrize("name", [n for n in peer_lib.PEERS if n.startswith("pto")])
def test_pytorch_optimizer_peers_step(name):
    pytest.importorskip("pytorch_optimizer")
    _step_peer(name)


def test_torch_muon_peer_steps():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    _step_peer("torch-muon")


def _step_peer(name: str) -> None:
    model = _peer_model()
    with peer_lib.heavyball_compile(False):
        built = peer_lib.create(name, model)
        # The hidden matrices (8x16 and 16x16; not the head) go to the peer; AdamW gets the
        # biases and the head with our counterpart's settings.
        assert built.peer_params == 8 * 16 + 16 * 16
        assert built.adamw_params == sum(p.numel() for p in model.parameters()) - 384
        before = [p.detach().clone() for p in model.parameters()]
        x = torch.randn(32, 8)
        for _ in range(3):
            loss = model(x).square().mean()
            built.optimizer.zero_grad()
            loss.backward()
            built.optimizer.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(moved)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# The peer claims (median against median, the paired seed test) are tested on hand-made
# tables in test_bench_claims.py.


def test_hyper_overrides_reach_the_optimizer_and_the_record(tmp_path):
    summary = _bench(tmp_path, "hyper", "digits-mlp", "--optimizers", "muon", "--seeds", "1",
                     "--hyper", "muon.ns_dtype=bfloat16,muon.ns_steps=3")
    res = summary["results"]
    assert res["overrides"] == {"muon": {"ns_dtype": "bfloat16", "ns_steps": "3"}}
    muon_groups = [g for g in res["hyperparams"]["muon"] if g.get("ns_dtype")]
    assert muon_groups and all(g["ns_dtype"] == "bfloat16" for g in muon_groups)
    config = Config(optimizers=("muon",), hyper=("muon.ns_dtype=bfloat16",))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = build_optimizer("muon", model, config).optimizer
    assert {g.get("ns_dtype") for g in opt.param_groups} >= {torch.bfloat16}


def test_tuned_track_gives_peers_the_same_multipliers(tmp_path, monkeypatch):
    """Finding 5: on the tuned track another library's optimizer gets the same learning-rate
    multipliers as ours (all its param groups scaled together)."""
    fake = peer_lib.Peer("fake-peer", "torch", "torch.optim.SGD", "adamw",
                         lambda hidden: torch.optim.SGD(hidden, lr=0.01))
    monkeypatch.setitem(peer_lib.PEERS, "fake-peer", fake)
    summary = _bench(tmp_path, "tuned", "--task", "kron-quadratic", "--optimizers", "fake-peer",
                     "--seeds", "1", "--lr-sweep", "--sweep-factors", "0.5,1,2")
    res = summary["results"]
    assert set(res["sweep"]["fake-peer"]) == set(res["sweep"]["adamw"]) == {"0.5", "1", "2"}
    first_lr = {r["lr_factor"]: r["lr"] for r in read_metrics(tmp_path / "tuned")
                if r.get("event") == "eval" and r["optimizer"] == "fake-peer" and r["step"] == 0}
    assert set(first_lr) == {0.5, 1.0, 2.0}
    for factor in (0.5, 2.0):
        assert first_lr[factor] == pytest.approx([factor * v for v in first_lr[1.0]])


def test_an_interrupted_bench_train_resumes_from_its_finished_runs(tmp_path):
    from guided_descent.experiments import resume
    from guided_descent.experiments.progress import Progress
    from guided_descent.experiments.records import RunDir

    summary = _bench(tmp_path, "whole", "digits-mlp")
    out = tmp_path / "whole"
    rows = read_metrics(out)
    # Cut the run off inside (muon, seed 1): its run record and its last evaluations are gone.
    cut = next(i for i, r in enumerate(rows) if r.get("event") == "eval"
               and r["optimizer"] == "muon" and r["seed"] == 1 and r["step"] > 0)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:cut + 1]))
    (out / "summary.json").unlink()
    resume(RunDir.open(out), Progress(enabled=False))
    again = json.loads((out / "summary.json").read_text())
    runs = [r for r in read_metrics(out) if r.get("event") == "run"]
    assert sorted((r["optimizer"], r["seed"]) for r in runs) == [
        ("adamw", 0), ("adamw", 1), ("muon", 0), ("muon", 1)]  # nothing trained twice
    muon1 = [r for r in read_metrics(out) if r.get("event") == "eval"
             and r["optimizer"] == "muon" and r["seed"] == 1]
    assert [r["step"] for r in muon1] == sorted({r["step"] for r in muon1})  # no duplicates
    for name in ("adamw", "muon"):
        before = summary["results"]["optimizers"][name]
        after = again["results"]["optimizers"][name]
        assert after["final_metric"] == before["final_metric"]
        assert after["target"]["steps"] == before["target"]["steps"]


def test_report_rerenders_a_run_written_before_verdicts(tmp_path):
    """Old run directories hold claims with `passed` only, and rows without the per-seed reach,
    the lost counts or extra targets: `guided-descent report` still renders them."""
    from guided_descent.report import render

    _bench(tmp_path, "old", "digits-mlp", "--seeds", "1")
    path = tmp_path / "old" / "summary.json"
    summary = json.loads(path.read_text())
    for claim in summary["claims"]:
        del claim["verdict"], claim["reason"]
    res = summary["results"]
    res.pop("extra_targets")
    for row in res["optimizers"].values():
        row.pop("extra_targets")
        for key in ("target", "adamw_target"):
            row[key].pop("reached_per_seed")
            row[key].pop("lost")
    path.write_text(json.dumps(summary))
    text = render(tmp_path / "old").read_text()
    assert "**PASS** | all-finite" in text and "**UNDECIDED**" not in text


def test_a_schedule_free_optimizer_runs_as_its_authors_run_it(tmp_path, monkeypatch):
    """Warm-up then a constant rate (its average replaces the decay), no weight EMA (x is an
    average already), and evaluations at x -- while every other optimizer keeps the cosine."""
    from guided_descent.experiments.bench import protocol

    seen = {}
    real_train = protocol.train

    def spy(model, opt, batch_loss, steps, **kwargs):
        seen[type(opt).__name__] = kwargs
        return real_train(model, opt, batch_loss, steps, **kwargs)

    monkeypatch.setattr(protocol, "train", spy)
    config = Config(task="digits-mlp", ci=True, seeds=1, warmup_steps=1, budget_steps=10,
                    eval_every=5)
    problem = config.workload.build(0, 10, 16, True, torch.device("cpu"))
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    for name in ("adamw", "schedulefree_adamw"):
        assert run_one(config, problem, name, 0, 1.0, metrics)["finite"]
    metrics.close()
    sf = seen.pop("AdamWScheduleFree")
    (other,) = seen.values()
    assert other["ema"] is not None and sf["ema"] is None
    tail = [sf["schedule"](t) for t in range(5, 10)]
    assert tail == [1.0] * 5  # constant after the warm-up
    assert other["schedule"](9) < 0.5  # the cosine decays
