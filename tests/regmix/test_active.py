import json
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from regmix.active import propose_mixtures, run_propose_proxies
from regmix.config.loading import parse_config
from regmix.regression.saved import Regressor
from regmix.regression.selection import fit_regressor
from regmix.regression.stage import run_fit_regression, run_refit_regression
from regmix.search import nearest_l1_distance
from tests.conftest import tiny_config_dict
from tests.regmix.test_regression import names, smooth_problem

NO_CAPS = np.ones(5)


@pytest.fixture(scope="module")
def ensemble():
    weights, y = smooth_problem(60, 5)
    return fit_regressor(weights, y, names(5), model="ensemble", folds=3)[0]


def best_training_mixture(model) -> np.ndarray:
    return model.train_weights[np.argmin(model.predict(model.train_weights))]


def test_proposals_are_new_distinct_feasible_and_near_the_optimum(ensemble):
    chosen = best_training_mixture(ensemble)
    proposed = propose_mixtures(ensemble, chosen, NO_CAPS, 4, 512, 0.1, 0.002,
                                np.random.default_rng(0))
    assert proposed.shape == (4, 5)
    np.testing.assert_allclose(proposed.sum(1), 1.0)
    assert (proposed >= 0).all()
    assert nearest_l1_distance(proposed, ensemble.train_weights).min() > 0
    assert len({row.tobytes() for row in proposed}) == 4
    # Near the optimum: closer to the chosen mixture, and better predicted, than the proxies.
    assert np.abs(proposed - chosen).sum(1).max() < np.median(
        np.abs(ensemble.train_weights - chosen).sum(1))
    assert ensemble.predict(proposed).max() < np.median(ensemble.predict(ensemble.train_weights))


