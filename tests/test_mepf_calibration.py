"""DP-MEPF noise calibration against the closed form and an independent accountant (Google's PLD)."""

import math

import pytest
from dp_accounting.pld import privacy_loss_distribution as pld
from scipy.stats import norm

from dpdiff.errors import PrivacyError
from dpdiff.mepf.calibration import (
    GaussianRelease,
    composed_mu,
    epsilon_for_releases,
    gaussian_delta,
    gaussian_epsilon,
    gaussian_mu,
    noise_multiplier_for_releases,
)
from dpdiff.mepf.embedding import EmbeddingConfig
from dpdiff.mepf.release import planned_releases

# dp_accounting's PLD is a pessimistic discretisation (interval 1e-4): it may only be slightly larger.
PLD_REL_TOL = 2e-3


def pld_epsilon(noise_std: float, sensitivity: float, delta: float) -> float:
    dist = pld.from_gaussian_mechanism(standard_deviation=noise_std, sensitivity=sensitivity, value_discretization_interval=1e-4)
    return dist.get_epsilon_for_delta(delta)


def test_closed_form_matches_scipy_formula():
    for mu, eps in [(0.5, 0.1), (1.0, 1.0), (2.0, 3.0), (5.0, 10.0)]:
        expected = norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu)
        assert gaussian_delta(mu, eps) == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("target_epsilon", [0.5, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_single_release_sigma_matches_closed_form_and_pld(target_epsilon, delta):
    release = [GaussianRelease("sum1", sensitivity=1.0)]
    sigma = noise_multiplier_for_releases(release, target_epsilon, delta)
    # the closed form at the calibrated sigma meets the target, and barely (tight)
    assert gaussian_delta(1.0 / sigma, target_epsilon) <= delta
    assert gaussian_delta(1.0 / (sigma * (1 - 1e-6)), target_epsilon) > delta * (1 - 1e-3)
    independent = pld_epsilon(sigma, 1.0, delta)
    assert independent >= target_epsilon * (1 - 1e-6)  # PLD is pessimistic: never below the exact value
    assert independent == pytest.approx(target_epsilon, rel=PLD_REL_TOL)


def test_composition_equals_one_gaussian_with_combined_ratio():
    config = EmbeddingConfig(max_norm=2.0, moments=2)
    releases = planned_releases(config, with_validation=True)
    assert [r.name for r in releases] == ["sum1", "sum2", "counts", "val_sum1", "val_sum2", "val_counts"]
    assert {r.name: r.sensitivity for r in releases} == {
        "sum1": 2.0, "sum2": 4.0, "counts": 1.0, "val_sum1": 2.0, "val_sum2": 4.0, "val_counts": 1.0
    }
    sigma = noise_multiplier_for_releases(releases, 10.0, 1e-5)
    # six releases at the same multiplier = one Gaussian with ratio sqrt(6)/sigma
    assert composed_mu(releases, sigma) == pytest.approx(math.sqrt(6) / sigma, rel=1e-12)
    assert epsilon_for_releases(releases, sigma, 1e-5) <= 10.0
    assert pld_epsilon(sigma / math.sqrt(6), 1.0, 1e-5) == pytest.approx(10.0, rel=PLD_REL_TOL)
    # and the composed PLD of the six separate mechanisms agrees
    composed = pld.from_gaussian_mechanism(standard_deviation=sigma * 2.0, sensitivity=2.0, value_discretization_interval=1e-4)
    for r in releases[1:]:
        composed = composed.compose(
            pld.from_gaussian_mechanism(standard_deviation=r.noise_std(sigma), sensitivity=r.sensitivity, value_discretization_interval=1e-4)
        )
    assert composed.get_epsilon_for_delta(1e-5) == pytest.approx(10.0, rel=5 * PLD_REL_TOL)
    # more releases need more noise for the same target
    assert sigma > noise_multiplier_for_releases(releases[:3], 10.0, 1e-5)


def test_noise_scale_per_release():
    releases = [GaussianRelease("sum1", 1.0), GaussianRelease("counts", 1.0, noise_scale=2.0)]
    sigma = noise_multiplier_for_releases(releases, 2.0, 1e-5)
    mu = gaussian_mu(2.0, 1e-5)
    assert sigma == pytest.approx(math.sqrt(1 + 0.25) / mu, rel=1e-8)
    assert releases[1].noise_std(sigma) == pytest.approx(2 * sigma)


def test_epsilon_and_mu_are_inverse_and_rounded_safely():
    for eps in (0.3, 1.0, 8.0):
        mu = gaussian_mu(eps, 1e-5)
        assert gaussian_delta(mu, eps) <= 1e-5
        back = gaussian_epsilon(mu, 1e-5)
        assert back >= eps - 1e-9 and back == pytest.approx(eps, rel=1e-8)


def test_bad_requests_are_refused():
    with pytest.raises(PrivacyError):
        noise_multiplier_for_releases([GaussianRelease("sum1", 1.0)], 0.0, 1e-5)
    with pytest.raises(PrivacyError):
        noise_multiplier_for_releases([GaussianRelease("sum1", 1.0)], 1.0, 1.5)
    with pytest.raises(PrivacyError):
        noise_multiplier_for_releases([], 1.0, 1e-5)
    with pytest.raises(PrivacyError):
        GaussianRelease("sum1", 0.0)
    with pytest.raises(PrivacyError, match="pure noise"):
        noise_multiplier_for_releases([GaussianRelease("sum1", 1.0)], 1e-6, 1e-5)
