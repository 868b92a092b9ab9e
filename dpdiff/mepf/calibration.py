"""Noise calibration for DP-MEPF's one-shot releases (exact, no subsampling, no iterations).

Every DP-MEPF release is a Gaussian mechanism: value + N(0, s_i^2 I) with L2 sensitivity Delta_i.
Releasing several of them on the same data is, exactly, ONE Gaussian mechanism whose
sensitivity/std ratio is mu = sqrt(sum_i (Delta_i / s_i)^2) (stack the outputs, whiten each block).
Its exact (epsilon, delta) curve is Balle & Wang's analytic Gaussian mechanism (ICML 2018):

    delta(epsilon) = Phi(mu/2 - epsilon/mu) - e^epsilon * Phi(-mu/2 - epsilon/mu)

so calibrating all releases together reduces to finding the largest mu with delta(target epsilon)
<= target delta. We use one noise multiplier sigma for all releases: s_i = sigma * scale_i * Delta_i
(scale_i = 1 unless a release asks for relatively more or less noise), hence
mu = sqrt(sum_i scale_i^-2) / sigma.

Rounding always goes the safe way: mu is rounded down (more noise), epsilon up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy.special import log_ndtr

from dpdiff.errors import PrivacyError

ACCOUNTANT_NAME = "analytic_gaussian"
MAX_NOISE_MULTIPLIER = 1e4  # beyond this the released embedding is pure noise
_BISECTION_STEPS = 200


@dataclass(frozen=True)
class GaussianRelease:
    """One released quantity: its L2 sensitivity under the neighbouring relation, and the factor by
    which its noise std differs from `noise_multiplier * sensitivity` (1 = the common multiplier)."""

    name: str
    sensitivity: float
    noise_scale: float = 1.0

    def __post_init__(self):
        if not (self.sensitivity > 0 and math.isfinite(self.sensitivity)):
            raise PrivacyError(f"release {self.name!r}: sensitivity must be finite and > 0, got {self.sensitivity}")
        if not (self.noise_scale > 0 and math.isfinite(self.noise_scale)):
            raise PrivacyError(f"release {self.name!r}: noise_scale must be finite and > 0, got {self.noise_scale}")

    def noise_std(self, noise_multiplier: float) -> float:
        return noise_multiplier * self.noise_scale * self.sensitivity

    def to_dict(self) -> dict:
        return asdict(self)


def gaussian_delta(mu: float, epsilon: float) -> float:
    """Exact delta(epsilon) of a Gaussian mechanism with sensitivity/std ratio `mu` (Balle & Wang 2018)."""
    if mu <= 0:
        return 0.0
    if epsilon < 0:
        raise PrivacyError(f"epsilon must be >= 0, got {epsilon}")
    a = mu / 2.0 - epsilon / mu
    b = -mu / 2.0 - epsilon / mu
    # log-space keeps e^eps * Phi(b) finite for large epsilon
    value = math.exp(float(log_ndtr(a))) - math.exp(epsilon + float(log_ndtr(b)))
    return max(value, 0.0)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon (rounded up) with delta(epsilon) <= `delta` for ratio `mu`."""
    _check_delta(delta)
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise PrivacyError(f"epsilon for mu={mu:g}, delta={delta:g} exceeds 1e6: no meaningful guarantee")
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return hi  # delta(hi) <= delta holds for the returned value


def gaussian_mu(epsilon: float, delta: float) -> float:
    """Largest ratio mu (rounded down) with delta(mu, epsilon) <= `delta`; delta grows with mu."""
    _check_delta(delta)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise PrivacyError(f"target epsilon must be a finite number > 0, got {epsilon!r}")
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, epsilon) <= delta:
        lo, hi = hi, hi * 2.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, epsilon) <= delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    if lo <= 0:
        raise PrivacyError(f"no Gaussian mechanism reaches epsilon={epsilon:g}, delta={delta:g}")
    return lo


def composed_mu(releases: Sequence[GaussianRelease], noise_multiplier: float) -> float:
    """mu of all `releases` together, each with noise std `noise_multiplier * scale * sensitivity`."""
    _check_releases(releases)
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise PrivacyError(f"noise multiplier must be finite and > 0, got {noise_multiplier}")
    return math.sqrt(sum((r.sensitivity / r.noise_std(noise_multiplier)) ** 2 for r in releases))


def epsilon_for_releases(releases: Sequence[GaussianRelease], noise_multiplier: float, delta: float) -> float:
    """The (epsilon, delta) guarantee of all releases together: epsilon, rounded up."""
    return gaussian_epsilon(composed_mu(releases, noise_multiplier), delta)


def noise_multiplier_for_releases(releases: Sequence[GaussianRelease], target_epsilon: float, delta: float) -> float:
    """The common noise multiplier that makes all `releases` together (target_epsilon, delta)-DP."""
    _check_releases(releases)
    mu = gaussian_mu(target_epsilon, delta)
    sigma = math.sqrt(sum(r.noise_scale ** -2 for r in releases)) / mu
    if sigma > MAX_NOISE_MULTIPLIER:
        raise PrivacyError(
            f"target epsilon={target_epsilon:g} at delta={delta:g} needs noise multiplier {sigma:.3g} for "
            f"{len(releases)} releases: the embedding would be pure noise. Raise the target epsilon."
        )
    # guard against rounding in the square root: the result must meet the target
    while epsilon_for_releases(releases, sigma, delta) > target_epsilon:
        sigma *= 1.0 + 1e-9
    return sigma


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise PrivacyError(f"delta must lie in (0, 1), got {delta!r}")


def _check_releases(releases: Sequence[GaussianRelease]) -> None:
    if not releases:
        raise PrivacyError("nothing to release: at least one Gaussian release is needed")
    names = [r.name for r in releases]
    if len(set(names)) != len(names):
        raise PrivacyError(f"release names must be distinct, got {names}")
