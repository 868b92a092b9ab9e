"""How many trials a search runs: a PUBLIC distribution, a SECRET draw.

Repeat-and-select (Papernot & Steinke 2022) is private only because the number of trials K is random and
unknown to the adversary: a fixed K, or a K anyone can reconstruct (a seed in a log), falls back to plain
composition. So K is drawn from the OS CSPRNG (like secure mode's noise) and kept in the search's private state
folder (mode 0700), never printed or published; a resumed search reads it back instead of redrawing (a redraw
would be a second, differently distributed draw: the accounting assumes one).

Distributions, with dp-accounting's `shape`:
    poisson      K ~ Poisson(mean), K = 0 possible (then no model comes out)     shape inf
    geometric    P(K = k) = g (1 - g)^(k - 1), k >= 1                            shape 1
    logarithmic  P(K = k) ~ (1 - g)^k / k, k >= 1 (truncated neg. binomial, 0)    shape 0
g is chosen from the mean with dp-accounting's own map, so the accountant and the sampler agree.
    fixed        K = mean exactly, PUBLIC; every trial composed (no repeat-and-select): with few trials
                 and a small epsilon this costs less (docs/privacy.md has the numbers), and nothing is secret
"""

from __future__ import annotations

import math

from dpdiff.errors import ConfigError
from dpdiff.privacy.secure_random import secure_uniform

DISTRIBUTIONS = {"poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0, "fixed": None}
MAX_MEAN = 1000.0
_MAX_DRAW = 10**7


def check_distribution(name, mean) -> tuple[str, float, float]:
    """(name, shape, mean) or one clear error."""
    key = str(name).strip().lower()
    if key not in DISTRIBUTIONS:
        raise ConfigError(f"unknown trial distribution {name!r}: choose one of {', '.join(DISTRIBUTIONS)}")
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean):
        raise ConfigError(f"the mean number of trials must be a number, got {mean!r}")
    if key == "fixed":
        if float(mean) != int(mean) or not 1 <= mean <= MAX_MEAN:
            raise ConfigError(f"a fixed number of trials must be a whole number in [1, {MAX_MEAN:g}], got {mean!r}")
        return key, None, float(int(mean))
    low = 1.0 if key == "poisson" else 1.0 + 1e-9
    if not (low < float(mean) <= MAX_MEAN) and not (key == "poisson" and float(mean) == 1.0):
        raise ConfigError(f"the mean number of trials must be in ({low:g}, {MAX_MEAN:g}] for {key}, got {mean!r}"
                          + ("; a mean of 1 leaves nothing random to hide the count" if float(mean) <= 1 else ""))
    return key, DISTRIBUTIONS[key], float(mean)


def _gamma(shape: float, mean: float) -> float:
    from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

    return float(_gamma_truncated_negative_binomial(shape, mean))


def pmf(name: str, mean: float, k: int) -> float:
    """P(K = k): the tests check the sampler against it."""
    name, shape, mean = check_distribution(name, mean)
    if shape is None:
        return float(k == mean)
    if shape == math.inf:
        return math.exp(-mean + k * math.log(mean) - math.lgamma(k + 1))
    if k < 1:
        return 0.0
    g = _gamma(shape, mean)
    if shape == 0:
        return (1 - g) ** k / k / -math.log(g)
    log_binom = math.lgamma(k + shape) - math.lgamma(k + 1) - math.lgamma(shape)
    return math.exp(log_binom + k * math.log1p(-g)) / (g ** -shape - 1)


def draw_count(name: str, mean: float, uniform: float | None = None) -> int:
    """K by inverting the CDF at a uniform from the OS CSPRNG (`uniform` given: tests only)."""
    name, shape, mean = check_distribution(name, mean)
    if shape is None:
        return int(mean)  # public
    u = float(secure_uniform(1)[0]) if uniform is None else float(uniform)
    u = min(u, 1.0 - 1e-16)
    if shape == math.inf:
        k, p = 0, math.exp(-mean)
        ratio = lambda k: mean / (k + 1)  # noqa: E731  p(k+1)/p(k)
    else:
        g = _gamma(shape, mean)
        k = 1
        p = (1 - g) / -math.log(g) if shape == 0 else shape * (1 - g) / (g ** -shape - 1)
        ratio = lambda k: (1 - g) * (k + shape) / (k + 1)  # noqa: E731
    cdf = p
    while cdf < u and k < _MAX_DRAW:
        p *= ratio(k)
        k += 1
        cdf += p
        if p == 0.0 and k > mean:
            break  # the tail underflowed: u sits in float rounding above the CDF's last representable step
    return k
