"""The contract suite and the model zoo, run on optimizers made schedule-free by schedule_free().

The wrapper is not a registry name, so the suites' own parametrization does not reach it.
Here ``gd.create`` is replaced, for the duration of each test, by one that wraps what the
registry builds; the suites' test functions then run unchanged on the wrapped optimizers.
(schedule_free() builds through the registry's own ``create``, which is not replaced.)
"""

from __future__ import annotations

import pytest
import test_contract as contract
import test_model_zoo as zoo
import torch

import guided_descent as gd
from guided_descent.optimizers.registry import create as registry_create
from guided_descent.optimizers.schedule_free import ScheduleFree, schedule_free

BASES = ["sgd", "adamw", "lion", "muon", "soap", "prodigy"]


@pytest.fixture
def wrapped(monkeypatch):
    def create(name, target, **hyperparams):
        return schedule_free(name, target, **hyperparams)

    monkeypatch.setattr(gd, "create", create)


CONTRACT = [
    contract.test_step_with_closure_equals_step_after_backward,
    contract.test_params_without_grad_are_left_alone,
    contract.test_zero_grads_leave_params_unchanged,
    contract.test_param_groups_keep_their_own_hyperparameters,
    contract.test_optimizer_is_deep_copyable_and_picklable_state,
    contract.test_unknown_hyperparameter_is_a_type_error_listing_accepted,
    contract.test_scheduler_stays_connected_after_loading_state_before_the_first_step,
]


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__.removeprefix("test_"))
@pytest.mark.parametrize("base", BASES)
def test_contract(wrapped, base, check):
    check(base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", BASES)
def test_contract_dtypes_and_state_dicts(wrapped, base, dtype):
    contract.test_state_dict_round_trip_continues_identically(base, dtype)
    contract.test_dtypes_and_ranks_stay_finite(base, dtype)


@pytest.mark.parametrize("base", BASES)
def test_contract_invalid_hyperparameters(wrapped, base):
    for key, bad in contract.BAD_VALUES:
        if key in gd.optimizers()[base].hyperparams:
            contract.test_invalid_hyperparameters_raise_naming_the_value(base, key, bad)


@pytest.mark.parametrize("base", BASES)
def test_wrapped_class_is_the_base_class(base):
    # Replaces the suite's torch-class check, which asserts the class *name* is torch's; ours is
    # ScheduleFree<Name>, an instance of the base's class all the same.
    plain = registry_create(base, contract.make_model())
    cls = type(plain)
    opt = schedule_free(plain)
    assert opt is plain and isinstance(opt, cls) and isinstance(opt, ScheduleFree)
    assert type(opt).__name__ == f"ScheduleFree{cls.__name__}"


ZOO_BASES = ["adamw", "muon", "soap", "prodigy"]


@pytest.mark.parametrize("case", list(zoo.CASES))
@pytest.mark.parametrize("base", ZOO_BASES)
def test_zoo_trains_deterministically_and_resumes_exactly(wrapped, monkeypatch, base, case):
    # At the base's defaults (not retuned: schedule-free usually wants a larger lr), the loss at
    # y after 60 steps is measured at 0.12-0.99 of the first batch's (the plain bases:
    # 0.07-0.95): the average x, which y leans on, still carries the early iterates. The zoo's
    # margin is relaxed to "the loss went down"; the parity tests check the arithmetic.
    monkeypatch.setattr(zoo, "MARGIN", 1.0)
    monkeypatch.setattr(zoo, "SLOW", {})
    zoo.test_training_at_the_defaults_lowers_the_loss(case, base)
    zoo.test_a_step_is_deterministic(case, base)
    zoo.test_resuming_from_a_state_dict_is_exact(case, base)


@pytest.mark.parametrize("case", [c for c in zoo.CASES if not zoo.CASES[c].batch_norm])
@pytest.mark.parametrize("base", ["adamw", "muon"])
def test_zoo_accumulated_micro_batches(wrapped, base, case):
    zoo.test_two_accumulated_micro_batches_give_the_whole_batch_step(case, base)
