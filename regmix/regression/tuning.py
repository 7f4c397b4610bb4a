"""LightGBM's settings: defaults scaled to the rows, cross-validated rounds, an optuna search."""

import lightgbm as lgb
import numpy as np
import optuna

LIGHTGBM_MAX_ROUNDS = 3000
LIGHTGBM_PATIENCE = 50
# CV early stopping counts a round as better only if it lowers the CV error (MSE) by this share
# of the target's variance. With a few dozen rows, tiny trees otherwise keep shaving the error
# for thousands of rounds (2,690 on 15 paper rows, against 533 with this floor, at the same CV
# error to 0.02 %), and every round costs at prediction time; on 512 rows it changes nothing.
LIGHTGBM_MIN_GAIN = 1e-4


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
