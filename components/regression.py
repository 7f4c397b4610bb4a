"""Regression stage: predict a proxy's loss from its data mixture (RegMix, Liu et al. 2025).

Every setting is chosen from the training rows alone, by k-fold cross-validation (CV):
LightGBM's number of rounds (and, with `tune_trials`, its hyperparameters through Optuna),
the ridge penalty, the ensemble's blend weights, which model to use, and whether to leave out
the rows CV predicted worst (see OUTLIER_MADS). Fitted models are
saved in safe formats only (LightGBM's text model, JSON, .npy) so that loading one never
executes code.
"""


import hashlib
import itertools
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import lightgbm as lgb
import numpy as np
import optuna
from joblib import Parallel, cpu_count, delayed
from kfp import dsl
from scipy.optimize import least_squares
from scipy.stats import spearmanr
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import (
    ConstantKernel,
    DotProduct,
    Hyperparameter,
    Kernel,
    Matern,
    WhiteKernel,
)
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold

from components import component
from components.config import PER_DOMAIN, PER_DOMAIN_MAX_SECONDS, REGRESSION_MODELS
from components.files import replacing, write_text
from components.paper_data import ROW_SUM_TOLERANCE

MODELS = REGRESSION_MODELS
ENSEMBLE_MEMBERS = ("lightgbm", "gp", "law")
RIDGE_ALPHAS = np.logspace(-6, 3, 28)
# Zero weights are common (sparse Dirichlet mixtures); the GP and the mixing law work on
# log(w + eps), so the step from 0 to 0.1 % matters about as much as from 1 % to 10 %.
LOG_EPS = 1e-3
# The GP's kernel hyperparameters are fitted by marginal likelihood twice, once on each half
# of the rows (at most this many rows each: the gradient costs O(rows^2 x domains) memory,
# and a few hundred rows pin down the length scales). Each half's rows are then scored in CV
# with the kernel fitted on the other half, so the GP's CV is honest, and the final GP
# averages both kernels' posteriors, each conditioned on every training row.
GP_HYPERPARAMETER_ROWS = 256
# L-BFGS iterations per kernel fit. On the paper's data 30 give the same CV and test
# Spearman as 60 at half the time, which pays for fitting two kernels.
GP_OPTIMIZER_ITERATIONS = 30
# Below this many rows per half, a half's kernel is poorly pinned down (about two
# hyperparameters per domain): the final GP then uses one kernel fitted on all rows instead.
# On the paper's Pile-CC with 32 training rows that gives 95.5 % test Spearman (92 % with the
# half kernels); with 128 rows averaging the half kernels is better (99.3 against 99.1 %).
GP_MIN_HALF_ROWS = 64
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
# The ensemble's blend weights (one per member, summing to 1) are the point of this grid over
# the simplex with the lowest CV error.
ENSEMBLE_GRID_STEPS = 10
# Every proxy is one training run, and a few land far from what their mixture predicts (an
# unlucky seed; on the paper's data, a weight printed as 0.000 that was not 0 moves DM
# Mathematics' loss by a nat). One such row bends every model near it. So after the first fit,
# rows whose CV residual exceeds this many robust standard deviations (1.4826 x the median
# absolute deviation: under Gaussian noise about 1 row in 16,000) are left out and the models
# refitted; the refit is kept only if its CV Spearman, scored on every row, is higher. On the
# paper's 256 unseen mixtures it raises 11 of the 13 targets and lowers none (mean Spearman
# 99.37 -> 99.43 %, Pile-CC 99.61 -> 99.66 %; with 128 training rows, mean 99.08 -> 99.20 %).
OUTLIER_MADS = 4.0
OUTLIER_ROUNDS = 2
# Runs gone wrong are rare: when more rows than this share look like outliers, the model is
# what is wrong (a smooth loss fitted on few rows is off at the simplex's corners, and leaving
# those rows out would make it extrapolate there), so none are left out.
OUTLIER_MAX_SHARE = 0.1
LIGHTGBM_MAX_ROUNDS = 3000
LIGHTGBM_PATIENCE = 50
# CV early stopping counts a round as better only if it lowers the CV error (MSE) by this share
# of the target's variance. With a few dozen rows, tiny trees otherwise keep shaving the error
# for thousands of rounds (2,690 on 15 paper rows, against 533 with this floor, at the same CV
# error to 0.02 %), and every round costs at prediction time; on 512 rows it changes nothing.
LIGHTGBM_MIN_GAIN = 1e-4
# Mixtures predicted per batch: a GP's kernel between a batch and 512 training rows, and its
# intermediates, then take tens of MB instead of GBs for 100k mixtures at once (2.8 GB peak
# for the paper recipe on a 13-part per-domain model of the paper's 512 proxies).
PREDICT_BATCH_ROWS = 8192
REGRESSOR_FILE, TRAIN_WEIGHTS_FILE = "regressor.json", "train_weights.npy"
DOMAIN_INTERACTION_PLOT = "domain_interaction.png"
PROXY_RESULTS_FILE = "proxy_results.json"  # beside the model: what it was fitted on


@dataclass
class FitReport:
    model: str  # chosen model name
    cv_spearman: float  # k-fold CV Spearman on training rows (out-of-fold predictions)
    cv_rmse: float
    cv_by_model: dict[str, float]  # CV Spearman of every candidate tried
    seconds: float
    out_of_fold: np.ndarray = field(repr=False)  # the chosen model's CV predictions, row by row
    settings: dict[str, object] = field(default_factory=dict)  # what CV chose, for logging

    @property
    def left_out(self) -> list[int]:
        """Rows left out of the fit as outliers (see OUTLIER_MADS); any part's, per domain."""
        rows = set(self.settings.get("outlier_rows", []))
        for part in self.settings.get("parts", []):
            rows.update(part.get("outlier_rows", []))
        return sorted(rows)


class _Member(Protocol):
    """One fitted model inside a Regressor."""

    kind: str

    def predict(self, weights: np.ndarray) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...


