"""Privacy accounting for DP-SGD: (noise multiplier, sample rate, steps, delta) <-> epsilon.

Built on Opacus' accountants. PRV (Gopi et al. 2021) is the default because it is tight; RDP is
offered because it is a simple, always-valid upper bound. GDP is not offered: it is an asymptotic
approximation and reports a SMALLER epsilon than the truth (0.634 vs 0.728 in docs/privacy.md).

Every epsilon returned here is an upper bound on the true epsilon:
- PRV: Opacus returns the upper end of the PRV error interval, i.e. the estimate at delta - delta_err
  plus `PRV_EPS_ERROR`; it lies between the tight value and about tight + 2 * PRV_EPS_ERROR.
- RDP: valid by construction (looser, by 5-50%).
If the PRV numerics fail (extreme parameters), we fall back to RDP with a warning, never to a guess.

The noise multiplier is born here (`plan`, `noise_multiplier_for`) and read by the engine.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from dpdiff.errors import ConfigError, PrivacyError

ACCOUNTANTS = ("prv", "rdp")
DEFAULT_ACCOUNTANT = "prv"
DEFAULT_DELTA = 1e-5
# Opacus' default: the PRV epsilon is certified to within this much (absolute).
PRV_EPS_ERROR = 0.01
# Beyond this the signal is drowned anyway; a target that needs more noise is refused.
MAX_NOISE_MULTIPLIER = 1000.0
# The search does not go below this: PRV numerics get slow and such runs are not private in any
# useful sense. A sigma returned at this floor still satisfies the target.
MIN_NOISE_MULTIPLIER = 0.25
# Bisection stops when sigma is known to this relative precision.
SIGMA_RTOL = 1e-3

# One composition entry, the format of Opacus' accountant `history`.
HistoryEntry = tuple  # (noise_multiplier: float, sample_rate: float, steps: int)


def validate_accountant(accountant: str) -> str:
    """Return the normalised accountant name or raise a clear error."""
    name = str(accountant).strip().lower()
    if name == "gdp":
        raise PrivacyError(
            "accountant 'gdp' is not offered: Opacus' GDP accountant is a central-limit "
            "approximation that under-reports epsilon (0.634 vs the tight 0.728 for q=256/60000, "
            "sigma=1, 1000 steps, delta=1e-5). Use 'prv' (tight, default) or 'rdp'."
        )
    if name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")
    return name


def _real(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PrivacyError(f"{what} must be a number, got {value!r}")
    return float(value)


def _count(value, what: str, minimum: int = 0) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise PrivacyError(f"{what} must be a whole number, got {value!r}")
    if int(value) < minimum:
        raise PrivacyError(f"{what} must be >= {minimum}, got {value!r}")
    return int(value)


def validate_step(noise_multiplier, sample_rate, steps=1) -> HistoryEntry:
    """Check one (sigma, q, steps) entry; a bad value would silently corrupt the guarantee."""
    sigma = _real(noise_multiplier, "noise_multiplier")
    if not math.isfinite(sigma) or sigma < 0:
        raise PrivacyError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    q = _real(sample_rate, "sample_rate")
    if not (0.0 < q <= 1.0):
        raise PrivacyError(
            f"sample_rate must be in (0, 1] (expected batch size / number of examples), got {sample_rate!r}"
        )
    return (sigma, q, _count(steps, "steps"))


def _validate_delta_range(delta) -> float:
    d = _real(delta, "delta")
    if not (0.0 < d < 1.0):
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}; the usual choice is 1e-5 (and < 1/n)")
    return d


def epsilon_of_history(history: Iterable[Sequence], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon spent by a composition of Poisson-subsampled Gaussian steps [(sigma, q, steps), ...]."""
    accountant = validate_accountant(accountant)
    delta = _validate_delta_range(delta)
    entries = tuple(validate_step(*entry) for entry in history)
    entries = tuple(e for e in entries if e[2] > 0)
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf  # a step without noise has no finite guarantee
    return _epsilon_cached(entries, delta, accountant)


@functools.lru_cache(maxsize=512)
def _epsilon_cached(entries: tuple, delta: float, accountant: str) -> float:
    if accountant == "prv":
        try:
            eps = _opacus_epsilon("prv", entries, delta)
            if math.isnan(eps):
                raise FloatingPointError("PRV returned NaN")
            return max(0.0, eps)
        except (RuntimeError, ValueError, FloatingPointError, OverflowError, MemoryError) as err:
            warnings.warn(
                f"PRV accountant failed on {list(entries)} (delta={delta:g}): {err}. "
                "Reporting the RDP bound instead (valid, looser).",
                RuntimeWarning,
                stacklevel=3,
            )
    eps = _opacus_epsilon("rdp", entries, delta)
    return math.inf if math.isnan(eps) else max(0.0, eps)


