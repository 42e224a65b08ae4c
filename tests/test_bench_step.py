"""`guided-descent bench step`: the measurement pieces and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

import guided_descent as gd
from guided_descent.cli.main import main
from guided_descent.experiments.bench_step import ADAMW_FUSED, TORCH_MUON, Config, state_bytes
from guided_descent.tasks.gpt import GPT, GPT2_SMALL


def test_gpt2_small_layout_has_124m_parameters():
    with torch.device("meta"):
        assert GPT(GPT2_SMALL).num_parameters() == 124_475_904


def test_state_bytes_counts_each_storage_once():
    p = torch.nn.Parameter(torch.zeros(10, 10))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    # exp_avg + exp_avg_sq (400 B each) + the step counter (a 4-byte float32 scalar)
    assert state_bytes(opt) == 2 * 400 + 4


def test_config_refuses_optimizers_that_need_the_model():
    needs_model = [n for n, s in gd.optimizers().items() if s.needs_model]
    if not needs_model:
        pytest.skip("no model-aware optimizer registered")
    with pytest.raises(ValueError, match="needs forward passes"):
        Config(optimizers=(needs_model[0],))


def test_bench_step_quick_writes_table_figure_and_claims(tmp_path, capsys):
    names = [n for n in ("adamw", "lion", "muon", "shampoo", "soap") if n in gd.optimizers()]
    out = tmp_path / "bench"
    assert main(["bench", "step", "--quick", "--quiet", "--optimizers", ",".join(names),
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["results"]["optimizers"]
    assert ADAMW_FUSED in rows and set(names) <= set(rows)
    if "muon" in names and hasattr(torch.optim, "Muon"):
        assert TORCH_MUON in rows and rows["muon"]["speedup_vs_torch_muon"] > 0
    for row in rows.values():
        assert row["median_ms"] > 0 and row["mean_ms"] >= 0.5 * row["median_ms"]
        assert row["finite"]
    # Adam-type state is two fp32 buffers per parameter (+ step counters).
    assert 8.0 <= rows["adamw"]["state_bytes_per_param"] < 8.1
    assert all(c["passed"] for c in summary["claims"])
    report = (out / "report.md").read_text()
    assert "./step_time.png" in report and (out / "step_time.png").is_file()


def test_hyper_reaches_the_optimizer_and_its_matrix_state_bytes():
    from guided_descent.experiments.bench_step import SIZES, measure

    rows = []
    for hyper in ((), ("muon.state_dtype=bfloat16",)):
        config = Config(optimizers=("muon",), size="tiny", steps=1, warmup=1, hyper=hyper)
        rows.append(measure("muon", SIZES["tiny"], torch.device("cpu"), config, 0))
    # Muon's own state is one momentum per matrix entry: 4 bytes in float32, 2 in bfloat16; the
    # AdamW groups (embeddings, head, norms) keep theirs in float32 either way.
    assert [r["matrix_state_bytes"] / r["matrix_params"] for r in rows] == [4.0, 2.0]
    adamw = [r["state_bytes"] - r["matrix_state_bytes"] for r in rows]
    assert adamw[0] == adamw[1] > 0


@pytest.mark.parametrize(
    ("hyper", "match"),
    [
        (("muon.state_dtype=float16",), r"hyper: muon: state_dtype must be .* got torch.float16"),
        (("soap.lr=0.1",), "soap is not among the optimizers"),
        (("muon-lr=0.1",), "expected NAME.KEY=VALUE"),
    ],
)
def test_config_refuses_bad_hyper_entries(hyper, match):
    with pytest.raises(ValueError, match=match):
        Config(optimizers=("muon",), hyper=hyper)
