"""Claims are PASS, FAIL or UNDECIDED with a reason; files of the first schema still read."""

from __future__ import annotations

import json
import math

import pytest

from guided_descent.experiments.records import (
    FAIL,
    PASS,
    UNDECIDED,
    Claim,
    Outcome,
    RunDir,
    claim_reason,
    claim_verdict,
    require_seeds,
)
from guided_descent.report.markdown import claims_line, claims_table


def test_comparison_verdicts_and_reasons():
    assert Claim("a", "s", 0.5, "<", 1.0).verdict == PASS
    assert Claim("a", "s", 1.0, "<", 1.0).verdict == FAIL
    assert Claim("a", "s", 2.0, "within", [1, 3]).verdict == PASS
    c = Claim("a", "s", 1.5, "<=", 1.0)
    assert c.verdict == FAIL and not c.passed and "does not hold" in c.reason


@pytest.mark.parametrize("value", [None, math.nan])
def test_a_missing_value_is_undecided_never_pass_or_fail(value):
    c = Claim("a", "s", value, ">=", 0.0)
    assert c.verdict == UNDECIDED and not c.passed
    assert "no value" in c.reason


def test_an_outcome_overrides_the_comparison_but_cannot_pass_without_a_value():
    c = Claim("r", "s", 0.5, "<", 1.0, Outcome.undecided("nobody reached the target"))
    assert c.verdict == UNDECIDED and c.reason == "nobody reached the target"
    with pytest.raises(ValueError, match="cannot PASS without a value"):
        Claim("r", "s", None, "<", 1.0, Outcome(PASS, "trust me"))
    with pytest.raises(ValueError, match="verdict must be one of"):
        Outcome("MAYBE", "x")
    with pytest.raises(ValueError, match="needs a reason"):
        Outcome(UNDECIDED, "")


def test_require_seeds_makes_one_seed_claims_undecided_except_exempt_ones():
    claims = [Claim("speed", "s", 0.5, "<", 1.0), Claim("identity", "s", 1e-12, "<=", 1e-8)]
    out = require_seeds(claims, seeds=1, exempt=("identity",))
    assert [c.verdict for c in out] == [UNDECIDED, PASS]
    assert "1 seed(s)" in out[0].reason
    assert require_seeds(claims, seeds=2) == claims


def test_summary_holds_the_new_schema_and_old_files_still_read(tmp_path):
    run = RunDir.create(tmp_path / "r")
    run.write_summary({}, [Claim("a", "s", None, "<", 1.0), Claim("b", "s", 0.1, "<", 1.0)])
    claims = json.loads((tmp_path / "r" / "summary.json").read_text())["claims"]
    assert claims[0]["verdict"] == UNDECIDED and claims[0]["passed"] is False
    assert claims[0]["reason"]
    assert claims[1]["verdict"] == PASS and claims[1]["passed"] is True
    # A file of the first schema: name, statement, value, op, threshold, passed.
    old = [{"name": "x", "statement": "s", "value": 2.0, "op": "<", "threshold": 1.0,
            "passed": False},
           {"name": "y", "statement": "s", "value": 0.5, "op": "<", "threshold": 1.0,
            "passed": True}]
    assert [claim_verdict(c) for c in old] == [FAIL, PASS]
    assert claim_reason(old[0]) == ""
    assert "**FAIL**" in claims_table(old) and "**PASS**" in claims_table(old)
    assert claims_line(old) == "1 of 2 claims pass, 1 fails."
    assert claims_line(claims) == "1 of 2 claims pass, 1 undecided."
    assert "**UNDECIDED**" in claims_table(claims)