@dataclass
class _LightGBM:
    booster: lgb.Booster
    kind: str = "lightgbm"

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return self.booster.predict(weights)

    def save(self, directory: Path) -> None:
        self.booster.save_model(directory / "model.txt")

    @classmethod
    def load(cls, directory: Path) -> "_LightGBM":
        text = (directory / "model.txt").read_text()
        # LightGBM aborts the whole process (C++ terminate) on some truncated files
        if "end of trees" not in text:
            raise ValueError(f"{directory / 'model.txt'} is incomplete (no 'end of trees')")
        return cls(lgb.Booster(model_str=text))


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


def _log_and_raw(weights: np.ndarray) -> np.ndarray:
    """The GP's and the law's features: log-weights, then the raw weights."""
    return np.hstack([np.log(weights + LOG_EPS), weights])


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


class _OnColumns(Kernel):
    """`kernel` applied to the input columns start..stop only (sklearn has no active dims)."""

    def __init__(self, kernel: Kernel, start: int, stop: int):
        self.kernel = kernel
        self.start = start
        self.stop = stop

    @property
    def hyperparameters(self) -> list[Hyperparameter]:
        return [
            Hyperparameter(f"kernel__{h.name}", h.value_type, h.bounds, h.n_elements)
            for h in self.kernel.hyperparameters
        ]

    @property
    def theta(self) -> np.ndarray:
        return self.kernel.theta

    @theta.setter
    def theta(self, theta: np.ndarray) -> None:
        self.kernel.theta = theta

    @property
    def bounds(self) -> np.ndarray:
        return self.kernel.bounds

    def get_params(self, deep: bool = True) -> dict[str, object]:
        params = {"kernel": self.kernel, "start": self.start, "stop": self.stop}
        if deep:
            params.update((f"kernel__{k}", v) for k, v in self.kernel.get_params().items())
        return params

    def __call__(self, X, Y=None, eval_gradient=False):
        columns = slice(self.start, self.stop)
        return self.kernel(X[:, columns], None if Y is None else Y[:, columns], eval_gradient)

    def diag(self, X: np.ndarray) -> np.ndarray:
        return self.kernel.diag(X[:, self.start : self.stop])

    def is_stationary(self) -> bool:
        return self.kernel.is_stationary()

    @property
    def requires_vector_input(self) -> bool:
        return True


def _gp_kernel(domains: int) -> Kernel:
    # ARD Matern on log-weights: one length scale per domain, so irrelevant domains get long
    # ones. Plus a linear kernel on the raw weights: a loss that keeps falling linearly as a
    # domain's share grows is a trend the Matern, whose length scales are set by the small
    # weights' log behaviour, otherwise pulls back to the mean. On the paper's 13 targets it
    # raises the GP's mean CV Spearman from 99.09 to 99.15 % (no target drops by more than
    # 0.01 points) at about 1.3x the fitting time.
    matern = Matern(length_scale=np.full(domains, 5.0), length_scale_bounds=(1e-1, 1e4), nu=2.5)
    linear = DotProduct(1.0, (1e-3, 1e3))
    return (
        ConstantKernel(1.0, (1e-3, 1e3)) * _OnColumns(matern, 0, domains)
        + ConstantKernel(0.1, (1e-4, 1e3)) * _OnColumns(linear, domains, 2 * domains)
        + WhiteKernel(1e-2, (1e-8, 1.0))
    )


def _gp_posterior(
    theta: np.ndarray, weights: np.ndarray, y: np.ndarray
) -> GaussianProcessRegressor:
    """The GP with fixed kernel hyperparameters `theta`, conditioned on (weights, y)."""
    kernel = _gp_kernel(weights.shape[1]).clone_with_theta(theta)
    gp = GaussianProcessRegressor(kernel, optimizer=None, normalize_y=True)
    return gp.fit(_log_and_raw(weights), y)


def _fit_gp_theta(
    weights: np.ndarray, y: np.ndarray, seed: int, start: np.ndarray | None = None
) -> np.ndarray:
    """Kernel hyperparameters (log scale) by maximum marginal likelihood; from `start` (a
    kernel fitted on nearly the same rows), a third of the iterations."""
    rows = np.random.default_rng(seed).permutation(len(y))[:GP_HYPERPARAMETER_ROWS]

    def optimizer(objective, initial_theta, bounds):
        from scipy.optimize import minimize

        iterations = GP_OPTIMIZER_ITERATIONS if start is None else GP_OPTIMIZER_ITERATIONS // 3
        options = {"maxiter": iterations}
        result = minimize(
            objective, initial_theta, method="L-BFGS-B", jac=True, bounds=bounds, options=options
        )
        return result.x, result.fun

    kernel = _gp_kernel(weights.shape[1])
    if start is not None:
        kernel = kernel.clone_with_theta(start)
    gp = GaussianProcessRegressor(kernel, optimizer=optimizer, normalize_y=True)
    with warnings.catch_warnings():
        # A length scale at its upper bound just means "this domain does not matter".
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(_log_and_raw(weights[rows]), y[rows])
    return gp.kernel_.theta


