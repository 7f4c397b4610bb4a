from dataclasses import dataclass

import mlflow
import numpy as np
import pytest
import yaml

from regmix.config.constraints import Constraints
from regmix.config.loading import parse_config
from regmix.regression.selection import fit_regressor
from regmix.search import SearchResult, paper_search, project_onto_bounds, run_search, search_mixture
from tests.conftest import tiny_config_dict

DOMAINS = [f"d{i}" for i in range(8)]
TARGET = np.array([0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02])


@dataclass
class QuadraticLoss:
    """A stand-in regressor with a known optimum: loss = 1 + |w - target|^2.

    Over any constraint set the minimiser is the Euclidean projection of `target` onto it.
    """

    domains: list[str]
    target: np.ndarray
    fit_summary: dict | None = None  # no CV behind it

    def predict_with_spread(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loss = 1.0 + ((np.atleast_2d(weights) - self.target) ** 2).sum(axis=1)
        return loss, np.zeros(len(loss))

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return self.predict_with_spread(weights)[0]


CONSTRAINED = Constraints(
    min_weight={"d7": 0.05},
    max_weight={"d0": 0.2},
    fixed={"d3": 0.12},
    available_tokens={d: 1000 for d in DOMAINS} | {"d1": 100},
    token_budget=1000,
    max_epochs=1.5,  # caps d1 at 1.5 * 100 / 1000 = 0.15
)


def assert_honours(weights: np.ndarray, constraints: Constraints) -> None:
    assert abs(weights.sum() - 1.0) <= 1e-9
    assert (weights >= constraints.lower_bounds(DOMAINS) - 1e-9).all()
    assert (weights <= constraints.upper_bounds(DOMAINS) + 1e-9).all()


def as_array(result) -> np.ndarray:
    return np.array([result.weights[d] for d in DOMAINS])


def test_projection_is_exact_and_idempotent():
    rng = np.random.default_rng(0)
    lower = np.array([0.0, 0.1, 0.0, 0.05, 0.0, 0.0, 0.2, 0.0])
    upper = np.array([0.3, 0.4, 1.0, 0.05, 0.2, 1.0, 0.5, 0.1])
    points = rng.normal(0, 2, size=(500, 8))
    projected = project_onto_bounds(points, lower, upper)
    assert (projected >= lower).all() and (projected <= upper).all()
    np.testing.assert_allclose(projected.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(project_onto_bounds(projected, lower, upper), projected, atol=1e-12)


def test_bounds_combine_min_max_fixed_and_epoch_cap():
    lower, upper = CONSTRAINED.lower_bounds(DOMAINS), CONSTRAINED.upper_bounds(DOMAINS)
    assert (lower[3], upper[3]) == (0.12, 0.12)
    assert upper[0] == 0.2 and upper[1] == pytest.approx(0.15) and lower[7] == 0.05
    CONSTRAINED.check(DOMAINS)


def known_optimum(constraints: Constraints) -> np.ndarray:
    lower, upper = constraints.lower_bounds(DOMAINS), constraints.upper_bounds(DOMAINS)
    return project_onto_bounds(TARGET, lower, upper)[0]


@pytest.mark.parametrize("constraints", [Constraints(), CONSTRAINED])
def test_cmaes_finds_the_known_optimum(constraints):
    result = search_mixture(QuadraticLoss(DOMAINS, TARGET), np.full(8, 1 / 8), constraints)
    assert_honours(as_array(result), constraints)
    np.testing.assert_allclose(as_array(result), known_optimum(constraints), atol=2e-3)
    assert result.method == "cmaes" and result.trials <= 3000 and result.spread == 0
    assert result.nearest_distance is None


def test_tpe_honours_constraints_and_improves_on_the_prior():
    loss = QuadraticLoss(DOMAINS, TARGET)
    prior = np.full(8, 1 / 8)
    result = search_mixture(loss, prior, CONSTRAINED, method="tpe", trials=150)
    assert_honours(as_array(result), CONSTRAINED)
    start = project_onto_bounds(
        prior, CONSTRAINED.lower_bounds(DOMAINS), CONSTRAINED.upper_bounds(DOMAINS)
    )
    assert result.predicted <= loss.predict(start)[0]
    assert result.trials == 150


def test_paper_recipe_honours_constraints_and_cmaes_is_no_worse():
    loss = QuadraticLoss(DOMAINS, TARGET)
    prior = np.full(8, 1 / 8)
    paper = paper_search(loss, prior, CONSTRAINED, samples=20_000)
    assert_honours(as_array(paper), CONSTRAINED)
    cmaes = search_mixture(loss, prior, CONSTRAINED)
    assert cmaes.predicted <= paper.predicted
    assert paper.method == "paper" and paper.trials == 20_000


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        (Constraints(min_weight={"d9": 0.1}), r"min_weight names unknown domains \['d9'\]"),
        (Constraints(min_weight={d: 0.2 for d in DOMAINS}), "sum to 1.6 > 1"),
        (Constraints(max_weight={d: 0.1 for d in DOMAINS}), "sum to 0.8 < 1"),
        (Constraints(fixed={"d0": 0.5}, max_weight={"d0": 0.4}), "fixed weight 0.5 outside"),
        (Constraints(min_weight={"d0": 0.5}, max_weight={"d0": 0.4}), "minimum weight 0.5 above"),
        (Constraints(token_budget=10), "together"),
        (
            Constraints(available_tokens={d: 1 for d in DOMAINS}, token_budget=100, max_epochs=4),
            "raise max_epochs",
        ),
    ],
)
def test_infeasible_constraints_are_refused(constraints, message):
    with pytest.raises(ValueError, match=message):
        constraints.check(DOMAINS)
    with pytest.raises(ValueError, match=message):
        search_mixture(QuadraticLoss(DOMAINS, TARGET), np.full(8, 1 / 8), constraints)


