"""The ledger must equal the closed-form accounting for what was recorded, survive a JSON round
trip, and never lose steps on resume."""

import json

import pytest
from PIL import Image

from dpdiff.errors import PrivacyError
from dpdiff.privacy.accounting import epsilon_for, epsilon_of_history, plan
from dpdiff.privacy.ledger import PrivacyLedger, plot_epsilon_curve

SIGMA, Q, DELTA = 1.1, 0.01, 1e-5


def test_empty_ledger():
    ledger = PrivacyLedger(DELTA)
    assert ledger.steps == 0
    assert ledger.epsilon() == 0.0
    assert ledger.history == []
    ledger.record(SIGMA, Q, steps=0)
    assert ledger.steps == 0 and ledger.epsilon() == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_ledger_equals_epsilon_for_after_steps(accountant):
    ledger = PrivacyLedger(DELTA, accountant)
    for _ in range(250):
        ledger.record(SIGMA, Q)
    assert ledger.steps == 250
    assert ledger.history == [(SIGMA, Q, 250)]  # consecutive identical steps merged
    assert ledger.epsilon() == epsilon_for(SIGMA, Q, 250, DELTA, accountant)
    assert ledger.epsilon(delta=1e-7) == epsilon_for(SIGMA, Q, 250, 1e-7, accountant)


def test_changing_noise_composes_heterogeneously():
    ledger = PrivacyLedger(DELTA)
    ledger.record(2.0, Q, 100)
    ledger.record(0.8, Q, 100)
    ledger.record(0.8, Q, 50)
    assert ledger.history == [(2.0, Q, 100), (0.8, Q, 150)]
    eps = ledger.epsilon()
    assert eps == epsilon_of_history([(2.0, Q, 100), (0.8, Q, 150)], DELTA)
    assert epsilon_for(2.0, Q, 250, DELTA) < eps < epsilon_for(0.8, Q, 250, DELTA)


def test_state_dict_round_trip_then_more_steps_equals_uninterrupted():
    uninterrupted = PrivacyLedger(DELTA)
    uninterrupted.record(SIGMA, Q, 1000)

    first = PrivacyLedger(DELTA)
    first.record(SIGMA, Q, 300)
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds

    resumed = PrivacyLedger(DELTA)
    resumed.load_state_dict(saved)
    assert resumed.steps == 300  # continues, not from zero
    assert resumed.epsilon() == first.epsilon() > 0
    for _ in range(700):
        resumed.record(SIGMA, Q)
    assert resumed.history == uninterrupted.history
    assert resumed.epsilon() == uninterrupted.epsilon()
    assert PrivacyLedger.from_state_dict(saved).epsilon() == first.epsilon()


def test_load_refuses_to_drop_recorded_steps():
    saved = PrivacyLedger(DELTA)
    saved.record(SIGMA, Q, 10)
    ledger = PrivacyLedger(DELTA)
    ledger.record(SIGMA, Q, 5)
    with pytest.raises(PrivacyError, match="already records 5 steps"):
        ledger.load_state_dict(saved.state_dict())
    assert ledger.history == [(SIGMA, Q, 5)]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(delta=1e-6), "delta"),
        (dict(accountant="rdp"), "accountant"),
        (dict(accountant="gdp"), "under-reports"),
        (dict(history=[[SIGMA, Q, 3], [SIGMA, 0.0, 3]]), "sample_rate"),
        (dict(history=[[SIGMA, Q]]), "list of"),
        (dict(version=99), "version"),
    ],
)
def test_load_refuses_inconsistent_state(change, match):
    state = PrivacyLedger(DELTA).state_dict()
    state.update(change)
    ledger = PrivacyLedger(DELTA)
    with pytest.raises(PrivacyError, match=match):
        ledger.load_state_dict(state)
    assert ledger.steps == 0  # nothing half-loaded


@pytest.mark.parametrize("sigma, q, steps", [(-1.0, Q, 1), (SIGMA, 0.0, 1), (SIGMA, 1.2, 1), (SIGMA, Q, -2), (SIGMA, Q, 1.5)])
def test_record_refuses_bad_steps(sigma, q, steps):
    with pytest.raises(PrivacyError):
        PrivacyLedger(DELTA).record(sigma, q, steps)


