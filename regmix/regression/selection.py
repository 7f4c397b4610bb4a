"""Which regressor, chosen from the training rows alone by k-fold cross-validation (CV).

LightGBM's number of rounds (and, with `tune_trials`, its hyperparameters through Optuna), the
ridge penalty, the ensemble's blend weights, which model to use, and whether to leave out the
rows CV predicted worst (see OUTLIER_MADS) are all chosen by CV.
"""

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
from joblib import Parallel, cpu_count, delayed
from scipy.stats import spearmanr
from sklearn.model_selection import KFold

from regmix.config.sections import PER_DOMAIN, PER_DOMAIN_MAX_SECONDS, REGRESSION_MODELS
from regmix.regression.boosted import _LightGBM
from regmix.regression.gp import (
    GP_MIN_HALF_ROWS,
    _fit_gp_theta,
    _GaussianProcess,
    _gp_posterior,
    _log_and_raw,
)
from regmix.regression.law import LAW_MIN_ROWS_PER_PARAMETER, LAW_RIDGES, _fit_law, _law_parameter_count
from regmix.regression.linear import _fit_ridge, _Linear
from regmix.regression.saved import Regressor, _Member
from regmix.regression.tuning import _lightgbm_cv, _lightgbm_defaults, _tune_lightgbm

MODELS = REGRESSION_MODELS
ENSEMBLE_MEMBERS = ("lightgbm", "gp", "law")
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
