"""What a private hyperparameter search costs, and the per-trial sigma that keeps it within one (epsilon, delta).

The search (Papernot & Steinke, ICLR 2022) is ONE mechanism: a random number K of trials (K drawn from a public
distribution, its value secret), each an ordinary DP-SGD run that outputs (model, score); only the best is kept.
Its RDP is dp-accounting's `RepeatAndSelectDpEvent(trial, mean, shape)`. The score reads the private data only
through one Gaussian release on a held-out split (dpdiff/tuning/score.py: a noisy sum with sensitivity C and a noisy
count with sensitivity 1, the same multiplier: two Gaussian events), composed SEQUENTIALLY with the search:

    total = Compose[ SelfCompose(Gaussian(sigma_score), 2),  RepeatAndSelect(trial, mean, shape) ]

in `dp_accounting.rdp.RdpAccountant` (the only accountant with repeat-and-select). Trials whose (q, steps) differ
(a search over batch size or length) are one mechanism with a data-independent choice of profile; by joint
quasi-convexity of the Renyi divergence its RDP is at most the largest profile's at every order. So one REFERENCE
profile is calibrated for the total, and every other profile gets the smallest sigma whose RDP curve lies below
the reference's at every order of the accountant's grid (the orders repeat-and-select reads, and its bound grows
with the curve): the total computed from the reference holds for the whole search.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field

from dp_accounting import dp_event
from dp_accounting.dp_event import RepeatAndSelectDpEvent
from dp_accounting.rdp import RdpAccountant

from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.privacy import accounting
from dpdiff.privacy.accounting import MAX_NOISE_MULTIPLIER, PrivacyPlan, check_delta

ACCOUNTANT = "rdp (dp-accounting RdpAccountant, RepeatAndSelectDpEvent)"
SCORE_RELEASES = 2  # noisy embedding sum + noisy count, one multiplier (dpdiff/mepf/release.py's planned_releases)


def trial_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_event.DpEvent:
    """One DP-SGD trial: `steps` Poisson-subsampled Gaussian steps."""
    step = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SelfComposedDpEvent(step, int(steps))


def score_event(noise_multiplier: float) -> dp_event.DpEvent:
    """The validation release: a sum (std sigma*C, sensitivity C) and a count (std sigma, sensitivity 1)."""
    return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(noise_multiplier), SCORE_RELEASES)


def search_event(trial: dp_event.DpEvent, mean: float, shape: float | None, score: dp_event.DpEvent | None) -> dp_event.DpEvent:
    """shape None: a fixed, public number of trials, all composed (selecting the best is post-processing)."""
    if shape is None:
        selected = dp_event.SelfComposedDpEvent(trial, int(mean))
    else:
        selected = RepeatAndSelectDpEvent(trial, float(mean), float(shape))
    return selected if score is None else dp_event.ComposedDpEvent([score, selected])


@contextlib.contextmanager
def _quiet():
    """dp-accounting logs (absl) each order whose series does not converge; it then counts that order as infinite
    RDP, which is safe (never used for the bound). One search calibration would print hundreds of such lines."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def epsilon_of(event: dp_event.DpEvent, delta: float) -> float:
    acc = RdpAccountant()
    with _quiet():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


def rdp_curve(event: dp_event.DpEvent):
    """RDP of `event` at the accountant's default orders (dp-accounting keeps it in `_rdp`; no public getter)."""
    acc = RdpAccountant()
    with _quiet():
        acc.compose(event)
    return acc._orders.copy(), acc._rdp.copy()


@dataclass(frozen=True)
class Profile:
    """What fixes a trial's privacy curve: its sample rate and number of steps (and, once calibrated, sigma)."""

    sample_rate: float
    steps: int
    noise_multiplier: float | None = None

    def key(self) -> tuple:
        return (self.sample_rate, self.steps)


@dataclass
class SearchPlan:
    """The calibrated search: public, stored in privacy.json. Never holds the trial count."""

    target_epsilon: float
    delta: float
    distribution: str
    shape: float | None  # None: a fixed, public count (plain composition)
    mean_trials: float
    score_noise_multiplier: float
    score_epsilon_share: float
    profiles: list[Profile]
    reference: int  # index of the profile the total is computed from
    epsilon: float  # the total, re-evaluated
    single_trial_epsilon: float  # the reference trial alone (no selection, no score)
    naive_epsilon: float  # score + ceil(mean) reference trials composed, as if the count were fixed and public
    accountant: str = ACCOUNTANT
    extra: dict = field(default_factory=dict)

    def sigma_for(self, sample_rate: float, steps: int) -> float:
        for p in self.profiles:
            if (p.sample_rate, p.steps) == (sample_rate, steps):
                return p.noise_multiplier
        raise PrivacyError(f"no calibrated sigma for q={sample_rate}, steps={steps}: not a profile of this search")

    def total_event(self) -> dp_event.DpEvent:
        ref = self.profiles[self.reference]
        return search_event(trial_event(ref.noise_multiplier, ref.sample_rate, ref.steps), self.mean_trials, self.shape,
                            score_event(self.score_noise_multiplier))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = "inf" if self.shape is not None and math.isinf(self.shape) else self.shape
        d["profiles"] = [asdict(p) for p in self.profiles]
        return d