@dataclass
class _PosteriorMean:
    """A conditioned GP's posterior mean (`_gp_kernel`'s structure), computed in one fused pass
    over the (mixtures x proxies) Matern matrix, the linear part folded into one vector and the
    white noise (zero between distinct points) left out. It equals sklearn's `predict` to
    ~1e-12, several times faster: sklearn builds, then sums and multiplies, a dozen full
    matrices, which made the paper recipe's 100k predictions on a 13-part per-domain model a
    minute."""

    scaled_train: np.ndarray  # training log-weights / length scales
    scaled_train_norms: np.ndarray  # their squared norms, for the distances
    length_scale: np.ndarray
    matern_scale: float
    alpha: np.ndarray  # K^-1 y (normalised y)
    linear_weights: np.ndarray  # raw training weights^T alpha, scaled
    linear_offset: float
    y_mean: float
    y_std: float

    @classmethod
    def of(cls, gp: GaussianProcessRegressor, y: np.ndarray) -> "_PosteriorMean":
        """`gp` conditioned (with normalize_y) on the targets `y`."""
        domains = gp.X_train_.shape[1] // 2
        params = gp.kernel_.get_params()
        matern = params["k1__k1__k2__kernel"]
        if matern.nu != 2.5:
            raise ValueError(f"the fused posterior mean is for Matern nu=2.5, not {matern.nu}")
        length_scale = np.asarray(matern.length_scale, dtype=float)
        scaled_train = gp.X_train_[:, :domains] / length_scale
        alpha = gp.alpha_.ravel()
        linear_scale = params["k1__k2__k1__constant_value"]
        sigma_0 = params["k1__k2__k2__kernel__sigma_0"]
        return cls(
            scaled_train, (scaled_train**2).sum(axis=1), length_scale,
            params["k1__k1__k1__constant_value"], alpha,
            linear_scale * gp.X_train_[:, domains:].T @ alpha,
            linear_scale * sigma_0**2 * alpha.sum(),
            float(np.mean(y)), float(np.std(y)),  # how normalize_y scales (y varies: checked)
        )

    def __call__(self, features: np.ndarray) -> np.ndarray:
        domains = len(self.length_scale)
        scaled = features[:, :domains] / self.length_scale
        # Squared distances by one matrix product (BLAS; scipy's cdist is 5x slower here). Its
        # rounding near zero distance is harmless: Matern 5/2 is flat there.
        r = scaled @ self.scaled_train.T
        r *= -2.0
        r += (scaled**2).sum(axis=1)[:, None]
        r += self.scaled_train_norms
        np.maximum(r, 0.0, out=r)
        r *= 5.0
        np.sqrt(r, out=r)  # sqrt(5) d
        matern = np.exp(-r)
        matern *= 1.0 + r + r * r / 3.0  # Matern 5/2: (1 + r + r^2/3) exp(-r), r = sqrt(5) d
        mean = self.matern_scale * (matern @ self.alpha)
        mean += features[:, domains:] @ self.linear_weights + self.linear_offset
        return self.y_std * mean + self.y_mean


@dataclass
class _GaussianProcess:
    """The mean of GP posteriors that differ only in their kernel hyperparameters."""

    thetas: list[np.ndarray]  # fitted kernel hyperparameters, log scale (sklearn's Kernel.theta)
    weights: np.ndarray  # training mixtures the posteriors are conditioned on
    y: np.ndarray
    kind: str = "gp"

    def __post_init__(self) -> None:
        self._gps = [_gp_posterior(theta, self.weights, self.y) for theta in self.thetas]
        self._means = [_PosteriorMean.of(gp, self.y) for gp in self._gps]

    def predict(self, weights: np.ndarray) -> np.ndarray:
        features = _log_and_raw(weights)
        return np.mean([mean(features) for mean in self._means], axis=0)

    def save(self, directory: Path) -> None:
        state = {
            "thetas": [theta.tolist() for theta in self.thetas],
            "kernels": [str(gp.kernel_) for gp in self._gps],  # for people reading the file
        }
        (directory / "kernel.json").write_text(json.dumps(state))
        np.save(directory / "weights.npy", self.weights)
        np.save(directory / "y.npy", self.y)

    @classmethod
    def load(cls, directory: Path) -> "_GaussianProcess":
        state = json.loads((directory / "kernel.json").read_text())
        thetas = [np.array(theta) for theta in state.get("thetas", [state.get("theta")])]
        weights = np.load(directory / "weights.npy", allow_pickle=False)
        expected = _gp_kernel(weights.shape[1]).n_dims
        if any(theta.shape != (expected,) for theta in thetas):  # an older kernel's
            raise ValueError(f"{directory / 'kernel.json'}: the kernel's hyperparameters do not "
                             f"fit this version's GP ({expected} per kernel)")
        return cls(thetas, weights, np.load(directory / "y.npy", allow_pickle=False))


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

    def save(self, directory: Path) -> None:
        """Write the model as one folder that appears whole or not at all."""
        with replacing(directory) as folder:
            folder.mkdir(parents=True)
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
    def load(cls, directory: Path) -> "Regressor":
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


def _spearman(y: np.ndarray, predicted: np.ndarray) -> float:
    rho = spearmanr(y, predicted)[0]
    return 0.0 if np.isnan(rho) else float(rho)  # constant predictions rank nothing


def _rmse(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - predicted) ** 2)))


def best_row(y: np.ndarray, left_out: list[int]) -> int:
    """The row of the lowest target, among those not left out: a proxy left out as an outlier
    is no evidence of what its mixture gives, so never the best training proxy."""
    trusted = np.delete(np.arange(len(y)), left_out)
    return int(trusted[np.argmin(y[trusted])])


def _fit_summary(y: np.ndarray, out_of_fold: np.ndarray, left_out: list[int]) -> dict[str, float]:
    best = best_row(y, left_out)
    return {"cv_spearman": _spearman(y, out_of_fold), "cv_rmse": _rmse(y, out_of_fold),
            "best_train_target": float(y[best]), "best_train_row": best}


