"""Accounting: cross-checked against Google's dp_accounting PLD accountant, an independent
implementation. Tolerances (stated here, explained in docs/privacy.md):

- PRV (Opacus, eps_error=0.01) reports the UPPER end of its error interval, so it must never be
  below PLD by more than PLD's own discretisation slack (1e-3), and is at most
  2 * eps_error + 1% above it.
- RDP is a looser upper bound: it must never be below PLD.
"""

import math
import warnings

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.privacy.accounting import (
    PRV_EPS_ERROR,
    SIGMA_RTOL,
    check_delta,
    check_epsilon,
    epsilon_for,
    epsilon_for_gaussian,
    epsilon_of_history,
    noise_multiplier_for,
    noise_multiplier_for_gaussian,
    plan,
    steps_for,
    validate_accountant,
)

PLD_SLACK = 1e-3


def pld_epsilon(sigma, q, steps, delta, discretization=1e-4):
    """dp_accounting's PLD epsilon (its pessimistic estimate: an upper bound that tightens as the
    discretization interval shrinks; 1e-3 is within 2e-4 of 1e-4 for the sigma=0.6 cases, 10x faster)."""
    accountant = pld_privacy_accountant.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=discretization
    )
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def test_design_figures_reproduced():
    q, sigma, steps, delta = 256 / 60000, 1.0, 1000, 1e-5
    assert epsilon_for(sigma, q, steps, delta, "rdp") == pytest.approx(1.098, abs=1e-3)
    assert epsilon_for(sigma, q, steps, delta, "prv") == pytest.approx(0.738, abs=1e-3)
    assert pld_epsilon(sigma, q, steps, delta) == pytest.approx(0.728, abs=1e-3)


@pytest.mark.parametrize("steps", [100, 1000])
@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.0])
@pytest.mark.parametrize("q", [0.001, 0.01, 0.1])
def test_prv_and_rdp_against_independent_pld(q, sigma, steps):
    delta = 1e-5
    # the fine grid for small epsilons (a coarse one over-states them), the coarse one where
    # epsilon is large and the fine grid slow
    reference = pld_epsilon(sigma, q, steps, delta, discretization=1e-3 if sigma < 1 else 1e-4)
    prv = epsilon_for(sigma, q, steps, delta, "prv")
    rdp = epsilon_for(sigma, q, steps, delta, "rdp")
    assert prv >= reference - PLD_SLACK, "PRV reported an epsilon below the tight value"
    assert prv <= reference + 2 * PRV_EPS_ERROR + 0.01 * reference
    assert rdp >= reference - PLD_SLACK


def test_heterogeneous_history_against_pld():
    # a run whose noise changed half-way: composition of two different mechanisms
    history = [(1.2, 0.02, 300), (0.9, 0.01, 500)]
    delta = 1e-6
    acc = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    reference = acc.get_epsilon(delta)
    prv = epsilon_of_history(history, delta, "prv")
    assert reference - PLD_SLACK <= prv <= reference + 2 * PRV_EPS_ERROR + 0.01 * reference
    assert epsilon_of_history(history, delta, "rdp") >= reference