def calibrate(target_epsilon, delta, profiles: list[tuple[float, int]], distribution: str, mean: float,
              score_epsilon_share: float = 0.1) -> SearchPlan:
    """Per-trial sigmas and the score's sigma so that the whole search is (target_epsilon, delta)-DP.

    The score release gets `score_epsilon_share` of the target on its own (its sigma from that), the trials the rest
    of the RDP budget: the reference sigma is the smallest whose total, re-evaluated, is <= target."""
    from dpdiff.tuning.trials import check_distribution

    target = accounting.check_epsilon(target_epsilon)
    delta = check_delta(delta)
    distribution, shape, mean = check_distribution(distribution, mean)
    if not (0.0 < float(score_epsilon_share) < 1.0):
        raise ConfigError(f"score epsilon_share must be in (0, 1), got {score_epsilon_share!r}")
    keys = sorted({(float(q), int(t)) for q, t in profiles})
    if not keys:
        raise ConfigError("a search needs at least one trial profile (sample rate, steps)")
    for q, t in keys:
        accounting.validate_step(1.0, q, t)
    share = target * float(score_epsilon_share)
    sigma_score = _solve(lambda s: epsilon_of(score_event(s), delta), share, "the score release's share")
    # the reference: the profile that spends most at sigma 1 (the others then need less noise to lie below it)
    ref = max(range(len(keys)), key=lambda i: epsilon_of(trial_event(1.0, *keys[i]), delta))
    score = score_event(sigma_score)

    def total(sigma):
        return epsilon_of(search_event(trial_event(sigma, *keys[ref]), mean, shape, score), delta)

    sigma_ref = _solve(total, target, "the search")
    _, ref_curve = rdp_curve(trial_event(sigma_ref, *keys[ref]))
    calibrated = []
    for i, (q, t) in enumerate(keys):
        sigma = sigma_ref if i == ref else _dominating_sigma(q, t, ref_curve)
        calibrated.append(Profile(q, t, sigma))
    ref_q, ref_t = keys[ref]
    return SearchPlan(
        target_epsilon=target, delta=delta, distribution=distribution, shape=shape, mean_trials=mean,
        score_noise_multiplier=sigma_score, score_epsilon_share=float(score_epsilon_share), profiles=calibrated,
        reference=ref, epsilon=total(sigma_ref), single_trial_epsilon=epsilon_of(trial_event(sigma_ref, ref_q, ref_t), delta),
        naive_epsilon=naive_epsilon(sigma_ref, ref_q, ref_t, math.ceil(mean), delta, sigma_score),
    )


def naive_epsilon(sigma, sample_rate, steps, num_trials: int, delta, score_sigma: float | None = None) -> float:
    """`num_trials` trials simply composed (+ the score release): what one would state with a FIXED, public count."""
    events = [dp_event.SelfComposedDpEvent(trial_event(sigma, sample_rate, steps), int(num_trials))]
    if score_sigma is not None:
        events.insert(0, score_event(score_sigma))
    return epsilon_of(dp_event.ComposedDpEvent(events), delta)


def dominates(reference_curve, sigma: float, sample_rate: float, steps: int) -> bool:
    """True when the trial (sigma, q, steps) spends at most the reference's RDP at every order of the grid."""
    _, curve = rdp_curve(trial_event(sigma, sample_rate, steps))
    return bool((curve <= reference_curve * (1 + 1e-12)).all())


def _dominating_sigma(q: float, t: int, reference_curve) -> float:
    lo, hi = accounting.MIN_NOISE_MULTIPLIER / 2, 1.0
    while not dominates(reference_curve, hi, q, t):
        lo, hi = hi, 2 * hi
        if hi > MAX_NOISE_MULTIPLIER:
            raise PrivacyError(f"no sigma <= {MAX_NOISE_MULTIPLIER:g} keeps the trial q={q:g}, steps={t} within the reference's RDP")
    if dominates(reference_curve, lo, q, t):
        return lo
    while hi / lo > 1 + accounting.SIGMA_RTOL:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if dominates(reference_curve, mid, q, t) else (mid, hi)
    return hi


def _solve(eps, target: float, what: str) -> float:
    try:
        return accounting._solve_sigma(eps, target, 1.0)
    except PrivacyError:
        raise PrivacyError(
            f"{what} cannot reach epsilon {target:.4g}: even noise multiplier {MAX_NOISE_MULTIPLIER:g} spends more "
            "(repeat-and-select adds about log(mean)/(order-1) however much noise each trial gets). Raise the target "
            "epsilon, lower the mean number of trials, or give the score a larger epsilon_share."
        ) from None


def trial_plan(noise_multiplier: float, sample_rate: float, steps: int, delta: float, num_examples: int, batch_size: int,
               epochs=None, accountant: str = "rdp") -> PrivacyPlan:
    """The plan one trial runs (the loop reads it from `args._privacy_plan`): sigma given, calibrated for the whole
    search, instead of solved from a per-run target; its epsilon is the trial's own (never published)."""
    delta = check_delta(delta, num_examples)
    sigma, q, steps = accounting.validate_step(noise_multiplier, sample_rate, steps)
    eps = accounting.epsilon_for(sigma, q, steps, delta, accountant)
    return PrivacyPlan(noise_multiplier=sigma, epsilon=eps, target_epsilon=eps, delta=delta, sample_rate=q, steps=steps,
                       accountant=accountant, num_examples=int(num_examples), batch_size=int(batch_size),
                       epochs=None if epochs is None else float(epochs))
