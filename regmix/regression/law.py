"""The data mixing law member: loss as an exponential law of the weights."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from .gp import _log_and_raw

# The mixing law's exponents are shrunk toward 0 by a penalty chosen from these by CV error
# (the law has 2 x domains + 2 parameters: with few proxies only a strong penalty keeps it
# sane). Its residuals count linearly past a tenth of the loss's std (soft L1): a few runs
# that diverged or got a lucky seed then do not bend the law.
LAW_RIDGES = (1e-3, 1e-2, 1e-1, 1.0)
LAW_ROBUST_SCALE = 0.1
# Solver evaluations per law fit: with Jacobian scaling a 100-domain law has converged well
# before this (about 2 s on 2 cores for 1000 rows); the paper's 17 domains take about 20.
LAW_MAX_EVALUATIONS = 100
# Rows per law parameter below which `auto` and the ensemble leave the law out (see fit_regressor).
LAW_MIN_ROWS_PER_PARAMETER = 2


def _law_parameter_count(domains: int) -> int:
    return 2 + 2 * domains  # floor, scale, one exponent per log-weight and per weight


@dataclass
class _MixingLaw:
    """A data mixing law (Ye et al. 2024): loss = floor + exp(scale + exponents . features).

    The features are the GP's (`_log_and_raw`): the weights' logs (for the steep gain of a
    domain's first tenth of a percent) and the weights (the law's own form). A parametric
    member that ranks well where trees and kernels stall: on the paper's data it beats the GP
    on DM Mathematics and Ubuntu IRC, the hardest targets, whose losses jump when their own
    domain goes from absent to present.
    """

    parameters: np.ndarray  # floor, scale, then one exponent per feature
    kind: str = "law"

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return _law(self.parameters, _log_and_raw(weights))

    def save(self, directory: Path) -> None:
        (directory / "law.json").write_text(json.dumps({"parameters": self.parameters.tolist()}))

    @classmethod
    def load(cls, directory: Path) -> "_MixingLaw":
        return cls(np.array(json.loads((directory / "law.json").read_text())["parameters"]))


def _law(parameters: np.ndarray, features: np.ndarray) -> np.ndarray:
    return parameters[0] + _law_growth(parameters, features)


def _law_growth(parameters: np.ndarray, features: np.ndarray) -> np.ndarray:
    """exp(scale + exponents . features): the part of the loss above the floor."""
    return np.exp(np.clip(parameters[1] + features @ parameters[2:], -50, 50))


def _fit_law(weights: np.ndarray, y: np.ndarray, ridge: float) -> _MixingLaw:
    features, spread = _log_and_raw(weights), max(float(y.std()), 1e-12)
    shrink = ridge * np.eye(features.shape[1], features.shape[1] + 2, k=2)  # exponents only

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.r_[(_law(p, features) - y) / spread, shrink @ p]

    def jacobian(p: np.ndarray) -> np.ndarray:
        growth = _law_growth(p, features)[:, None] / spread
        fit = np.hstack([np.full_like(growth, 1 / spread), growth, growth * features])
        return np.vstack([fit, shrink])

    start = np.r_[y.min() - 0.1 * spread, np.log(spread), np.zeros(features.shape[1])]
    fit = least_squares(
        residuals, start, jac=jacobian, loss="soft_l1", f_scale=LAW_ROBUST_SCALE,
        x_scale="jac", max_nfev=LAW_MAX_EVALUATIONS,
    )
    return _MixingLaw(fit.x)
