"""tests/conftest.py's Hypothesis profiles, run on a probe test in a child pytest.

The probe records the examples Hypothesis draws. Under "ci" (the default) two runs draw the same
ones and nothing is stored; an explicit --hypothesis-seed still changes them; "dev" keeps its
example database. (HYPOTHESIS_PROFILE=dev selects "dev" the same way: conftest.py reads it.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = '''
import json, os
from hypothesis import given, settings, strategies as st

drawn = []

@settings(max_examples=5)
@given(st.integers(0, 10**9))
def test_draw(x):
    drawn.append(x)

def test_zz_dump():
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump({"drawn": drawn, "profile": settings.get_current_profile_name(),
                   "database": repr(settings.default.database)}, f)
'''


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    return tmp_path


def run_probe(where: Path, *args: str, ci: bool = False) -> dict:
    out = where / "out.json"
    # A clean child: no profile chosen, and not mistaken for an xdist worker of ours.
    env = {k: v for k, v in os.environ.items()
           if k != "HYPOTHESIS_PROFILE" and not k.startswith("PYTEST_")}
    env.pop("CI", None)  # Hypothesis loads its own "ci" profile when CI is set; see below
    if ci:
        env["CI"] = "true"
    env["PROBE_OUT"] = str(out)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "--rootdir", str(where), str(where), *args]
    res = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(out.read_text())


def test_ci_by_default_a_seed_when_given_dev_on_request(probe_dir):
    # One test, five child pytest runs (about a second each).
    first, second = run_probe(probe_dir), run_probe(probe_dir)
    assert first["profile"] == "ci" and first["database"] == "None"
    assert first["drawn"] == second["drawn"]
    assert not (probe_dir / ".hypothesis" / "examples").exists()  # nothing stored

    one = run_probe(probe_dir, "--hypothesis-seed=1")
    two = run_probe(probe_dir, "--hypothesis-seed=2")
    assert one["profile"] == "ci-seeded" and one["database"] == "None"
    assert one["drawn"] != two["drawn"] and first["drawn"] not in (one["drawn"], two["drawn"])

    dev = run_probe(probe_dir, "--hypothesis-profile=dev")
    assert dev["profile"] == "dev" and "DirectoryBasedExampleDatabase" in dev["database"]
    # On a CI machine (CI set) as well: "dev" must not inherit Hypothesis's own CI profile.
    dev_on_ci = run_probe(probe_dir, "--hypothesis-profile=dev", ci=True)
    assert dev_on_ci["profile"] == "dev"
    assert "DirectoryBasedExampleDatabase" in dev_on_ci["database"]
    on_ci = run_probe(probe_dir, ci=True)
    assert on_ci["profile"] == "ci" and on_ci["drawn"] == first["drawn"]