def _lightgbm_defaults(rows: int, seed: int) -> dict[str, object]:
    # min_data_in_leaf scales with the rows so that 20-row folds can still split.
    return {
        "objective": "regression",
        "learning_rate": 0.05,
        "num_leaves": 15,
        "min_data_in_leaf": int(np.clip(rows // 25, 2, 20)),
        "min_data_in_bin": 1,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "feature_pre_filter": False,
        "deterministic": True,
        "num_threads": 1,
        "seed": seed,
        "verbosity": -1,
    }


def _lightgbm_cv(
    weights: np.ndarray, y: np.ndarray, params: dict[str, object], splits: list
) -> tuple[int, np.ndarray]:
    """Rounds by CV early stopping, and the out-of-fold predictions at that many rounds."""
    result = lgb.cv(
        params,
        lgb.Dataset(weights, y, params={"verbosity": -1}),
        num_boost_round=LIGHTGBM_MAX_ROUNDS,
        folds=splits,
        callbacks=[lgb.early_stopping(LIGHTGBM_PATIENCE, verbose=False,
                                      min_delta=LIGHTGBM_MIN_GAIN * float(np.var(y)))],
        return_cvbooster=True,
    )
    boosters = result["cvbooster"]
    rounds = boosters.best_iteration
    out_of_fold = np.empty_like(y)
    for booster, (_, held_out) in zip(boosters.boosters, splits, strict=True):
        out_of_fold[held_out] = booster.predict(weights[held_out], num_iteration=rounds)
    return rounds, out_of_fold


def _suggest_lightgbm(trial: optuna.Trial, rows: int) -> dict[str, object]:
    """The tuned part of LightGBM's settings: Optuna's search space."""
    return {
        # Below 0.02, rounds (and seconds) grow with no gain in CV error on the paper's data.
        "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 3, 63, log=True),
        "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 2, max(3, rows // 8)),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.4, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 30.0, log=True),
    }


def _tune_lightgbm(
    weights: np.ndarray, y: np.ndarray, splits: list, seed: int, trials: int
) -> tuple[dict[str, object], int, np.ndarray]:
    """Optuna TPE over LightGBM's settings, scored by CV mean squared error.

    Returns the best settings, their rounds and their out-of-fold predictions.
    """
    defaults = _lightgbm_defaults(len(y), seed)
    found: dict[int, tuple[dict[str, object], int, np.ndarray]] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {**defaults, **_suggest_lightgbm(trial, len(y))}
        rounds, out_of_fold = _lightgbm_cv(weights, y, params, splits)
        found[trial.number] = (params, rounds, out_of_fold)
        return float(np.mean((y - out_of_fold) ** 2))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    # Start from the defaults so tuning can only improve on the untuned CV score.
    tuned = _suggest_lightgbm(optuna.trial.FixedTrial(defaults), len(y))
    study.enqueue_trial(tuned)
    study.optimize(objective, n_trials=trials)
    return found[study.best_trial.number]


def _cross_fit(fit_predict, weights: np.ndarray, y: np.ndarray, splits: list) -> np.ndarray:
    """Out-of-fold predictions of `fit_predict(train_weights, train_y, held_out_weights)`."""
    out_of_fold = np.empty_like(y)
    for train, held_out in splits:
        out_of_fold[held_out] = fit_predict(weights[train], y[train], weights[held_out])
    return out_of_fold


def _blend_weights(out_of_fold: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The point of a grid over the simplex (one weight per row of `out_of_fold`) whose blend
    of the members' out-of-fold predictions has the lowest CV mean squared error."""
    steps = ENSEMBLE_GRID_STEPS
    grid = np.array(
        [c for c in itertools.product(range(steps + 1), repeat=len(out_of_fold)) if sum(c) == steps]
    ) / steps
    errors = np.mean((grid @ out_of_fold - y) ** 2, axis=1)
    return grid[int(np.argmin(errors))]


@dataclass
class _Candidates:
    """One CV pass over the candidate models on some of the rows (`kept`)."""

    chosen: str
    cv_by_model: dict[str, float]  # CV Spearman on every row
    out_of_fold: np.ndarray  # the chosen model's
    kept: np.ndarray  # rows the models were fitted on
    linear: _Linear  # the ridge on the kept rows, for the domain-interaction analysis
    members: list[Callable[[], _Member]]  # build the chosen members, fitted on the kept rows
    member_weights: list[float] | None
    settings: dict[str, object]
    half_thetas: list[np.ndarray] | None  # the GP's kernels cross-fitted on halves, if fitted


def _fit_ridge(weights: np.ndarray, y: np.ndarray) -> _Linear:
    # RidgeCV picks the penalty by efficient leave-one-out CV on the rows it is given.
    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(weights, y)
    return _Linear(ridge.coef_, float(ridge.intercept_), float(ridge.alpha_))


def _fit_candidates(
    weights: np.ndarray,
    y: np.ndarray,
    splits: list,
    candidates: tuple[str, ...],
    blended: tuple[str, ...],
    seed: int,
    tune_trials: int,
    kept: np.ndarray,
    lightgbm_params: dict[str, object] | None = None,
    gp_starts: list[np.ndarray] | None = None,
) -> _Candidates:
    """Every candidate's out-of-fold predictions on all rows, each fitted on the `kept` rows of
    the other folds; the law's penalty and the blend chosen by CV error on the kept rows
    (LightGBM's early stopping watches every held-out row).
    `lightgbm_params` and `gp_starts` carry a previous pass's tuned LightGBM settings and GP
    half kernels (the kernels are refitted from there)."""
    needed = set(candidates) | (set(blended) if "ensemble" in candidates else set())
    folds = [(train[kept[train]], held_out) for train, held_out in splits]
    fitted_weights, fitted_y = weights[kept], y[kept]
    out_of_fold: dict[str, np.ndarray] = {}
    final: dict[str, object] = {}  # kind -> zero-argument builder of the member on kept rows
    settings: dict[str, object] = {}
    half_thetas = None

    def error(predicted: np.ndarray) -> float:
        return float(np.mean((predicted[kept] - y[kept]) ** 2))

    linear = _fit_ridge(fitted_weights, fitted_y)
    if "linear" in needed:
        out_of_fold["linear"] = _cross_fit(
            lambda w, t, held_out: _fit_ridge(w, t).predict(held_out), weights, y, folds
        )
        final["linear"] = lambda: linear
        settings["linear_alpha"] = linear.alpha
    if "lightgbm" in needed:
        if lightgbm_params is None and tune_trials > 0:
            params, rounds, out_of_fold["lightgbm"] = _tune_lightgbm(
                weights, y, folds, seed, tune_trials
            )
        else:
            params = lightgbm_params or _lightgbm_defaults(len(fitted_y), seed)
            rounds, out_of_fold["lightgbm"] = _lightgbm_cv(weights, y, params, folds)
        final["lightgbm"] = lambda: _LightGBM(
            lgb.train(params, lgb.Dataset(fitted_weights, fitted_y), rounds)
        )
        settings["lightgbm"] = {**params, "rounds": rounds}
    if "gp" in needed:
        # A kernel fitted on all rows has seen every held-out label, which flatters the GP in
        # CV (and so in the choice of model and blend); cross-fitting on halves does not.
        halves = np.array_split(np.random.default_rng(seed).permutation(len(y)), 2)
        half_thetas = [
            _fit_gp_theta(weights[half[kept[half]]], y[half[kept[half]]], seed, start)
            for half, start in zip(halves, gp_starts or [None, None], strict=True)
        ]
        out_of_fold["gp"] = np.empty_like(y)
        for scored, theta in zip(halves, half_thetas[::-1], strict=True):
            predicted = _cross_fit(
                lambda w, t, held_out, theta=theta: _gp_posterior(theta, w, t).predict(
                    _log_and_raw(held_out)
                ),
                weights,
                y,
                folds,
            )
            out_of_fold["gp"][scored] = predicted[scored]
        thetas = half_thetas
        if len(fitted_y) < 2 * GP_MIN_HALF_ROWS:
            thetas = [_fit_gp_theta(fitted_weights, fitted_y, seed)]
        final["gp"] = lambda: _GaussianProcess(thetas, fitted_weights, fitted_y)
        settings["gp_thetas"] = [theta.tolist() for theta in thetas]
    if "law" in needed:
        by_ridge = {
            ridge: _cross_fit(
                lambda w, t, held_out, ridge=ridge: _fit_law(w, t, ridge).predict(held_out),
                weights,
                y,
                folds,
            )
            for ridge in LAW_RIDGES
        }
        ridge = min(by_ridge, key=lambda r: error(by_ridge[r]))
        out_of_fold["law"] = by_ridge[ridge]
        final["law"] = lambda: _fit_law(fitted_weights, fitted_y, ridge)
        settings["law_ridge"] = ridge
    blend = None
    if "ensemble" in candidates:
        members = np.stack([out_of_fold[kind] for kind in blended])
        blend = _blend_weights(members[:, kept], y[kept])
        out_of_fold["ensemble"] = blend @ members
        settings["ensemble_weights"] = dict(zip(blended, blend.tolist(), strict=True))

    # Scored on every row, the left-out ones too: so fits on different rows compare.
    cv_by_model = {name: _spearman(y, out_of_fold[name]) for name in candidates}
    chosen = max(cv_by_model, key=cv_by_model.get)
    kinds, shares = (chosen,), None
    if chosen == "ensemble":  # members CV gave no weight are left out
        kinds = tuple(k for k, share in zip(blended, blend, strict=True) if share > 0)
        shares = [float(share) for share in blend if share > 0]
    return _Candidates(chosen, cv_by_model, out_of_fold[chosen], kept, linear,
                       [final[kind] for kind in kinds], shares, settings,
                       half_thetas)


def _outliers(y: np.ndarray, out_of_fold: np.ndarray) -> np.ndarray:
    """Rows whose CV residual is more than OUTLIER_MADS robust standard deviations out."""
    residual = y - out_of_fold
    spread = 1.4826 * np.median(np.abs(residual - np.median(residual)))
    return np.abs(residual) > OUTLIER_MADS * spread


def fit_regressor(
    weights: np.ndarray,
    y: np.ndarray,
    domains: list[str],
    model: str = "auto",
    folds: int = 5,
    seed: int = 0,
    tune_trials: int = 0,
) -> tuple[Regressor, FitReport]:
    """Fit one target's loss from mixture weights; `model="auto"` picks the best by CV.

    Out-of-fold predictions come from `folds`-fold CV on these rows (capped at the number of
    rows). One shortcut keeps this fast, slightly optimistic for LightGBM: its rounds are
    chosen by early stopping on the same folds. The GP's CV is honest: its kernel is
    cross-fitted on halves of the rows (see GP_HYPERPARAMETER_ROWS).

    Then the rows CV predicted worst (see OUTLIER_MADS) are left out and everything is fitted
    again, up to OUTLIER_ROUNDS times, as long as CV Spearman on every row rises.
    """
    start = time.perf_counter()
    weights = np.asarray(weights, dtype=float)
    y = np.asarray(y, dtype=float)
    if model not in (*MODELS, "auto"):
        raise ValueError(f"unknown model '{model}'; choose one of {(*MODELS, 'auto')}")
    if weights.ndim != 2 or weights.shape != (len(y), len(domains)):
        raise ValueError(
            f"weights {weights.shape} must be (rows, domains) = ({len(y)}, {len(domains)})"
        )
    if len(y) < 3 or not (np.isfinite(weights).all() and np.isfinite(y).all()):
        raise ValueError(f"need at least 3 rows of finite weights and targets, got {len(y)}")
    _check_varies(y)

    splits = list(KFold(min(folds, len(y)), shuffle=True, random_state=seed).split(weights))
    candidates = MODELS if model == "auto" else (model,)
    # The law joins `auto` and the ensemble only with enough rows per parameter: below that it
    # overfits while CV on a few held-out rows can still look good (on the paper's Pile-CC
    # with 32 rows: CV Spearman 0.86, unseen mixtures 0.57).
    blended = ENSEMBLE_MEMBERS
    if len(y) < LAW_MIN_ROWS_PER_PARAMETER * _law_parameter_count(len(domains)):
        blended = tuple(kind for kind in ENSEMBLE_MEMBERS if kind != "law")
        candidates = tuple(kind for kind in candidates if kind != "law" or model == "law")
    fit = _fit_candidates(weights, y, splits, candidates, blended, seed, tune_trials,
                          np.ones(len(y), dtype=bool))
    for _ in range(OUTLIER_ROUNDS):
        outliers = _outliers(y, fit.out_of_fold)
        if outliers.sum() > OUTLIER_MAX_SHARE * len(y) or (outliers == ~fit.kept).all():
            break
        # Tuned LightGBM settings carry over (tuning again would double the fit's time), and
        # the GP's kernels are refitted from the last ones with a third of the iterations.
        tuned = None
        if tune_trials > 0 and "lightgbm" in fit.settings:
            tuned = {k: v for k, v in fit.settings["lightgbm"].items() if k != "rounds"}
        trimmed = _fit_candidates(weights, y, splits, candidates, blended, seed, tune_trials,
                                  ~outliers, tuned, fit.half_thetas)
        # (A constant prediction scores Spearman 0: never an improvement, whatever came before.)
        if trimmed.cv_by_model[trimmed.chosen] <= max(fit.cv_by_model[fit.chosen], 0.0):
            break
        fit = trimmed
    left_out = np.flatnonzero(~fit.kept).tolist()
    settings = {**fit.settings, "outlier_rows": left_out}
    regressor = Regressor(
        fit.chosen,
        list(domains),
        [build() for build in fit.members],
        fit.linear.by_domain(domains),
        weights,
        fit.member_weights,
        _fit_summary(y, fit.out_of_fold, left_out),
    )
    report = FitReport(
        model=fit.chosen,
        cv_spearman=fit.cv_by_model[fit.chosen],
        cv_rmse=_rmse(y, fit.out_of_fold),
        cv_by_model=fit.cv_by_model,
        seconds=time.perf_counter() - start,
        out_of_fold=fit.out_of_fold,
        settings=settings,
    )
    return regressor, report


def check_target(losses: np.ndarray, shares: np.ndarray, model: str) -> None:
    """Raise ValueError, saying why, if `model` cannot fit the target `losses @ shares`: cheap,
    so that a caller fitting several targets can check them all before fitting any."""
    if losses.shape[1] != len(shares):
        raise ValueError(f"{losses.shape[1]} loss columns for {len(shares)} target shares")
    _check_varies(losses @ shares)
    if model == PER_DOMAIN and len(shares) < 2:
        raise ValueError("model 'per-domain' needs a target over several loss columns (a "
                         "weighted mean); this target has one: choose another model")
    constant = _constant_columns(losses)
    if model == PER_DOMAIN and constant.size:
        raise ValueError(f"model 'per-domain': loss column {constant[0] + 1} of {len(shares)} in "
                         f"the target is the same ({losses[0, constant[0]]:g}) on every row, so it "
                         "has nothing to fit; check that it was measured, or choose another model")


# Differences below this share of a target's size are rounding, not measurement: a loss that
# varies by 1e-12 would still "fit", with a CV Spearman of noise.
CONSTANT_SPREAD = 1e-9


def _constant_columns(losses: np.ndarray) -> np.ndarray:
    """Loss columns measured the same on every proxy: nothing to fit on their own."""
    size = np.abs(losses).max(axis=0)
    return np.flatnonzero(np.ptp(losses, axis=0) <= CONSTANT_SPREAD * size)


def _check_varies(y: np.ndarray) -> None:
    if _constant_columns(y[:, None]).size:
        raise ValueError(f"the target is the same ({y[0]:g}) on every row (to {CONSTANT_SPREAD:g} "
                         "of its size): there is nothing to rank mixtures by; check that the loss "
                         "column was measured")


def fit_target(
    weights: np.ndarray,
    losses: np.ndarray,
    shares: np.ndarray,
    domains: list[str],
    model: str = "auto",
    folds: int = 5,
    seed: int = 0,
    tune_trials: int = 0,
    per_domain_max_seconds: float = PER_DOMAIN_MAX_SECONDS,
) -> tuple[Regressor, FitReport]:
    """Fit a target that is a weighted sum of loss columns: `losses` (rows, columns) @ `shares`.

    A target over several columns (the mean loss over domains, say) can also be fitted one
    column at a time: one regressor per domain's loss, summed with the target's shares.
    `auto` keeps that per-domain model when its CV Spearman on the target beats the best
    model fitted on the target itself; `per-domain` always uses it. Why it helps: one
    domain's loss is a simple function of the mixture (mostly a log-like gain in its own
    weight), while a mean over 17 domains adds up 17 such shapes, more than a few dozen proxies
    can resolve as one function; per domain, every proxy gives 17 measurements instead of one.
    On the paper's data, for the mean of its 13 validation domains, Spearman on the 256 unseen
    mixtures rises from 0.965 to 0.992 with 128 proxies; on tinypile's 17 domains with 40
    proxies, predicting 14 fresh proxies' mean loss, from 0.62 to 0.76.

    The parts cost about one fit each. `auto` skips them (and says so in the report's settings)
    when that would take longer than `per_domain_max_seconds`, judged by the time of the fit
    on the target itself: 100 domains x 1000 proxies take about 107 s a fit on 2 cores, so 100
    parts about 90 minutes there (11 on 16 cores), while the paper's 13 x 512 take about a minute.
    """
    start = time.perf_counter()
    losses, shares = np.asarray(losses, dtype=float), np.asarray(shares, dtype=float)
    check_target(losses, shares, model)
    y = losses @ shares
    constant = _constant_columns(losses)
    whole = None  # (regressor, report) fitted on the target itself, unless per-domain is forced
    if model != PER_DOMAIN:
        whole = fit_regressor(weights, y, domains, model, folds, seed, tune_trials)
        whole_report = whole[1]
        if model != "auto" or len(shares) < 2 or constant.size:
            return whole
        estimate = whole_report.seconds * len(shares) / min(cpu_count(), len(shares))
        if estimate > per_domain_max_seconds:
            whole_report.settings["per_domain"] = (
                f"not tried: {len(shares)} parts would take about {estimate:.0f} s, more than "
                f"{per_domain_max_seconds:g} s; raise regression.per_domain_max_seconds "
                "(`regmix fit --per-domain-max-seconds`) or force it with model per-domain")
            return whole
    # The parts are independent fits, so they run a process per core (loky counts the CPUs a
    # pod's quota allows, not the node's); each is seeded, so the result does not depend on it.
    parts = Parallel(n_jobs=-1)(
        delayed(fit_regressor)(weights, column, domains, "auto", folds, seed, tune_trials)
        for column in losses.T
    )
    out_of_fold = np.stack([report.out_of_fold for _, report in parts], axis=1) @ shares
    cv = _spearman(y, out_of_fold)
    cv_by_model = {**(whole_report.cv_by_model if whole else {}), PER_DOMAIN: cv}
    if whole is not None and whole_report.cv_spearman >= cv:
        whole_report.cv_by_model, whole_report.seconds = cv_by_model, time.perf_counter() - start
        return whole
    # The domain-interaction analysis is of the target itself: the one-model fit made its ridge.
    coefficients = whole[0].linear_coefficients if whole else _fit_ridge(weights, y).by_domain(domains)
    report = FitReport(
        model=PER_DOMAIN, cv_spearman=cv, cv_rmse=_rmse(y, out_of_fold), cv_by_model=cv_by_model,
        seconds=time.perf_counter() - start, out_of_fold=out_of_fold,
        settings={"parts": [{"model": r.model, "cv_spearman": r.cv_spearman, **r.settings}
                            for _, r in parts]},
    )
    regressor = Regressor(PER_DOMAIN, list(domains), [part for part, _ in parts], coefficients,
                          np.asarray(weights, dtype=float), shares.tolist(),
                          _fit_summary(y, out_of_fold, report.left_out))
    return regressor, report


# The packages a logged regressor model needs where it is loaded (`components` itself travels
# with it as code): what `components.regression` imports.
MLFLOW_MODEL_PACKAGES = ("numpy", "scipy", "scikit-learn", "lightgbm", "optuna", "joblib", "kfp",
                         "pydantic", "pyyaml")


class _PyfuncRegressor:
    """What `mlflow.pyfunc.load_model` gives for a logged regressor: `predict` takes a table
    of mixture weights (a column per domain, in any order) and returns the predicted loss."""

    def __init__(self, folder: str):
        self.regressor = Regressor.load(Path(folder))

    def predict(self, model_input, params=None) -> np.ndarray:
        return self.regressor.predict(np.asarray(model_input[self.regressor.domains], dtype=float))


def _load_pyfunc(data_path: str) -> _PyfuncRegressor:
    """mlflow.pyfunc's loader hook for models logged before `pyfunc_loader` (their
    `loader_module` is this module)."""
    return _PyfuncRegressor(data_path)


def code_digest(package: Path) -> str:
    """A hash of a package's Python sources: names the loader of models logged with this code."""
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def log_mlflow_model(folder: Path, regressor: Regressor) -> None:
    """Log the saved regressor `folder` to the active run as an MLflow pyfunc model: loadable
    with `mlflow.pyfunc.load_model`, registrable and servable, with a signature naming the
    domains. Its data is the folder as saved (LightGBM text, JSON, .npy): nothing is pickled.
    Its code is this `components` package, loaded apart from any other (see pyfunc_loader)."""
    from importlib.metadata import version

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    package = Path(__file__).parent
    example = pd.DataFrame(regressor.train_weights[:3], columns=regressor.domains)
    with tempfile.TemporaryDirectory() as scratch:
        loader = Path(scratch) / f"regmix_regressor_{code_digest(package)}.py"
        shutil.copyfile(package / "pyfunc_loader.py", loader)
        mlflow.pyfunc.log_model(
            name="regressor", loader_module=loader.stem, data_path=str(folder),
            code_paths=[str(package), str(loader)],
            pip_requirements=[f"{name}=={version(name)}" for name in MLFLOW_MODEL_PACKAGES],
            signature=infer_signature(example, regressor.predict(example.to_numpy())),
            input_example=example,
        )


def domain_interactions(weights: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Ridge coefficients of each loss column on the mixture weights, a row per column: the
    paper's domain-interaction analysis (which domains' data lowers which validation loss)."""
    return np.stack([_fit_ridge(weights, column).coefficients for column in losses.T])


def plot_fit(folder: Path, target: str, y: np.ndarray, report: FitReport) -> Path:
    """The fit's out-of-fold predictions against the measured target."""
    from components import plots

    title = f"{target}\n{report.model}, CV Spearman {report.cv_spearman:.4f}"
    return plots.predicted_vs_measured(y, report.out_of_fold, title,
                                       folder / "predicted_vs_measured.png")


def plot_domain_interactions(folder: Path, weights: np.ndarray, domains: list[str],
                             losses: dict[str, np.ndarray]) -> Path:
    """The domain interactions of every validation loss in `losses` (name -> value per row)."""
    from components import plots

    coefficients = domain_interactions(weights, np.column_stack(list(losses.values())))
    return plots.domain_interaction(coefficients, list(losses), domains,
                                    folder / DOMAIN_INTERACTION_PLOT)


# ---------------------------------------------------------------- the pipeline stage
def proxy_matrix(results: list[dict], domains: list[str], target: dict[str, float]):
    """Proxy results as (weights matrix, the target's loss columns, their shares in the target),
    the weights in the corpus's domain order."""
    weights = np.array([[r["weights"][d] for d in domains] for r in results])
    losses = np.array([[r["val_loss"][d] for d in target] for r in results])
    return weights, losses, np.array(list(target.values()), dtype=float)


def finished_proxies(results: list[dict], min_fraction: float) -> list[dict]:
    """The finished proxies, if enough finished; otherwise a clear error that keeps them."""
    finished = [r for r in results if "error" not in r]
    if len(finished) < min_fraction * len(results):
        failures = "; ".join(f"{r['id']}: {r['error']}" for r in results if "error" in r)
        raise RuntimeError(
            f"only {len(finished)} of {len(results)} proxies finished, fewer than "
            f"regression.min_proxy_fraction={min_fraction}. Failures: {failures}. The finished "
            "ones are in MLflow and a rerun reuses them, training only the missing proxies."
        )
    return finished


def learning_curve(weights: np.ndarray, losses: np.ndarray, shares: np.ndarray,
                   domains: list[str], model: str, folds: int, seed: int,
                   full_cv: float) -> list[list[float]]:
    """CV Spearman on growing subsets of the proxies: how much more proxies would help.

    The last point is every proxy: `full_cv`, the CV of the fit itself, not fitted again."""
    n = len(losses)
    sizes = sorted({max(folds * 2, round(n * f)) for f in (0.25, 0.5, 0.75)})
    order = np.random.default_rng(seed).permutation(n)
    curve = []
    for size in (s for s in sizes if s < n):
        rows = order[:size]
        _, report = fit_target(weights[rows], losses[rows], shares, domains, model=model,
                               folds=folds, seed=seed)
        curve.append([size, report.cv_spearman])
    return [*curve, [n, full_cv]]


def left_out_record(report: FitReport, target: dict[str, float], losses: np.ndarray,
                    row: int) -> dict:
    """What `left_out_proxies.json` says of a proxy left out: its target and CV prediction, and
    for a per-domain model the domains whose fit left it out (the target may look fine)."""
    record = {"target": float(losses[row]), "cv_predicted": float(report.out_of_fold[row])}
    if report.model == PER_DOMAIN:
        record["left_out_by"] = [domain for domain, part in zip(target, report.settings["parts"],
                                                                 strict=True)
                                 if row in part["outlier_rows"]]
    return record


def fit_and_log(cfg, every: list[dict], data_meta: dict, tracking: dict, out: Path,
                run_name: str) -> dict:
    """Fit mixture -> target loss on every finished proxy result; save the model (with the
    results it was fitted on) to `out`; log CV quality and the model. Returns the fit report."""
    import mlflow

    from components.tracking import stage_run

    domains = data_meta["domains"]
    target = cfg.regression.target_weights(domains)
    # KFP does not promise the order of a ParallelFor's collected outputs, and the folds, the
    # GP's halves and LightGBM's bagging follow row order: the fit depends on results alone.
    every = sorted(every, key=lambda r: r["id"])
    with stage_run(tracking, "regression", run_name):
        failed = [r for r in every if "error" in r]
        mlflow.log_metrics({"proxies_failed": len(failed),
                            "proxies_trained": sum(not r.get("reused", True) for r in every),
                            "proxies_reused": sum(r.get("reused", False) for r in every)})
        if failed:
            mlflow.log_dict({r["id"]: r["error"] for r in failed}, "failed_proxies.json")
        results = finished_proxies(every, cfg.regression.min_proxy_fraction)
        weights, columns, shares = proxy_matrix(results, domains, target)
        model, report = fit_target(weights, columns, shares, domains, model=cfg.regression.model,
                                   folds=cfg.regression.folds, seed=cfg.seed,
                                   tune_trials=cfg.regression.tune_trials,
                                   per_domain_max_seconds=cfg.regression.per_domain_max_seconds)
        curve = learning_curve(weights, columns, shares, domains, report.model,
                               cfg.regression.folds, cfg.seed, report.cv_spearman)
        losses = columns @ shares
        model.save(out)
        # A later active-learning round refits on these plus its own proxies.
        write_text(out / PROXY_RESULTS_FILE, json.dumps(every))
        best = best_row(losses, report.left_out)
        mlflow.log_params({"model": report.model, "folds": cfg.regression.folds,
                           "target": str(cfg.regression.target), "proxies": len(results)})
        mlflow.log_metrics({
            "cv_spearman": report.cv_spearman, "cv_rmse": report.cv_rmse,
            "fit_seconds": report.seconds, "best_train_target": float(losses[best]),
            "proxies_left_out": len(report.left_out),
            **{f"cv_spearman.{m}": v for m, v in report.cv_by_model.items()},
        })
        for size, rho in curve:
            mlflow.log_metric("learning_curve.cv_spearman", rho, step=int(size))
        settings = report.settings  # what CV chose; a per-domain model's parts by their domain
        if report.model == PER_DOMAIN:
            settings = {**settings, "parts": dict(zip(target, settings["parts"], strict=True))}
        mlflow.log_dict(settings, "fit_settings.json")
        if report.left_out:  # a run far off its prediction may be worth a look (seed, data)
            mlflow.log_dict({results[i]["id"]: left_out_record(report, target, losses, i)
                             for i in report.left_out}, "left_out_proxies.json")
        if model.linear_coefficients:
            mlflow.log_dict(model.linear_coefficients, "linear_coefficients.json")
        log_mlflow_model(out, model)
        # Every domain's validation loss, for the domain interactions: what the proxies measured
        measured = [d for d in domains if all(d in r["val_loss"] for r in results)]
        with tempfile.TemporaryDirectory() as folder:
            plot_fit(Path(folder), str(cfg.regression.target), losses, report)
            plot_domain_interactions(Path(folder), weights, domains, {
                d: np.array([r["val_loss"][d] for r in results]) for d in measured})
            mlflow.log_artifacts(folder, "plots")
    return {
        "model": report.model, "cv_spearman": report.cv_spearman, "cv_rmse": report.cv_rmse,
        "target": target, "proxies": len(results), "learning_curve": curve,
        "best_train_id": results[best]["id"], "best_train_target": float(losses[best]),
        "best_train_weights": results[best]["weights"],
    }


@component
def fit_regression_op(
    config: dict, proxy_results: list, data_meta: dict, tracking: dict,
    regressor: dsl.Output[dsl.Model],
) -> dict:
    """Fit mixture -> target loss on every finished proxy; log CV quality and the model."""
    from pathlib import Path

    from components.config import parse_config
    from components.regression import fit_and_log

    every = [r for task in proxy_results for r in task["results"]]
    return fit_and_log(parse_config(config), every, data_meta, tracking, Path(regressor.path),
                       "fit-regression")


@component
def refit_regression_op(
    config: dict, previous: dsl.Input[dsl.Model], proxy_results: list, data_meta: dict,
    tracking: dict, active_round: int, regressor: dsl.Output[dsl.Model],
) -> dict:
    """An active-learning round's refit: the previous fit's proxies plus this round's."""
    import json
    from pathlib import Path

    from components.config import parse_config
    from components.regression import PROXY_RESULTS_FILE, fit_and_log

    earlier = json.loads((Path(previous.path) / PROXY_RESULTS_FILE).read_text())
    every = earlier + [r for task in proxy_results for r in task["results"]]
    return fit_and_log(parse_config(config), every, data_meta, tracking, Path(regressor.path),
                       f"fit-regression-round-{active_round}")