def _opacus_epsilon(mechanism: str, entries: tuple, delta: float) -> float:
    import numpy as np
    from opacus.accountants import PRVAccountant, RDPAccountant

    # q = 1 (plain Gaussian mechanism) takes log(0) on a masked branch: harmless, silenced.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # RDP warns when the optimal order sits at the edge of its grid; the bound is still valid.
        warnings.simplefilter("ignore", UserWarning)
        if mechanism == "prv":
            acc = PRVAccountant()
            acc.history = [tuple(e) for e in entries]
            return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        acc = RDPAccountant()
        acc.history = [tuple(e) for e in entries]
        return float(acc.get_epsilon(delta))


def epsilon_for(noise_multiplier, sample_rate, steps, delta, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon after `steps` DP-SGD steps with Poisson rate `sample_rate` and noise `noise_multiplier`."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def epsilon_for_gaussian(noise_multiplier, delta, releases: int = 1, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon of `releases` Gaussian-mechanism releases of a statistic with L2 sensitivity S and
    noise std noise_multiplier * S, no subsampling (e.g. DP-MEPF's mean embeddings): q = 1."""
    return epsilon_for(noise_multiplier, 1.0, releases, delta, accountant)


def noise_multiplier_for_gaussian(
    target_epsilon, delta, releases: int = 1, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Smallest noise multiplier for `releases` Gaussian releases to stay within target_epsilon."""
    return noise_multiplier_for(target_epsilon, 1.0, releases, delta, accountant)


def check_delta(delta, num_examples=None, force: bool = False) -> float:
    """delta must lie in (0, 1) and below 1/n: a larger delta allows publishing a whole record."""
    d = _validate_delta_range(delta)
    if num_examples is None:
        return d
    n = _count(num_examples, "num_examples", minimum=1)
    if d >= 1.0 / n:
        suggestion = min(DEFAULT_DELTA, 10.0 ** math.floor(math.log10(0.1 / n)))
        message = (
            f"delta={d:g} >= 1/n=1/{n}: with delta that large the guarantee allows releasing a whole "
            f"training example outright. Choose delta < 1/n, e.g. {suggestion:g}"
        )
        if not force:
            raise PrivacyError(message + " (or, knowingly, force it: --force-delta / force=True).")
        warnings.warn(message + " -- forced by the caller.", UserWarning, stacklevel=2)
    return d


def check_epsilon(
    target_epsilon,
    sample_rate=None,
    steps=None,
    delta=None,
    accountant: str = DEFAULT_ACCOUNTANT,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """A target epsilon must be finite and > 0; given (q, steps, delta) it must also be reachable
    with at most `max_noise_multiplier` (otherwise the run would train on noise alone)."""
    eps = _real(target_epsilon, "target epsilon")
    if not math.isfinite(eps) or eps <= 0:
        raise PrivacyError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    if sample_rate is None or steps is None or delta is None:
        return eps
    floor = epsilon_for(max_noise_multiplier, sample_rate, steps, delta, accountant)
    if eps < floor:
        resolution = f"; the PRV accountant certifies epsilon only to +-{PRV_EPS_ERROR}" if accountant == "prv" else ""
        raise PrivacyError(
            f"target epsilon={eps:g} cannot be reached: even noise multiplier {max_noise_multiplier:g} gives "
            f"epsilon={floor:.4g} with the {accountant} accountant (q={float(sample_rate):g}, "
            f"steps={steps}, delta={float(delta):g}){resolution}. Raise the target epsilon, or take "
            f"fewer steps / a smaller sample rate."
        )
    return eps


def noise_multiplier_for(
    target_epsilon, sample_rate, steps, delta, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Smallest noise multiplier (to SIGMA_RTOL, or within 0.1% of the target epsilon) whose epsilon,
    re-evaluated with the same accountant, is <= target_epsilon.

    The returned end of the search bracket always satisfies eps(sigma) <= target (evaluated, not
    interpolated), and the accountants are deterministic, so re-evaluating reproduces it."""
    accountant = validate_accountant(accountant)
    sigma_q_steps = validate_step(1.0, sample_rate, steps)
    if sigma_q_steps[2] < 1:
        raise PrivacyError("steps must be >= 1 to choose a noise multiplier")
    _validate_delta_range(delta)
    target = check_epsilon(target_epsilon, sample_rate, steps, delta, accountant)

    def eps_with(acc: str):
        return lambda sigma: epsilon_for(sigma, sample_rate, steps, delta, acc)

    start = 1.0
    if accountant == "prv":
        # RDP is cheap and (nearly always) looser, so its answer is a good upper end for PRV.
        try:
            start = _solve_sigma(eps_with("rdp"), target, 1.0)
        except PrivacyError:
            pass  # RDP cannot certify this target at all; PRV may, search from 1.0
    return _solve_sigma(eps_with(accountant), target, start)


def _solve_sigma(eps, target: float, start: float) -> float:
    """Bracket eps(hi) <= target < eps(lo), then shrink it by safeguarded interpolation in
    (log sigma, log eps), where eps is close to a power law, falling back to bisection."""
    hi, lo = start, None
    eps_hi = eps(hi)
    if eps_hi <= target:
        while lo is None:
            candidate = max(hi / 1.5, MIN_NOISE_MULTIPLIER)
            if candidate >= hi:
                return hi  # at the floor and still within budget
            eps_c = eps(candidate)
            if eps_c <= target:
                hi, eps_hi = candidate, eps_c
            else:
                lo, eps_lo = candidate, eps_c
    else:
        lo, eps_lo = hi, eps_hi
        while True:
            hi = min(2 * lo, MAX_NOISE_MULTIPLIER)
            eps_hi = eps(hi)
            if eps_hi <= target:
                break
            if hi >= MAX_NOISE_MULTIPLIER:
                raise PrivacyError(
                    f"target epsilon={target:g} needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}"
                )
            lo, eps_lo = hi, eps_hi
    while hi / lo > 1 + SIGMA_RTOL and target - eps_hi > 1e-3 * target:
        mid = _interpolate(lo, eps_lo, hi, eps_hi, target)
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo, eps_lo = mid, eps_mid
    return hi


def _interpolate(lo: float, eps_lo: float, hi: float, eps_hi: float, target: float) -> float:
    a, b = math.log(lo), math.log(hi)
    mid = (a + b) / 2
    if eps_hi > 0 and eps_lo > eps_hi and math.isfinite(eps_lo):
        fa, fb, ft = math.log(eps_lo), math.log(eps_hi), math.log(target)
        guess = a + (ft - fa) * (b - a) / (fb - fa)
        # aim a little to the safe side and never hug an end, so the bracket always shrinks
        guess += 0.02 * (b - a)
        mid = min(max(guess, a + 0.05 * (b - a)), b - 0.05 * (b - a))
    return math.exp(mid)


def steps_for(sample_rate: float, epochs=None, max_steps=None) -> int:
    """Number of logical steps: `max_steps`, or ceil(epochs / q) (an epoch is 1/q Poisson steps)."""
    if (epochs is None) == (max_steps is None):
        raise ConfigError("give exactly one of epochs or max_steps (steps)")
    if max_steps is not None:
        return _count(max_steps, "max_steps", minimum=1)
    e = _real(epochs, "epochs")
    if not math.isfinite(e) or e <= 0:
        raise ConfigError(f"epochs must be a finite number > 0, got {epochs!r}")
    # round first so that 2 epochs at q=0.1 is 20 steps, not 21 from float noise
    return max(1, math.ceil(round(e / float(sample_rate), 9)))


@dataclass(frozen=True)
class PrivacyPlan:
    """What a DP-SGD run will do and the guarantee it will reach; the engine reads noise_multiplier."""

    noise_multiplier: float
    epsilon: float  # as reached by noise_multiplier, re-evaluated (<= target_epsilon)
    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    accountant: str
    num_examples: int
    batch_size: int
    epochs: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def plan(
    target_epsilon,
    delta,
    num_examples,
    batch_size,
    epochs=None,
    max_steps=None,
    accountant: str = DEFAULT_ACCOUNTANT,
    force_delta: bool = False,
) -> PrivacyPlan:
    """Choose the noise multiplier for a run of `batch_size` (expected, Poisson) out of `num_examples`."""
    accountant = validate_accountant(accountant)
    n = _count(num_examples, "num_examples", minimum=1)
    b = _count(batch_size, "batch_size", minimum=1)
    if b > n:
        raise ConfigError(
            f"batch_size={b} > num_examples={n}: the sample rate would exceed 1; use a batch size <= {n}"
        )
    delta = check_delta(delta, n, force=force_delta)
    q = b / n
    steps = steps_for(q, epochs=epochs, max_steps=max_steps)
    target = check_epsilon(target_epsilon)
    sigma = noise_multiplier_for(target, q, steps, delta, accountant)
    return PrivacyPlan(
        noise_multiplier=sigma,
        epsilon=epsilon_for(sigma, q, steps, delta, accountant),
        target_epsilon=target,
        delta=delta,
        sample_rate=q,
        steps=steps,
        accountant=accountant,
        num_examples=n,
        batch_size=b,
        epochs=None if epochs is None else float(epochs),
    )