def test_ledger_refuses_bad_delta_and_accountant():
    with pytest.raises(PrivacyError):
        PrivacyLedger(0.0)
    with pytest.raises(PrivacyError):
        PrivacyLedger(DELTA, "gdp")


def test_to_dict_and_from_plan():
    p = plan(2.0, DELTA, 10_000, 100, max_steps=200)
    ledger = PrivacyLedger.from_plan(p)
    summary = ledger.to_dict()
    assert summary["steps"] == 200
    assert summary["epsilon"] == p.epsilon <= 2.0
    assert summary["noise_multiplier"] == p.noise_multiplier
    assert summary["sample_rate"] == 0.01
    assert summary["delta"] == DELTA and summary["accountant"] == "prv"
    json.dumps(summary)


def test_optimizer_hook_records_real_opacus_steps():
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = GradSampleModule(torch.nn.Linear(3, 1))
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=1.0, expected_batch_size=4
    )
    ledger = PrivacyLedger(DELTA)
    optimizer.attach_step_hook(ledger.optimizer_hook(sample_rate=0.04))
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        optimizer.step()
    assert ledger.history == [(1.3, 0.04, 3)]


def test_epsilon_curve_and_plot(tmp_path):
    ledger = PrivacyLedger(DELTA, "rdp")
    ledger.record(SIGMA, Q, 400)
    steps, eps = ledger.epsilon_curve(num_points=8)
    assert steps[0] == 0 and steps[-1] == 400 and eps[0] == 0.0
    assert eps == sorted(eps) and eps[-1] == ledger.epsilon()
    assert eps[len(eps) // 2] == epsilon_for(SIGMA, Q, steps[len(eps) // 2], DELTA, "rdp")

    out = plot_epsilon_curve(ledger, tmp_path / "eps.png", num_points=8)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 100
    params = dict(noise_multiplier=SIGMA, sample_rate=Q, steps=400, delta=DELTA, accountant="rdp")
    assert plot_epsilon_curve(params, tmp_path / "params.png", num_points=4).endswith("params.png")
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(PrivacyError, match="lack"):
        plot_epsilon_curve({"noise_multiplier": 1.0}, tmp_path / "bad.png")


def test_epsilon_after_bounds_the_steps_between_accountant_calls():
    """The progress bar calls the accountant every `every` steps; in between it shows the epsilon of the
    next call's step, which is never below what the steps before it have spent (and exact at the calls)."""
    from types import SimpleNamespace

    from dpdiff.training.loop import _epsilon_bound

    ledger = PrivacyLedger(DELTA, "rdp")
    ledger.record(SIGMA, Q, 3)
    assert ledger.epsilon_after(4, SIGMA, Q) == epsilon_for(SIGMA, Q, 7, DELTA, "rdp")
    assert ledger.steps == 3 and ledger.history == [(SIGMA, Q, 3)]  # nothing recorded
    with pytest.raises(PrivacyError):
        ledger.epsilon_after(-1, SIGMA, Q)
    run = SimpleNamespace(steps=11, noise_multiplier=SIGMA, sample_rate=Q)
    walk = PrivacyLedger(DELTA, "rdp")
    bound = _epsilon_bound(walk, run, 0, 4)  # what the loop computes before its first step
    assert bound == epsilon_for(SIGMA, Q, 4, DELTA, "rdp")
    for done in range(1, run.steps + 1):  # the loop of dpdiff.training.loop._train, every = 4
        walk.record(SIGMA, Q)
        if done % 4 == 0 or done == run.steps:
            bound = _epsilon_bound(walk, run, done, 4)
            assert bound == epsilon_for(SIGMA, Q, min(done + 4 - done % 4, 11), DELTA, "rdp")
        else:
            assert bound >= walk.epsilon() > 0.0  # shown between calls: never below the spent
    assert bound == walk.epsilon()  # at the end the bound is the spent epsilon itself
