"""Search stage: the mixture that a fitted regressor predicts to have the lowest loss.

Every candidate satisfies the constraints (per-domain minimum and maximum, fixed weights, and
the max-epochs cap from token counts): optimisers propose one unconstrained logit per domain,
and `logits_to_mixtures` maps them smoothly into the bounds with weights summing to 1. Points
from elsewhere (the paper's samples, a prior) are projected onto the bounds exactly.
"""

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import optuna
import yaml
from cmaes import CMA
from scipy.spatial.distance import cdist
from scipy.special import expit, logit

from regmix.config.constraints import Constraints, search_constraints
from regmix.config.sections import CMAES_POPULATION, PAPER_SAMPLES, STRENGTH_RANGE
from regmix.files import write_text
from regmix.mixtures import dirichlet_around, token_prior
from regmix.regression.saved import Regressor
from regmix.tracking import plots
from regmix.tracking.runs import stage_run

METHODS = ("cmaes", "tpe")
# Logits live in a box so that CMA-ES cannot drift without bound along the one direction that
# changes nothing (adding a constant to every logit); sigmoid(-15) = 3e-7 of a domain's room.
LOGIT_RANGE = 15.0
CMAES_SIGMA = 1.5  # a first step of about a factor e^1.5 in each small weight
TPE_BATCH = 32
PROJECTION_ITERATIONS = 100  # bisection halvings: far below 1e-9 for any bound range


@dataclass
class SearchResult:
    weights: dict[str, float]  # the chosen mixture, sums to 1, honours constraints
    predicted: float
    spread: float  # ensemble disagreement at the chosen point
    method: str  # "cmaes", "tpe", "paper"
    trials: int
    seconds: float
    nearest_distance: float | None  # L1 distance to the nearest training mixture, if given
    # The bounds searched within (constraints, max-epochs cap, trained region), for the domains
    # not left free in [0, 1]: what the chosen mixture honoured.
    bounds: dict[str, list[float]] = field(default_factory=dict)
    cv_rmse: float | None = None  # the regressor's CV error, when it was saved with the model
    best_train_target: float | None = None  # the best value measured on a training proxy
    best_train_predicted: float | None = None  # the model's prediction at that proxy's mixture
    # The paper recipe's: the predicted loss of every mixture it sampled (its simulation)
    sampled_predictions: np.ndarray | None = field(default=None, repr=False)

    @property
    def predicted_gain(self) -> float | None:
        """How much lower the chosen mixture is predicted than the best training proxy's. Both
        are predictions where the model gives one: a model that misses the measured value at
        that very mixture would otherwise call its own error a gain."""
        best = self.best_train_predicted
        if best is None:  # a model saved before its best row was: the measured value
            best = self.best_train_target
        return None if best is None else best - self.predicted

    def gain_verdict(self) -> str:
        """The predicted gain over the best training proxy, weighed against the model's CV
        error: a difference smaller than the model's typical error is no evidence either way."""
        if abs(self.predicted_gain) <= self.cv_rmse:
            return "within the CV error"
        return "better" if self.predicted_gain > 0 else "worse"

    def record(self) -> dict:
        """The result as plain data for YAML, MLflow and KFP (which carry no nulls): the mixture,
        its prediction with how far to trust it, and how it was found."""
        uncertainty = {"members_spread": self.spread}
        record = {"weights": self.weights, "predicted": self.predicted, "uncertainty": uncertainty}
        if self.cv_rmse is not None:
            uncertainty["cv_rmse"] = self.cv_rmse
        if self.predicted_gain is not None and self.cv_rmse is not None:
            gain = {"over_best_training_proxy": self.predicted_gain, "verdict": self.gain_verdict()}
            if self.best_train_predicted is not None:
                gain["best_training_proxy_predicted"] = self.best_train_predicted
            record["predicted_gain"] = gain
        if self.nearest_distance is not None:
            record["nearest_training_l1"] = self.nearest_distance
        return {**record, "method": self.method, "trials": self.trials, "seconds": self.seconds,
                "bounds": self.bounds}


