"""The statistics of the one-run audit (Steinke, Nasr & Jagielski 2023): guesses from scores, and
the largest epsilon an (epsilon, delta)-DP run is refuted at, given how many guesses were right."""

from __future__ import annotations

import math

import numpy as np

REFERENCE = "Steinke, Nasr & Jagielski 2023, Privacy Auditing with One (1) Training Run (arXiv:2305.08846)"



def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """P[at least `num_correct` of `num_guesses` guesses right] if training were (epsilon, delta)-DP in
    each canary (the one-run theorem of Steinke et al. 2023): a Binomial(r, e^eps / (1 + e^eps)) tail plus the
    delta term 2 m delta max_i P[v - i <= Binomial < v] / i."""
    from scipy.stats import binom

    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-randomized response
    tail = float(binom.sf(v - 1, r, q))
    window = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # i = 1..v: P[v - i <= B < v]
    delta_term = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * delta_term)


def epsilon_lower_bound(num_canaries: int, num_guesses: int, num_correct: int, delta: float,
                        confidence: float = 0.95, max_epsilon: float = 60.0) -> float:
    """The largest epsilon rejected at level 1 - confidence: with that confidence the run is NOT
    (eps', delta)-DP for any eps' below the returned value. 0 when the guesses are no better than chance."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta) < beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > max_epsilon:
            return lo
    for _ in range(50):  # p-value grows with epsilon: keep rejected(lo), not rejected(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def guesses_from_scores(scores: np.ndarray, num_guesses: int) -> np.ndarray:
    """+1 (member) for the top ceil(k/2) scores, -1 for the bottom floor(k/2), 0 (abstain) between."""
    scores = np.asarray(scores, dtype=np.float64)
    m = len(scores)
    if not 0 < num_guesses <= m:
        raise ValueError(f"num_guesses must be in 1..{m}, got {num_guesses}")
    order = np.argsort(-scores, kind="stable")
    top = (num_guesses + 1) // 2
    guesses = np.zeros(m, dtype=np.int64)
    bottom = num_guesses - top
    guesses[order[:top]] = 1
    if bottom:
        guesses[order[m - bottom:]] = -1
    return guesses


def count_correct(guesses: np.ndarray, membership: np.ndarray) -> tuple[int, int]:
    """(guesses made, correct guesses); membership is boolean per canary."""
    truth = np.where(np.asarray(membership, dtype=bool), 1, -1)
    made = guesses != 0
    return int(made.sum()), int((guesses[made] == truth[made]).sum())


# ---- canaries ----------------------------------------------------------------------------------