@pytest.mark.parametrize("search", [search_mixture, paper_search])
def test_the_search_stays_where_proxies_were_trained(search):
    rng = np.random.default_rng(0)
    # Training mixtures all heavy in d7, the optimum (TARGET) light in it: out of reach.
    train = rng.dirichlet(np.ones(8), size=40) * 0.2 + np.eye(8)[7] * 0.8
    loss = QuadraticLoss(DOMAINS, TARGET)
    inside = search(loss, np.full(8, 1 / 8), train_weights=train)
    assert (as_array(inside) <= train.max(axis=0) + 1e-9).all()
    outside = search(loss, np.full(8, 1 / 8), train_weights=train, allow_extrapolation=True)
    assert (as_array(outside) > train.max(axis=0) + 1e-3).any()
    assert outside.predicted < inside.predicted
    assert outside.nearest_distance > inside.nearest_distance


@dataclass
class NeedleLoss:
    """Flat but for a narrow dip around one mixture: a surface no search from the prior finds
    its way down (trees fitted on few proxies are flat almost everywhere)."""

    domains: list[str]
    needle: np.ndarray
    fit_summary: dict | None = None

    def predict_with_spread(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distance = np.abs(np.atleast_2d(weights) - self.needle).sum(axis=1)
        return np.where(distance < 0.02, 0.5, 1.0), np.zeros(len(distance))

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return self.predict_with_spread(weights)[0]


@pytest.mark.parametrize("method", ["cmaes", "tpe"])
def test_the_search_ends_no_worse_than_the_best_training_mixture_within_bounds(method):
    train = np.random.default_rng(0).dirichlet(np.ones(8), size=40)
    best, excluded = train[3], train[5]  # the first within the bounds, the second outside
    bounds = Constraints(max_weight={DOMAINS[int(excluded.argmax())]: excluded.max() - 1e-3})
    assert best.max() < excluded.max() - 1e-3
    result = search_mixture(NeedleLoss(DOMAINS, best), np.full(8, 1 / 8), bounds, method=method,
                            trials=64, train_weights=train)
    assert result.predicted == 0.5 and np.allclose(as_array(result), best, atol=0.02)
    # A training mixture outside the bounds is no start
    result = search_mixture(NeedleLoss(DOMAINS, excluded), np.full(8, 1 / 8), bounds,
                            method=method, trials=64, train_weights=train)
    assert result.predicted == 1.0
    assert_honours(as_array(result), bounds)


def test_constraints_that_force_an_extrapolation_are_refused():
    train = np.random.default_rng(0).dirichlet(np.ones(8), size=40) * 0.2 + np.eye(8)[7] * 0.8
    loss = QuadraticLoss(DOMAINS, TARGET)
    with pytest.raises(ValueError, match=r"domain 'd0'.*allow_extrapolation"):
        search_mixture(loss, np.full(8, 1 / 8), Constraints(fixed={"d0": 0.5}), train_weights=train)
    with pytest.raises(ValueError, match="inside the trained region"):
        search_mixture(loss, np.full(8, 1 / 8), Constraints(max_weight={"d7": 0.05}),
                       train_weights=train)
    near = search_mixture(loss, np.full(8, 1 / 8), train_weights=np.vstack([train, TARGET]))
    assert near.nearest_distance < 0.01


def test_search_on_a_fitted_regressor():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(8, 0.5), size=80)
    y = ((weights - TARGET) ** 2).sum(axis=1)
    regressor, _ = fit_regressor(weights, y, DOMAINS, model="ensemble", folds=3)
    result = search_mixture(regressor, weights.mean(axis=0), CONSTRAINED, train_weights=weights)
    assert_honours(as_array(result), CONSTRAINED)
    lower, upper = CONSTRAINED.lower_bounds(DOMAINS), CONSTRAINED.upper_bounds(DOMAINS)
    feasible_training = project_onto_bounds(weights, lower, upper)
    assert result.predicted <= regressor.predict(feasible_training).min()
    assert result.spread >= 0 and result.seconds < 10


