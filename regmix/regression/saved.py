"""A fitted regressor: its members' weighted prediction, and its saved format.

Saved in safe formats only (LightGBM's text model, JSON, .npy), one folder per member, so that
loading a model never executes code.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from joblib import cpu_count

# Relative imports: a logged model carries these modules under a name of its own (pyfunc.py)
from .boosted import _LightGBM
from .gp import _GaussianProcess
from .law import _MixingLaw
from .linear import _Linear

# The paper's own CSVs round each of 17 weights to 3 decimals, so their rows sum to
# 0.996..1.003; a looser tolerance would hide real mistakes (a missing column), a tighter
# one would reject the paper's data. Accepted rows are renormalised to sum to exactly 1.
ROW_SUM_TOLERANCE = 5e-3
# Mixtures predicted per batch: a GP's kernel between a batch and 512 training rows, and its
# intermediates, then take tens of MB instead of GBs for 100k mixtures at once (2.8 GB peak
# for the paper recipe on a 13-part per-domain model of the paper's 512 proxies).
PREDICT_BATCH_ROWS = 8192
REGRESSOR_FILE, TRAIN_WEIGHTS_FILE = "regressor.json", "train_weights.npy"
# config.sections.PER_DOMAIN, named here too: these modules import nothing outside the package
PER_DOMAIN = "per-domain"


class _Member(Protocol):
    """One fitted model inside a Regressor."""

    kind: str

    def predict(self, weights: np.ndarray) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...


_MEMBER_LOADERS = {
    "lightgbm": _LightGBM.load,
    "linear": _Linear.load,
    "gp": _GaussianProcess.load,
    "law": _MixingLaw.load,
}


@dataclass
class Regressor:
    """A fitted model for one target: the weighted mean of its members (one, or several for an
    ensemble, weighted as CV chose). A per-domain model's members are themselves Regressors,
    one per domain of the target, summed with the target's own weights."""

    kind: ClassVar[str] = "regressor"  # as a member of a per-domain model
    model: str
    domains: list[str]
    members: list[_Member]
    # Ridge coefficients on the raw weights (the paper's domain analysis), whatever the model.
    linear_coefficients: dict[str, float] | None = None
    # The mixtures it was fitted on: the search measures how far a chosen point lies from them.
    train_weights: np.ndarray | None = None
    member_weights: list[float] | None = None  # None: equal weights
    # How well CV predicted the target, and the best value measured on the training rows and
    # its row: the search weighs a predicted gain over the best proxy against the CV error.
    fit_summary: dict[str, float] | None = None

    def _check(self, weights: np.ndarray) -> np.ndarray:
        """The rows as mixtures over this model's domains, renormalised to sum to 1 (rounded
        weights, as the paper's CSVs have), or a ValueError naming the rows that are none: a
        model asked about NaN, negative or percentage weights extrapolates into nonsense."""
        weights = np.atleast_2d(np.asarray(weights, dtype=float))
        if weights.shape[1] != len(self.domains):
            raise ValueError(
                f"weights have {weights.shape[1]} columns, the regressor {len(self.domains)} "
                f"domains ({self.domains})"
            )
        sums = weights.sum(axis=1)
        off_by = np.abs(sums - 1)
        for bad, what in ((~np.isfinite(weights).all(axis=1), "NaN or infinite weights"),
                          ((weights < 0).any(axis=1), "negative weights"),
                          (off_by > ROW_SUM_TOLERANCE,
                           f"weights that do not sum to 1 (within {ROW_SUM_TOLERANCE}; "
                           "percentages? divide by 100; a domain column missing or extra?)")):
            rows = np.flatnonzero(bad)
            if rows.size:
                raise ValueError(f"mixture row(s) {rows[:5].tolist()} of {len(weights)} have "
                                 f"{what}; each row is a mixture over {self.domains}")
        # Rows summing to 1 up to rounding stay bit for bit as given (predictions repeat exactly)
        return np.where((off_by > 1e-12)[:, None], weights / sums[:, None], weights)

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return self.predict_with_spread(weights)[0]

    def predict_with_spread(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted mean prediction and the members' disagreement (weighted std; 0 for one model).

        A per-domain model's spread is the target-weighted sum of its domains' own spreads
        (their disagreements may line up, so they add, at worst)."""
        return self._predict_mixtures(self._check(weights))

    def _predict_mixtures(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`predict_with_spread` on rows `_check` passed (once, not per batch or part)."""
        if len(weights) > PREDICT_BATCH_ROWS:  # e.g. the paper recipe's 100k samples
            batches = np.array_split(weights, -(-len(weights) // PREDICT_BATCH_ROWS))
            # Batches on threads: numpy and LightGBM (thread-safe predict) release the GIL
            with ThreadPoolExecutor(cpu_count()) as pool:
                mean, spread = zip(*pool.map(self._predict_mixtures, batches), strict=True)
            return np.concatenate(mean), np.concatenate(spread)
        if self.model == PER_DOMAIN:
            parts = np.stack([member._predict_mixtures(weights) for member in self.members])
            mean, spread = np.tensordot(self.member_weights, parts, axes=1)
            return mean, spread
        each = np.stack([member.predict(weights) for member in self.members])
        share = np.ones(len(each)) if self.member_weights is None else np.array(self.member_weights)
        share = share / share.sum()
        mean = share @ each
        return mean, np.sqrt(share @ (each - mean) ** 2)

    def save(self, folder: Path) -> None:
        """Write the model's files into `folder` (callers write through `files.replacing`, so
        that a saved model appears whole or not at all)."""
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, member in enumerate(self.members):
            names.append(f"{i}_{member.kind}")
            (folder / names[-1]).mkdir()
            member.save(folder / names[-1])
        if self.train_weights is not None:
            np.save(folder / TRAIN_WEIGHTS_FILE, self.train_weights)
        state = {
            "model": self.model,
            "domains": self.domains,
            "members": names,
            "linear_coefficients": self.linear_coefficients,
            "member_weights": self.member_weights,
            "fit_summary": self.fit_summary,
        }
        (folder / REGRESSOR_FILE).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, directory: Path) -> Regressor:
        directory = Path(directory)
        state = json.loads((directory / REGRESSOR_FILE).read_text())
        members = [
            _MEMBER_LOADERS[name.split("_", 1)[1]](directory / name) for name in state["members"]
        ]
        weights = directory / TRAIN_WEIGHTS_FILE
        return cls(state["model"], state["domains"], members, state["linear_coefficients"],
                   np.load(weights) if weights.exists() else None, state.get("member_weights"),
                   state.get("fit_summary"))


_MEMBER_LOADERS["regressor"] = Regressor.load


def saved_train_weights(directory: Path, domains: list[str]) -> np.ndarray:
    """A saved model's training mixtures, columns in `domains`' order: read from its folder
    without loading its members (which conditions every GP on them)."""
    directory = Path(directory)
    saved = json.loads((directory / REGRESSOR_FILE).read_text())["domains"]
    weights = np.load(directory / TRAIN_WEIGHTS_FILE, allow_pickle=False)
    return weights[:, [saved.index(d) for d in domains]]
