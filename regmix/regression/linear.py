"""The ridge member on raw weights (the paper's linear regression)."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import RidgeCV

RIDGE_ALPHAS = np.logspace(-6, 3, 28)


@dataclass
class _Linear:
    coefficients: np.ndarray
    intercept: float
    alpha: float
    kind: str = "linear"

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return weights @ self.coefficients + self.intercept

    def by_domain(self, domains: list[str]) -> dict[str, float]:
        return dict(zip(domains, self.coefficients.tolist(), strict=True))

    def save(self, directory: Path) -> None:
        state = {"coefficients": self.coefficients.tolist(), "intercept": self.intercept}
        (directory / "linear.json").write_text(json.dumps({**state, "alpha": self.alpha}))

    @classmethod
    def load(cls, directory: Path) -> "_Linear":
        state = json.loads((directory / "linear.json").read_text())
        return cls(np.array(state["coefficients"]), state["intercept"], state["alpha"])


def _fit_ridge(weights: np.ndarray, y: np.ndarray) -> _Linear:
    # RidgeCV picks the penalty by efficient leave-one-out CV on the rows it is given.
    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(weights, y)
    return _Linear(ridge.coef_, float(ridge.intercept_), float(ridge.alpha_))


def domain_interactions(weights: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Ridge coefficients of each loss column on the mixture weights, a row per column: the
    paper's domain-interaction analysis (which domains' data lowers which validation loss)."""
    return np.stack([_fit_ridge(weights, column).coefficients for column in losses.T])