@pytest.mark.parametrize("method", ["paper", "cmaes"])
def test_the_stage_records_its_choice_beside_the_papers_recipe(
    method, prepared_data, tracking, tmp_path
):
    meta = prepared_data.meta
    weights = np.random.default_rng(0).dirichlet(np.ones(3), size=30)
    y = ((weights - [0.5, 0.3, 0.2]) ** 2).sum(axis=1)
    regressor = fit_regressor(weights, y, meta["domains"], model="gp", folds=3)[0]
    regressor.save(tmp_path / "model")
    config = tiny_config_dict("unused.yaml", search={"method": method, "trials": 2000,
                                                     "max_epochs": None})
    mixture = tmp_path / "mixture.yaml"
    record = run_search(parse_config(config), tmp_path / "model", meta, tracking, mixture)

    assert yaml.safe_load(mixture.read_text()) == record
    assert record["method"] == method and sum(record["weights"].values()) == pytest.approx(1)
    recipe = record["paper_recipe"]
    if method == "paper":  # the chosen mixture is the recipe's: not searched twice
        assert (recipe["weights"], recipe["predicted"], recipe["nearest_training_l1"]) == (
            record["weights"], record["predicted"], record["nearest_training_l1"])
    else:  # the recipe may leave the trained region; the search may not, yet does no worse
        assert record["predicted"] <= recipe["predicted"] + 1e-3
    run = mlflow.MlflowClient(tracking["uri"]).search_runs(
        [tracking["experiment_id"]], "attributes.run_name = 'search-mixture'")[0]
    assert run.data.metrics["predicted_loss"] == pytest.approx(record["predicted"])
    assert run.data.params["method"] == method
    # The prediction comes with the model's CV error and its gain over the best proxy, both
    # predicted (at the best proxy's own mixture, for that one)
    best = weights[np.argmin(y)]
    gain = regressor.predict(best[None, :])[0] - record["predicted"]
    assert record["predicted_gain"]["over_best_training_proxy"] == pytest.approx(gain)
    assert record["predicted_gain"]["best_training_proxy_predicted"] == pytest.approx(
        regressor.predict(best[None, :])[0])
    assert run.data.metrics["predicted_gain"] == pytest.approx(gain)
    assert record["predicted_gain"]["verdict"] in ("better", "within the CV error", "worse")
    plots = {a.path for a in mlflow.MlflowClient(tracking["uri"]).list_artifacts(run.info.run_id,
                                                                                 "plots")}
    assert plots == {"plots/mixture.png", "plots/simulated_losses.png"}


@pytest.mark.parametrize(("predicted", "verdict"), [
    (4.90, "better"), (4.97, "within the CV error"), (5.04, "within the CV error"),
    (5.10, "worse"),
])
def test_a_predicted_gain_is_weighed_against_the_cv_error(predicted, verdict):
    result = SearchResult({"a": 1.0}, predicted, 0.0, "cmaes", 1, 0.0, None, cv_rmse=0.05,
                          best_train_target=5.0)
    gain = result.record()["predicted_gain"]
    assert gain == {"over_best_training_proxy": pytest.approx(5.0 - predicted), "verdict": verdict}
    # Where the model predicts the best proxy itself, the gain is prediction against prediction
    result.best_train_predicted = 5.2
    assert result.predicted_gain == pytest.approx(5.2 - predicted)