@pytest.mark.parametrize("sigma, releases", [(1.0, 1), (5.0, 1), (2.0, 3)])
def test_gaussian_mechanism_against_pld(sigma, releases):
    # what DP-MEPF releases: q = 1, no subsampling
    acc = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(sigma), releases)
    reference = acc.get_epsilon(1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy noise from the q = 1 corner
        prv = epsilon_for_gaussian(sigma, 1e-5, releases)
    assert reference - PLD_SLACK <= prv <= reference + 2 * PRV_EPS_ERROR + 0.01 * reference
    assert epsilon_for_gaussian(sigma, 1e-5, releases, "rdp") >= reference
    chosen = noise_multiplier_for_gaussian(prv, 1e-5, releases)
    assert epsilon_for_gaussian(chosen, 1e-5, releases) <= prv and chosen <= sigma * (1 + 2e-3)


def test_epsilon_trivial_cases_and_monotonicity():
    assert epsilon_for(1.0, 0.01, 0, 1e-5) == 0.0
    assert math.isinf(epsilon_for(0.0, 0.01, 10, 1e-5))
    base = epsilon_for(1.0, 0.01, 500, 1e-5)
    assert epsilon_for(1.5, 0.01, 500, 1e-5) < base  # more noise
    assert epsilon_for(1.0, 0.01, 1000, 1e-5) > base  # more steps
    assert epsilon_for(1.0, 0.02, 500, 1e-5) > base  # larger sample rate
    assert epsilon_for(1.0, 0.01, 500, 1e-7) > base  # smaller delta


@pytest.mark.parametrize(
    "sigma, q, steps, delta",
    [(-1.0, 0.01, 10, 1e-5), (1.0, 0.0, 10, 1e-5), (1.0, 1.5, 10, 1e-5), (1.0, 0.01, -3, 1e-5),
     (1.0, 0.01, 2.5, 1e-5), (float("nan"), 0.01, 10, 1e-5), (1.0, 0.01, 10, 0.0), (1.0, 0.01, 10, 1.0)],
)
def test_epsilon_for_rejects_bad_parameters(sigma, q, steps, delta):
    with pytest.raises(PrivacyError):
        epsilon_for(sigma, q, steps, delta)


def test_accountant_names():
    assert validate_accountant("PRV") == "prv"
    with pytest.raises(PrivacyError, match="under-reports"):
        validate_accountant("gdp")
    with pytest.raises(ConfigError, match="prv, rdp"):
        validate_accountant("moments")


@pytest.mark.parametrize(
    "target, q, steps, accountant",
    [(1.0, 256 / 60000, 1000, "prv"), (4.0, 0.01, 1000, "prv"), (0.5, 0.02, 300, "rdp"), (3.0, 0.004, 5000, "rdp")],
)
def test_noise_multiplier_for_inverts_epsilon_for(target, q, steps, accountant):
    delta = 1e-5
    sigma = noise_multiplier_for(target, q, steps, delta, accountant)
    reached = epsilon_for(sigma, q, steps, delta, accountant)
    assert reached <= target  # re-evaluated with the same accountant: never over budget
    # and not wastefully noisy: either epsilon is within 0.1% of the target, or a sigma just
    # below the returned one (beyond the search tolerance) would exceed the target
    assert reached >= 0.999 * target or epsilon_for(sigma / (1 + 1.1 * SIGMA_RTOL), q, steps, delta, accountant) > target


def test_noise_multiplier_for_refuses_unreachable_target():
    with pytest.raises(PrivacyError, match="cannot be reached"):
        noise_multiplier_for(1e-4, 0.01, 1000, 1e-5)


def test_check_delta():
    assert check_delta(1e-5, 60000) == 1e-5
    assert check_delta(0.999 / 500, 500) == 0.999 / 500
    with pytest.raises(PrivacyError, match=r"delta=0.002 >= 1/n=1/500.*Choose delta < 1/n, e.g. 1e-05"):
        check_delta(1 / 500, 500)  # exactly 1/n is refused
    with pytest.raises(PrivacyError, match="1/n=1/10000000.*e.g. 1e-08"):
        check_delta(1e-5, 10_000_000)
    for bad in (0.0, 1.0, -1e-5, float("nan"), float("inf")):
        with pytest.raises(PrivacyError, match=r"\(0, 1\)"):
            check_delta(bad, 100)
    with pytest.warns(UserWarning, match="forced"):
        assert check_delta(0.01, 500, force=True) == 0.01
    with pytest.raises(PrivacyError):
        check_delta(1.5, 500, force=True)  # force never admits a delta outside (0, 1)


def test_check_epsilon():
    for bad in (float("nan"), float("inf"), 0.0, -1.0, "1.0"):
        with pytest.raises(PrivacyError):
            check_epsilon(bad)
    assert check_epsilon(2.0, 0.01, 100, 1e-5) == 2.0
    with pytest.raises(PrivacyError, match="even noise multiplier 1000"):
        check_epsilon(0.005, 0.01, 100, 1e-5)


def test_steps_for():
    assert steps_for(0.1, epochs=2) == 20  # not 21 from float noise
    assert steps_for(256 / 60000, epochs=1) == 235
    assert steps_for(0.5, max_steps=7) == 7
    with pytest.raises(ConfigError, match="exactly one"):
        steps_for(0.1, epochs=1, max_steps=10)
    with pytest.raises(ConfigError, match="exactly one"):
        steps_for(0.1)
    with pytest.raises(ConfigError):
        steps_for(0.1, epochs=float("nan"))


def test_plan_reaches_target_and_is_consistent():
    p = plan(1.0, 1e-5, 60000, 256, epochs=10)
    assert p.sample_rate == 256 / 60000
    assert p.steps == 2344
    assert p.epsilon <= 1.0
    assert p.epsilon == epsilon_for(p.noise_multiplier, p.sample_rate, p.steps, p.delta, p.accountant)
    assert p.to_dict()["noise_multiplier"] == p.noise_multiplier
    q = plan(1.0, 1e-5, 60000, 256, max_steps=500, accountant="rdp")
    assert q.steps == 500 and q.accountant == "rdp" and q.epsilon <= 1.0
    assert q.noise_multiplier < p.noise_multiplier  # fewer steps need less noise


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_examples=100, batch_size=200, epochs=1), ConfigError, "batch_size=200 > num_examples=100"),
        (dict(num_examples=100, batch_size=10), ConfigError, "exactly one"),
        (dict(num_examples=100, batch_size=10, epochs=1, max_steps=5), ConfigError, "exactly one"),
        (dict(num_examples=100, batch_size=0, epochs=1), PrivacyError, "batch_size must be >= 1"),
        (dict(num_examples=100, batch_size=10, epochs=1, delta=0.01), PrivacyError, "1/n=1/100"),
        (dict(num_examples=100, batch_size=10, epochs=1, target_epsilon=float("inf")), PrivacyError, "finite"),
    ],
)
def test_plan_refuses_bad_input(kwargs, error, match):
    args = dict(target_epsilon=1.0, delta=1e-5)
    args.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(error, match=match):
            plan(**args)