def test_proposals_honour_caps_and_are_seeded(ensemble):
    chosen = best_training_mixture(ensemble)
    caps = np.maximum(chosen, 0.6)
    first, again = (propose_mixtures(ensemble, chosen, caps, 3, 256, 0.2, 0.002,
                                     np.random.default_rng(7)) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert (first <= caps + 1e-12).all()


def test_an_optimum_at_the_caps_still_gets_proposals_within_them():
    # 10 of 12 domains at their caps: rejecting draws over a cap would keep about 1 in 1000.
    weights, y = smooth_problem(40, 12)
    model = fit_regressor(weights, y, names(12), model="linear", folds=3)[0]
    chosen, caps = np.r_[np.full(10, 0.09), 0.05, 0.05], np.r_[np.full(10, 0.09), 1.0, 1.0]
    proposed = propose_mixtures(model, chosen, caps, 4, 512, 0.2, 0.002, np.random.default_rng(0))
    assert proposed.shape == (4, 12) and (proposed <= caps + 1e-9).all()
    np.testing.assert_allclose(proposed.sum(1), 1.0)


def test_picks_spread_out_rather_than_pile_up():
    """With a single model (no disagreement) distance alone decides: the second pick is not
    next to the first."""
    weights, y = smooth_problem(60, 5)
    gp = fit_regressor(weights, y, names(5), model="gp", folds=3)[0]
    chosen = best_training_mixture(gp)
    a, b = propose_mixtures(gp, chosen, NO_CAPS, 2, 512, 0.2, 0.002, np.random.default_rng(1))
    typical_gap = np.median(nearest_l1_distance(gp.train_weights[:10], gp.train_weights[10:]))
    assert np.abs(a - b).sum() > 0.1 * typical_gap


def proxy_results(meta: dict, weights: np.ndarray, prefix: str) -> list[dict]:
    """Proxy results as train_proxy_op returns them, with a smooth made-up loss per domain."""
    results = []
    for i, row in enumerate(weights):
        named = dict(zip(meta["domains"], row.tolist(), strict=True))
        val_loss = {d: 4.0 - np.log(w + 0.01) * 0.1 for d, w in named.items()}
        results.append({"id": f"{prefix}{i:04d}", "weights": named, "val_loss": val_loss,
                        "reused": False})
    return [{"task": 0, "results": results}]


def test_a_round_proposes_trains_and_refits_on_every_proxy(prepared_data, tracking, tmp_path):
    meta = prepared_data.meta
    config = tiny_config_dict("unused.yaml",
                              active_learning={"rounds": 1, "proxies": 3, "candidates": 256})
    first = tmp_path / "fit"
    weights = np.random.default_rng(0).dirichlet(np.ones(3), size=16)
    report = run_fit_regression(parse_config(config), proxy_results(meta, weights, "m"), meta,
                                tracking, first)
    chosen = {"weights": dict(zip(meta["domains"], weights[0], strict=True))}
    tasks = run_propose_proxies(parse_config(config), first, chosen, meta, tracking, 1)
    proposed = [m for t in tasks for m in t["mixtures"]]
    assert [m["id"] for m in proposed] == ["r1a0000", "r1a0001", "r1a0002"]
    assert all(len(m["hash"]) == 16 for t in tasks for m in t["mixtures"])

    new = np.array([[m["weights"][d] for d in meta["domains"]] for m in proposed])
    second = tmp_path / "refit"
    refit = run_refit_regression(parse_config(config), first, proxy_results(meta, new, "r1a"),
                                 meta, tracking, 1, second)
    assert report["proxies"] == 16 and refit["proxies"] == 19
    client = mlflow.MlflowClient(tracking["uri"])
    runs = {r.info.run_name: r for r in client.search_runs([tracking["experiment_id"]])}
    assert {"fit-regression", "propose-round-1", "fit-regression-round-1"} <= set(runs)
    # Each domain's made-up loss follows its own weight: CV prefers fitting them one by one.
    fit = runs["fit-regression"]
    assert report["model"] == fit.data.params["model"] == "per-domain"
    settings = json.loads(Path(client.download_artifacts(fit.info.run_id, "fit_settings.json",
                                                         str(tmp_path))).read_text())
    assert list(settings["parts"]) == meta["domains"]
    assert fit.data.metrics["cv_spearman.per-domain"] == report["cv_spearman"]
    plots = {a.path for a in client.list_artifacts(fit.info.run_id, "plots")}
    assert plots == {"plots/predicted_vs_measured.png", "plots/domain_interaction.png"}
    # The regressor is an MLflow pyfunc model: loaded from the run, it predicts a table of
    # mixtures (columns in any order) as the saved folder does
    logged = mlflow.pyfunc.load_model(f"runs:/{fit.info.run_id}/regressor")
    table = pd.DataFrame(weights, columns=meta["domains"])[meta["domains"][::-1]]
    np.testing.assert_allclose(logged.predict(table), Regressor.load(first).predict(weights))
    assert logged.metadata.get_input_schema().input_names() == meta["domains"]
    sizes = [size for size, _ in report["learning_curve"]]
    assert sizes == sorted(set(sizes)) and report["learning_curve"][-1] == [16, report["cv_spearman"]]


def test_the_fit_does_not_depend_on_the_order_proxy_results_arrive_in(prepared_data, tracking,
                                                                      tmp_path):
    meta = prepared_data.meta
    config = tiny_config_dict("unused.yaml", regression={"target": meta["domains"][0],
                                                         "model": "gp", "folds": 4})
    weights = np.random.default_rng(0).dirichlet(np.ones(3), size=16)
    results = proxy_results(meta, weights, "m")[0]["results"]
    tasks = [{"task": i, "results": results[i * 4 : i * 4 + 4]} for i in range(4)]
    fits = []
    for order, tasks_in_order in enumerate((tasks, tasks[::-1])):
        model = tmp_path / f"fit{order}"
        report = run_fit_regression(parse_config(config), tasks_in_order, meta, tracking, model)
        fits.append((report["cv_spearman"], Regressor.load(model).predict(weights)))
    assert fits[0][0] == fits[1][0]
    np.testing.assert_array_equal(fits[0][1], fits[1][1])


def test_the_fit_logs_the_proxies_it_left_out(prepared_data, tracking, tmp_path):
    meta = prepared_data.meta
    config = tiny_config_dict("unused.yaml", regression={"model": "gp"})
    rng = np.random.default_rng(0)
    tasks = proxy_results(meta, rng.dirichlet(np.ones(3), size=40), "m")
    for i, result in enumerate(tasks[0]["results"]):  # run-to-run noise, and one run gone wrong
        shift = rng.normal(0, 0.005) + 0.5 * (i == 7)
        result["val_loss"] = {d: v + shift for d, v in result["val_loss"].items()}
    run_fit_regression(parse_config(config), tasks, meta, tracking, tmp_path / "fit")
    client = mlflow.MlflowClient(tracking["uri"])
    run = next(r for r in client.search_runs([tracking["experiment_id"]])
               if r.info.run_name == "fit-regression")
    left_out = json.loads(Path(client.download_artifacts(
        run.info.run_id, "left_out_proxies.json", str(tmp_path))).read_text())
    assert run.data.metrics["proxies_left_out"] == len(left_out) >= 1
    assert left_out["m0007"]["target"] > left_out["m0007"]["cv_predicted"] + 0.3
