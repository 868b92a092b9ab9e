"""The privacy ledger: a record of every DP step actually taken, and the epsilon they add up to.

The plan says what a run intends; the ledger says what happened (a run stopped early, resumed, or
changed its noise). The guarantee written next to an adapter comes from the ledger. Its history
has the format of Opacus' accountants, [(noise_multiplier, sample_rate, steps), ...], with
consecutive identical entries merged. A resumed run loads the ledger and continues; it never
restarts from zero.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

from dpdiff.errors import PrivacyError
from dpdiff.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    PrivacyPlan,
    check_delta,
    epsilon_of_history,
    validate_accountant,
    validate_step,
)

STATE_VERSION = 1


class PrivacyLedger:
    """Composes Poisson-subsampled Gaussian steps for one fixed delta and accountant."""

    def __init__(self, delta: float, accountant: str = DEFAULT_ACCOUNTANT):
        self.delta = check_delta(delta)
        self.accountant = validate_accountant(accountant)
        self._history: list[list] = []

    # -- recording ---------------------------------------------------------------------------
    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Account for `steps` logical DP steps (one noise draw each), including empty batches."""
        sigma, q, steps = validate_step(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        if self._history and self._history[-1][0] == sigma and self._history[-1][1] == q:
            self._history[-1][2] += steps
        else:
            self._history.append([sigma, q, steps])

    def optimizer_hook(self, sample_rate: float) -> Callable:
        """A hook for Opacus `DPOptimizer.attach_step_hook`: records each real (non-skipped) step
        with the optimizer's current noise multiplier, like Opacus' own accountant hook.
        Opacus keeps ONE step hook: attaching this replaces the PrivacyEngine accountant's."""

        def hook(optimizer) -> None:
            self.record(optimizer.noise_multiplier, sample_rate * optimizer.accumulated_iterations)

        return hook

    # -- reading -----------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return sum(entry[2] for entry in self._history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(entry) for entry in self._history]

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at `delta` (the ledger's own by default); 0.0 before any step."""
        return epsilon_of_history(self._history, self.delta if delta is None else delta, self.accountant)

    def epsilon_after(self, steps: int, noise_multiplier: float, sample_rate: float) -> float:
        """Epsilon once `steps` more steps of (noise_multiplier, sample_rate) are spent, recording nothing:
        ε only grows with steps, so this bounds every step in between (what a progress bar can show
        without an accountant call per step)."""
        sigma, q, steps = validate_step(noise_multiplier, sample_rate, steps)
        ahead = PrivacyLedger(self.delta, self.accountant)
        ahead._history = [list(entry) for entry in self._history]
        ahead.record(sigma, q, steps)
        return ahead.epsilon()

    def epsilon_curve(self, num_points: int = 20) -> tuple[list[int], list[float]]:
        """(steps, epsilon) at up to `num_points` evenly spaced points of the recorded history."""
        total = self.steps
        if total == 0:
            return [0], [0.0]
        marks = sorted({max(1, round(total * k / num_points)) for k in range(1, num_points + 1)})
        return [0] + marks, [0.0] + [epsilon_of_history(_prefix(self._history, t), self.delta, self.accountant) for t in marks]

    def to_dict(self) -> dict:
        """Summary for logs, checkpoints and model cards."""
        sigmas = [entry[0] for entry in self._history]
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "accountant": self.accountant,
            "steps": self.steps,
            "noise_multiplier": sigmas[0] if len(set(sigmas)) == 1 else sigmas,
            "sample_rate": _single_or_list([entry[1] for entry in self._history]),
            "history": self.history,
        }

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state; floats survive a JSON round trip exactly."""
        return {
            "version": STATE_VERSION,
            "delta": self.delta,
            "accountant": self.accountant,
            "history": [list(entry) for entry in self._history],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a saved ledger. Refuses to overwrite steps already recorded here, and
        refuses a different delta or accountant (that would change the stated guarantee)."""
        if self._history:
            raise PrivacyError(
                f"this ledger already records {self.steps} steps; loading a saved ledger into it "
                "would drop them. Load into a fresh PrivacyLedger (or use PrivacyLedger.from_state_dict)."
            )
        if not isinstance(state, Mapping) or not {"delta", "accountant", "history"} <= set(state):
            raise PrivacyError("not a privacy ledger state: expected keys 'delta', 'accountant', 'history'")
        if state.get("version", STATE_VERSION) != STATE_VERSION:
            raise PrivacyError(f"privacy ledger state version {state.get('version')!r} is not supported")
        if validate_accountant(state["accountant"]) != self.accountant:
            raise PrivacyError(
                f"saved ledger used accountant {state['accountant']!r}, this one uses {self.accountant!r}; "
                "resume with the same accountant"
            )
        if state["delta"] != self.delta:
            raise PrivacyError(
                f"saved ledger used delta={state['delta']!r}, this one delta={self.delta!r}; "
                "resume with the same delta"
            )
        history = state["history"]
        if not isinstance(history, (list, tuple)) or any(
            not isinstance(entry, (list, tuple)) or len(entry) != 3 for entry in history
        ):
            raise PrivacyError("privacy ledger history must be a list of [noise_multiplier, sample_rate, steps]")
        entries = [validate_step(*entry) for entry in history]  # all valid, or nothing is loaded
        for entry in entries:
            self.record(*entry)

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "PrivacyLedger":
        ledger = cls(state["delta"], state["accountant"])
        ledger.load_state_dict(state)
        return ledger

    @classmethod
    def from_plan(cls, plan: PrivacyPlan) -> "PrivacyLedger":
        """The ledger a run following `plan` to its end would hold."""
        ledger = cls(plan.delta, plan.accountant)
        ledger.record(plan.noise_multiplier, plan.sample_rate, plan.steps)
        return ledger

    def __repr__(self) -> str:
        return f"PrivacyLedger(steps={self.steps}, delta={self.delta:g}, accountant={self.accountant!r})"


def _prefix(history: list, steps: int) -> list:
    """The first `steps` steps of a history."""
    out, left = [], steps
    for sigma, q, n in history:
        if left <= 0:
            break
        out.append((sigma, q, min(n, left)))
        left -= n
    return out


def _single_or_list(values: list):
    return values[0] if len(set(values)) == 1 else values


def plot_epsilon_curve(source, path: str | os.PathLike, num_points: int = 20, title: str | None = None) -> str:
    """Save a PNG of epsilon against steps for a PrivacyLedger, a PrivacyPlan, or a mapping with
    noise_multiplier, sample_rate, steps, delta (and optionally accountant). Returns the path."""
    from matplotlib.figure import Figure  # Agg canvas, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from dpdiff.io import atomic_path

    ledger = _as_ledger(source)
    xs, ys = ledger.epsilon_curve(num_points)
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set_xlabel("DP-SGD steps")
    ax.set_ylabel(f"epsilon (delta={ledger.delta:g})")
    final = ys[-1]
    ax.set_title(title or f"{ledger.accountant.upper()} accountant: epsilon={final:.3g} after {xs[-1]} steps")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _as_ledger(source) -> PrivacyLedger:
    if isinstance(source, PrivacyLedger):
        return source
    if isinstance(source, PrivacyPlan):
        return PrivacyLedger.from_plan(source)
    if isinstance(source, Mapping):
        missing = {"noise_multiplier", "sample_rate", "steps", "delta"} - set(source)
        if missing:
            raise PrivacyError(f"epsilon curve parameters lack {sorted(missing)}")
        ledger = PrivacyLedger(source["delta"], source.get("accountant", DEFAULT_ACCOUNTANT))
        ledger.record(source["noise_multiplier"], source["sample_rate"], source["steps"])
        return ledger
    raise PrivacyError(
        f"plot_epsilon_curve needs a PrivacyLedger, a PrivacyPlan or a parameter mapping, got {type(source).__name__}"
    )


__all__ = ["PrivacyLedger", "plot_epsilon_curve", "STATE_VERSION"]