def _solve_row_sums(row_sum, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Bisection, row by row, for the x in [low, high] at which row_sum(x) = 1.

    row_sum must be non-decreasing in x, at most 1 at `low` and at least 1 at `high`.
    """
    for _ in range(PROJECTION_ITERATIONS):
        middle = (low + high) / 2
        below = row_sum(middle) < 1.0
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return (low + high) / 2


def project_onto_bounds(points: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto {w : lower <= w <= upper, sum(w) = 1}.

    The projection is clip(v + t, lower, upper) for the scalar t at which the row sums to 1.
    Bounds hold exactly (clip); the sum is 1 to within about 1e-15.
    """
    points = np.atleast_2d(points)
    shift = _solve_row_sums(
        lambda t: np.clip(points + t, lower, upper).sum(axis=1, keepdims=True),
        (lower - points).min(axis=1, keepdims=True),  # every weight at its lower bound
        (upper - points).max(axis=1, keepdims=True),  # every weight at its upper bound
    )
    return np.clip(points + shift, lower, upper)


def logits_to_mixtures(logits: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Map each row of logits z to w = lower + (upper - lower) * sigmoid(z + s), sum(w) = 1.

    The per-row shift s is solved for. Every weight moves smoothly and strictly with its own
    logit, so an optimiser sees no flat regions (clipping would make all weights beyond a
    bound look the same), yet every weight stays within its bounds: fixed weights (lower ==
    upper) stay fixed, and any point strictly inside the bounds is reachable.
    """
    logits = np.atleast_2d(logits)
    room = upper - lower
    # At s = -max(z) - 40 every sigmoid is below 1e-17 (sum ~ sum(lower) <= 1); at
    # s = -min(z) + 40 every sigmoid is 1 to within 1e-17 (sum ~ sum(upper) >= 1).
    shift = _solve_row_sums(
        lambda s: (lower + room * expit(logits + s)).sum(axis=1, keepdims=True),
        -logits.max(axis=1, keepdims=True) - 40.0,
        -logits.min(axis=1, keepdims=True) + 40.0,
    )
    return np.clip(lower + room * expit(logits + shift), lower, upper)


def _mixture_to_logits(mixture: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Logits that `logits_to_mixtures` maps back to (about) a feasible `mixture`."""
    room = upper - lower
    share = np.divide(mixture - lower, room, out=np.full_like(mixture, 0.5), where=room > 0)
    return np.clip(logit(share), -LOGIT_RANGE, LOGIT_RANGE)


def nearest_l1_distance(points: np.ndarray, train_weights: np.ndarray) -> np.ndarray:
    """For each point, the L1 distance to its nearest training mixture."""
    return cdist(points, train_weights, metric="cityblock").min(axis=1)


def _feasible_bounds(
    regressor: Regressor, prior: np.ndarray, constraints: Constraints | None,
    train_weights: np.ndarray | None, allow_extrapolation: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The normalised prior and the per-domain bounds the search stays within.

    Unless extrapolation is allowed, each domain's weight is also capped at the largest weight
    any training mixture gave it: beyond that, no proxy measured anything and the regression's
    prediction is a guess (a tree model's is flat, a GP's reverts to its mean).
    """
    domains = regressor.domains
    prior = np.asarray(prior, dtype=float)
    if prior.shape != (len(domains),) or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"prior must be {len(domains)} non-negative weights, got {prior}")
    constraints = constraints or Constraints()
    constraints.check(domains)
    lower, upper = constraints.lower_bounds(domains), constraints.upper_bounds(domains)
    if train_weights is not None and not allow_extrapolation:
        upper = constraints.upper_bounds_in_trained_region(domains, train_weights)
    return prior / prior.sum(), lower, upper


def _finish(
    regressor: Regressor,
    best: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray],
    method: str,
    trials: int,
    start: float,
    train_weights: np.ndarray | None,
) -> SearchResult:
    """Package the chosen point with its ensemble spread, distance to the data, the bounds it
    honoured and the model's CV error."""
    predicted, spread = regressor.predict_with_spread(best[None, :])
    nearest = None
    if train_weights is not None:
        nearest = float(nearest_l1_distance(best[None, :], np.asarray(train_weights, float))[0])
    summary = regressor.fit_summary or {}
    best_train_predicted = None
    if "best_train_row" in summary and regressor.train_weights is not None:
        best_train = regressor.train_weights[summary["best_train_row"]]
        best_train_predicted = float(regressor.predict(best_train[None, :])[0])
    return SearchResult(
        weights=dict(zip(regressor.domains, best.tolist(), strict=True)),
        predicted=float(predicted[0]),
        spread=float(spread[0]),
        method=method,
        trials=trials,
        seconds=time.perf_counter() - start,
        nearest_distance=nearest,
        bounds={d: [float(low), float(high)] for d, low, high in zip(regressor.domains, *bounds,
                                                                       strict=True)
                if (low, high) != (0.0, 1.0)},
        cv_rmse=summary.get("cv_rmse"),
        best_train_target=summary.get("best_train_target"),
        best_train_predicted=best_train_predicted,
    )


def search_mixture(
    regressor: Regressor,
    prior: np.ndarray,
    constraints: Constraints | None = None,
    method: str = "cmaes",
    trials: int = 3000,
    seed: int = 0,
    train_weights: np.ndarray | None = None,
    allow_extrapolation: bool = False,
) -> SearchResult:
    """Minimise the predicted loss over the constrained simplex, starting from `prior` or the
    best predicted training mixture inside the bounds.

    "cmaes" runs CMA-ES, "tpe" Optuna's TPE (slower per trial: suits a few hundred), both over
    one logit per domain, proposing and predicting in batches. With `train_weights`, the
    search stays where proxies were trained (see `_feasible_bounds`) unless
    `allow_extrapolation`.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown search method '{method}'; choose one of {METHODS}")
    prior, lower, upper = _feasible_bounds(regressor, prior, constraints, train_weights,
                                           allow_extrapolation)
    # Start from the best predicted of the prior and the training mixtures inside the bounds:
    # on a rugged surface (trees, few proxies) a search from the prior alone can end above a
    # mixture already trained, and the answer should never be worse than what was measured.
    starts = project_onto_bounds(prior, lower, upper)
    if train_weights is not None:
        trained = np.asarray(train_weights, dtype=float)
        inside = ((trained >= lower - 1e-9) & (trained <= upper + 1e-9)).all(axis=1)
        starts = np.vstack([starts, project_onto_bounds(trained[inside], lower, upper)])
    predicted = regressor.predict(starts)
    best, best_loss = starts[predicted.argmin()], float(predicted.min())
    ask_tell = _cmaes_batches if method == "cmaes" else _tpe_batches
    evaluated = len(starts)  # the search's own budget stays `trials` (the start among them)
    for logits, tell in ask_tell(_mixture_to_logits(best, lower, upper), trials - 1, seed):
        mixtures = logits_to_mixtures(logits, lower, upper)
        losses = regressor.predict(mixtures)
        tell(losses)
        evaluated += len(losses)
        if losses.min() < best_loss:
            best, best_loss = mixtures[losses.argmin()], float(losses.min())
    return _finish(regressor, best, (lower, upper), method, evaluated, start, train_weights)


def _cmaes_batches(initial_logits: np.ndarray, trials: int, seed: int):
    """Yield (logits batch, tell) pairs from CMA-ES until `trials` points were proposed."""
    dims = len(initial_logits)
    optimizer = CMA(
        mean=initial_logits,
        sigma=CMAES_SIGMA,
        bounds=np.tile([-LOGIT_RANGE, LOGIT_RANGE], (dims, 1)),
        seed=seed,
        population_size=CMAES_POPULATION,
    )
    while trials >= optimizer.population_size:
        batch = np.array([optimizer.ask() for _ in range(optimizer.population_size)])

        def tell(losses: np.ndarray, batch=batch) -> None:
            optimizer.tell(list(zip(batch, losses, strict=True)))

        yield batch, tell
        trials -= len(batch)


def _tpe_batches(initial_logits: np.ndarray, trials: int, seed: int):
    """Yield (logits batch, tell) pairs from Optuna's TPE until `trials` points were proposed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True))
    space = {
        f"logit_{i}": optuna.distributions.FloatDistribution(-LOGIT_RANGE, LOGIT_RANGE)
        for i in range(len(initial_logits))
    }
    study.enqueue_trial(dict(zip(space, initial_logits.tolist(), strict=True)))
    while trials > 0:
        batch = [study.ask(space) for _ in range(min(TPE_BATCH, trials))]
        logits = np.array([[trial.params[name] for name in space] for trial in batch])

        def tell(losses: np.ndarray, batch=batch) -> None:
            for trial, loss in zip(batch, losses.tolist(), strict=True):
                study.tell(trial, loss)

        yield logits, tell
        trials -= len(batch)


def paper_search(
    regressor: Regressor,
    prior: np.ndarray,
    constraints: Constraints | None = None,
    samples: int = PAPER_SAMPLES,
    top_k: int = 128,
    seed: int = 0,
    train_weights: np.ndarray | None = None,
    allow_extrapolation: bool = False,
    strength_range: tuple[float, float] = STRENGTH_RANGE,
) -> SearchResult:
    """The paper's recipe: sample around the prior (with the proxies' sampler), average the
    `top_k` best predicted.

    Unlike the paper, every sample is first projected onto the constraints (the max-epochs
    cap included), so the ranking only compares mixtures that could be trained.
    """
    start = time.perf_counter()
    prior, lower, upper = _feasible_bounds(regressor, prior, constraints, train_weights,
                                           allow_extrapolation)
    candidates = project_onto_bounds(
        dirichlet_around(prior, samples, np.random.default_rng(seed), strength_range), lower, upper
    )
    predicted = regressor.predict(candidates)
    top = candidates[np.argsort(predicted)[:top_k]]
    # The mean of feasible points is feasible; projecting again only removes rounding.
    best = project_onto_bounds(top.mean(axis=0), lower, upper)[0]
    result = _finish(regressor, best, (lower, upper), "paper", samples, start, train_weights)
    result.sampled_predictions = predicted
    return result


def search_with_baseline(
    regressor: Regressor,
    prior: np.ndarray,
    method: str,
    trials: int,
    constraints: Constraints | None = None,
    seed: int = 0,
    allow_extrapolation: bool = False,
    strength_range: tuple[float, float] = STRENGTH_RANGE,
) -> tuple[SearchResult, SearchResult]:
    """The chosen mixture by `method` ("paper" or a search method), and the paper's recipe
    beside it as the baseline: 100k samples around `prior` (inside the constraints, but free
    to leave the trained region, as in the paper). With method "paper" the chosen mixture is
    the recipe's own (inside the trained region unless allowed out): it is its own baseline."""
    options = {"constraints": constraints, "seed": seed, "train_weights": regressor.train_weights,
               "allow_extrapolation": allow_extrapolation}
    if method == "paper":
        chosen = paper_search(regressor, prior, samples=trials, strength_range=strength_range,
                              **options)
        return chosen, chosen
    chosen = search_mixture(regressor, prior, method=method, trials=trials, **options)
    recipe = paper_search(regressor, prior, strength_range=strength_range,
                          **{**options, "allow_extrapolation": True})
    return chosen, recipe


def search_record(chosen: SearchResult, recipe: SearchResult, constraints: Constraints,
                  allow_extrapolation: bool, regressor: Regressor) -> dict:
    """The chosen mixture's record (the search stage's `mixture.yaml`, `regmix search`'s YAML):
    the mixture and how far to trust it, the constraints asked for, the paper's recipe beside."""
    return {**chosen.record(), "constraints": constraints.record(allow_extrapolation),
            "paper_recipe": _recipe_record(recipe, regressor)}


def _recipe_record(recipe: SearchResult, regressor: Regressor) -> dict:
    """The paper's recipe as the record shows it beside the chosen mixture. The recipe may leave
    the trained region (as in the paper), where its prediction is a guess: the record says
    where (domain: [its weight, the largest any proxy had]) and how far the nearest proxy is."""
    # A copy: the chosen mixture may be this very one, and YAML would write the second mention
    # of one dict as an alias (`*id001`) where readers expect the weights.
    record = {"weights": dict(recipe.weights), "predicted": recipe.predicted}
    if regressor.train_weights is not None:
        trained = regressor.train_weights.max(axis=0)
        record["nearest_training_l1"] = recipe.nearest_distance
        record["beyond_trained_region"] = {
            d: [recipe.weights[d], float(most)]
            for d, most in zip(regressor.domains, trained, strict=True)
            if recipe.weights[d] > most + 1e-9
        }
    return record


def save_search_plots(chosen: SearchResult, recipe: SearchResult, prior: dict[str, float],
                      folder: Path, prefix: str = "") -> list[Path]:
    """The chosen mixture beside the prior (and the recipe's, when it differs), and the
    predicted loss over the recipe's simulated mixtures, marking the chosen one and the best
    training proxy."""
    series = {"chosen": chosen.weights, "prior": prior}
    if recipe is not chosen:
        series["paper recipe"] = recipe.weights
    marks = {"chosen": chosen.predicted}
    if chosen.best_train_target is not None:
        marks["best training proxy"] = chosen.best_train_target
    return [
        plots.mixtures(series, "Chosen mixture vs the sampling prior",
                       folder / f"{prefix}mixture.png"),
        plots.simulated_losses(recipe.sampled_predictions, marks,
                               folder / f"{prefix}simulated_losses.png"),
    ]


def run_search(config, regressor: Path, meta: dict, tracking: dict, out: Path) -> dict:
    """The search stage: the lowest predicted mixture beside the paper's recipe, written to
    `out` as YAML and logged with its plots. Returns the record written."""
    model = Regressor.load(regressor)
    tokens = np.array([meta["tokens"][d]["train"] for d in model.domains])
    prior = token_prior(tokens, config.mixtures.temperature)
    constraints = search_constraints(config, meta)
    # The paper's recipe samples as the proxies were sampled: around the same prior, same strengths
    chosen, recipe = search_with_baseline(
        model, prior, config.search.method, config.search.trials, constraints, config.seed,
        config.search.allow_extrapolation, config.mixtures.strength_range)
    record = search_record(chosen, recipe, constraints, config.search.allow_extrapolation, model)
    write_text(out, yaml.safe_dump(record, sort_keys=False))
    with stage_run(tracking, "search", "search-mixture"):
        mlflow.log_params({f"weight.{d}": round(w, 6) for d, w in chosen.weights.items()})
        mlflow.log_params({"method": chosen.method, "trials": chosen.trials})
        mlflow.log_metrics({"predicted_loss": chosen.predicted, "spread": chosen.spread,
                            "search_seconds": chosen.seconds,
                            "paper_recipe_predicted_loss": recipe.predicted,
                            **({"predicted_gain": chosen.predicted_gain}
                               if chosen.predicted_gain is not None else {})})
        mlflow.log_text(out.read_text(), "mixture.yaml")  # KFP's output file has no suffix
        # the mixture the proxies were sampled around (the plot's "prior"), as data
        prior_weights = dict(zip(model.domains, prior.tolist(), strict=True))
        mlflow.log_dict(prior_weights, "prior.json")
        with tempfile.TemporaryDirectory() as folder:
            save_search_plots(chosen, recipe, prior_weights, Path(folder))
            mlflow.log_artifacts(folder, "plots")
    return record
