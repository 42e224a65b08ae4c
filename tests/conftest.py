"""Test-wide settings: torch threads under xdist, and the Hypothesis profiles.

Hypothesis profiles (choose with ``HYPOTHESIS_PROFILE=NAME`` or ``--hypothesis-profile=NAME``):

* ``ci`` (the default, used by ``make test`` and CI): every run draws the same examples
  (``derandomize``), keeps no example database (so a failure found once on one machine is not
  replayed forever from a local ``.hypothesis/`` folder, and a run never depends on one), has no
  deadline and no "too slow" health check (timing on a shared 2-core machine is noise) and
  prints the blob that reproduces a failure with ``@reproduce_failure``.
* ``dev``: fresh random examples every run and the local example database, for exploring; a
  failure it finds is a real failure to fix, then to pin with ``@example``.

``--hypothesis-seed=N`` always means "draw from seed N": Hypothesis itself lets ``derandomize``
win over the seed, so under ``ci`` a given seed switches to the same profile without
``derandomize`` (see :func:`pytest_configure`). A test that some seed breaks is a failing test.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

# Under pytest-xdist each worker is its own process: one torch thread each keeps the 2-core CI
# machine from being oversubscribed. (torch is imported only then: the tests import it anyway,
# and test_hypothesis_profiles.py runs child pytests on this file that need no torch.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

# The built-in "ci" profile of Hypothesis is close to this; ours is spelled out so that it does
# not change with Hypothesis versions, and replaces it under the same name.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# "dev" derives from Hypothesis's built-in "default" profile, not from whatever is active now:
# with CI set in the environment Hypothesis has already loaded its own "ci" profile (no
# database), and a profile registered without a parent would inherit that.
settings.register_profile(
    "dev", parent=settings.get_profile("default"), deadline=None, print_blob=True
)
# Loaded here, at conftest import, because a test's own @settings(...) copies the active profile
# when its module is imported. --hypothesis-profile (applied later by Hypothesis's plugin) wins.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(trylast=True)  # after Hypothesis's own pytest_configure has applied its options
def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("hypothesis_seed", default=None)
    if seed is not None and settings.default.derandomize:
        name = f"{settings.get_current_profile_name()}-seeded"
        settings.register_profile(name, settings.default, derandomize=False, database=None)
        settings.load_profile(name)
