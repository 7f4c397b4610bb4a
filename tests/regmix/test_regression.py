import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.model_selection import KFold

from regmix.config.sections import PER_DOMAIN
from regmix.paper_data import read_proxy_csvs
from regmix.regression import saved, selection, tuning
from regmix.regression.gp import _log_and_raw
from regmix.regression.law import _fit_law
from regmix.regression.linear import domain_interactions
from regmix.regression.pyfunc import PREDICTOR_MODULES, log_mlflow_model
from regmix.regression.saved import Regressor, saved_train_weights
from regmix.regression.selection import MODELS, _blend_weights, fit_regressor, fit_target
from regmix.regression.stage import left_out_record
from regmix.regression.tuning import _lightgbm_cv, _lightgbm_defaults

PAPER_DATA = Path(__file__).resolve().parents[3] / "shared" / "regmix-paper-data"
PILE_CC = "metric/the_pile_pile_cc_val_loss"


def smooth_problem(rows: int, domains: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse Dirichlet mixtures and a smooth loss: diminishing returns in each domain's weight."""
    importance = np.random.default_rng(domains).uniform(0.2, 1.0, size=domains)  # fixed per size
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(domains, 0.5), size=rows)
    loss = 3.0 - np.log(weights + 0.01) @ -importance / domains * 0.3
    return weights, loss + rng.normal(0, 0.005, size=rows)


def names(domains: int) -> list[str]:
    return [f"d{i}" for i in range(domains)]


def test_lightgbm_stops_adding_rounds_that_barely_lower_the_cv_error(monkeypatch):
    # 15 rows: tiny trees keep shaving the CV error for thousands of rounds, and each one costs
    # at prediction time (the search predicts 100k mixtures).
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(6, 0.5), 15)
    y = np.log(weights[:, 0] + 1e-3) + 0.1 * rng.normal(size=15)
    splits = list(KFold(4, shuffle=True, random_state=0).split(weights))
    rounds, out_of_fold = _lightgbm_cv(weights, y, _lightgbm_defaults(15, 0), splits)
    monkeypatch.setattr(tuning, "LIGHTGBM_MIN_GAIN", 0.0)
    unbounded_rounds, unbounded = _lightgbm_cv(weights, y, _lightgbm_defaults(15, 0), splits)
    assert rounds < unbounded_rounds / 3
    assert np.mean((out_of_fold - y) ** 2) < 1.002 * np.mean((unbounded - y) ** 2)


def test_auto_picks_a_model_with_high_cv_spearman():
    weights, y = smooth_problem(150, 6)
    regressor, report = fit_regressor(weights, y, names(6))
    assert set(report.cv_by_model) == set(MODELS)
    assert report.model == max(report.cv_by_model, key=report.cv_by_model.get)
    assert report.cv_spearman > 0.95
    assert report.cv_rmse > 0 and report.seconds > 0
    fresh_weights, fresh_y = smooth_problem(100, 6, seed=1)
    assert spearmanr(regressor.predict(fresh_weights), fresh_y)[0] > 0.9


@pytest.mark.parametrize("model", MODELS)
def test_save_load_round_trip_is_exact(tmp_path, model):
    weights, y = smooth_problem(60, 5)
    regressor, report = fit_regressor(weights, y, names(5), model=model, folds=3)
    assert report.model == model and list(report.cv_by_model) == [model]
    regressor.save(tmp_path / "model")
    saved = {path.suffix for path in (tmp_path / "model").rglob("*") if path.is_file()}
    assert saved <= {".json", ".txt", ".npy"}  # never pickle
    loaded = Regressor.load(tmp_path / "model")
    probe, _ = smooth_problem(40, 5, seed=2)
    for before, after in zip(
        regressor.predict_with_spread(probe), loaded.predict_with_spread(probe), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    assert loaded.domains == names(5)
    assert loaded.linear_coefficients == regressor.linear_coefficients
    assert loaded.fit_summary == {"cv_spearman": report.cv_spearman, "cv_rmse": report.cv_rmse,
                                  "best_train_target": y.min(), "best_train_row": int(np.argmin(y))}
    # The training mixtures alone, in any domain order, without loading the members
    reordered = saved_train_weights(tmp_path / "model", names(5)[::-1])
    np.testing.assert_array_equal(reordered, weights[:, ::-1])


def test_spread_is_member_disagreement():
    weights, y = smooth_problem(60, 5)
    ensemble, _ = fit_regressor(weights, y, names(5), model="ensemble", folds=3)
    single, _ = fit_regressor(weights, y, names(5), model="gp", folds=3)
    probe, _ = smooth_problem(30, 5, seed=3)
    mean, spread = ensemble.predict_with_spread(probe)
    each = np.stack([member.predict(probe) for member in ensemble.members])
    share = np.array(ensemble.member_weights)  # the blend CV chose, summing to 1
    np.testing.assert_allclose(share.sum(), 1.0)
    np.testing.assert_allclose(mean, share @ each)
    np.testing.assert_allclose(spread, np.sqrt(share @ (each - mean) ** 2))
    assert (share > 0).all()  # members CV gave no weight are left out
    assert spread.max() > 0 or len(share) == 1
    assert single.predict_with_spread(probe)[1].max() == 0


def test_mixing_law_recovers_a_loss_that_follows_one():
    # loss = floor + exp(scale + t . w), the data-mixing-law form, with a little noise
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(6, 0.5), size=200)
    exponents = rng.uniform(-3.0, 0.5, size=6)
    loss = 2.0 + np.exp(0.5 + weights @ exponents) + rng.normal(0, 0.002, size=200)
    law = _fit_law(weights[:150], loss[:150], ridge=1e-3)
    held_out = law.predict(weights[150:])
    assert np.sqrt(np.mean((held_out - loss[150:]) ** 2)) < 0.01 * loss.std()
    assert spearmanr(held_out, loss[150:])[0] > 0.99


def test_blend_weights_lie_on_the_simplex_and_favour_the_accurate_member():
    rng = np.random.default_rng(0)
    y = rng.normal(size=300)
    members = np.stack([y + rng.normal(0, 1.0, 300), y + rng.normal(0, 0.1, 300), -y])
    blend = _blend_weights(members, y)
    assert blend.shape == (3,) and (blend >= 0).all() and np.isclose(blend.sum(), 1.0)
    assert blend[1] >= 0.8 and blend[2] == 0


def per_domain_problem(rows: int, domains: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each domain's loss gains, with diminishing returns, mostly from its own weight."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(domains, 0.5), size=rows)
    floor = np.random.default_rng(domains).uniform(3.0, 5.0, size=domains)  # fixed per size
    losses = floor - 0.1 * np.log(weights + 0.01)
    return weights, losses + rng.normal(0, 0.01, size=losses.shape)


def test_a_mean_target_is_fitted_per_domain_when_cv_says_so():
    weights, losses = per_domain_problem(40, 8)
    shares = np.full(8, 1 / 8)
    regressor, report = fit_target(weights, losses, shares, names(8))
    assert report.model == PER_DOMAIN and regressor.model == PER_DOMAIN
    assert report.cv_by_model[PER_DOMAIN] > max(report.cv_by_model[m] for m in MODELS)
    assert len(report.settings["parts"]) == 8 and len(report.out_of_fold) == 40
    whole, _ = fit_regressor(weights, losses @ shares, names(8))
    fresh_weights, fresh_losses = per_domain_problem(200, 8, seed=1)
    fresh_y = fresh_losses @ shares
    per_domain_rho = spearmanr(regressor.predict(fresh_weights), fresh_y)[0]
    assert per_domain_rho > spearmanr(whole.predict(fresh_weights), fresh_y)[0] + 0.03
    assert per_domain_rho > 0.9


def test_a_per_domain_model_sums_its_parts_and_their_spreads(tmp_path):
    weights, losses = per_domain_problem(40, 4)
    shares = np.array([0.5, 0.2, 0.2, 0.1])  # a weighted mean, not the plain one
    regressor, _ = fit_target(weights, losses, shares, names(4), model=PER_DOMAIN, folds=3)
    probe, _ = per_domain_problem(30, 4, seed=2)
    parts = [part.predict_with_spread(probe) for part in regressor.members]
    mean, spread = regressor.predict_with_spread(probe)
    np.testing.assert_allclose(mean, shares @ np.stack([p for p, _ in parts]))
    np.testing.assert_allclose(spread, shares @ np.stack([s for _, s in parts]))
    regressor.save(tmp_path / "model")
    loaded = Regressor.load(tmp_path / "model")
    for before, after in zip(regressor.predict_with_spread(probe), loaded.predict_with_spread(probe),
                             strict=True):
        np.testing.assert_array_equal(before, after)
    assert list(loaded.linear_coefficients) == names(4) and loaded.train_weights.shape == (40, 4)


def test_a_one_column_target_is_fitted_whole():
    weights, losses = per_domain_problem(30, 4)
    _, report = fit_target(weights, losses[:, :1], np.ones(1), names(4), folds=3)
    assert PER_DOMAIN not in report.cv_by_model
    with pytest.raises(ValueError, match="per-domain' needs a target over several loss columns"):
        fit_target(weights, losses[:, :1], np.ones(1), names(4), model=PER_DOMAIN)
    _, report = fit_target(weights, losses, np.full(4, 0.25), names(4), model="gp", folds=3)
    assert list(report.cv_by_model) == ["gp"]  # a named one-column model: no per-domain fit


def test_a_forced_per_domain_fit_names_a_constant_loss_column():
    weights, losses = per_domain_problem(30, 4)
    losses[:, 2] = 3.5
    with pytest.raises(ValueError, match=r"loss column 3 of 4 in the target is the same \(3.5\)"):
        fit_target(weights, losses, np.full(4, 0.25), names(4), model=PER_DOMAIN, folds=3)
    _, report = fit_target(weights, losses, np.full(4, 0.25), names(4), folds=3)
    assert PER_DOMAIN not in report.cv_by_model  # auto fits the target itself


def test_auto_skips_the_per_domain_fit_past_its_time_budget():
    weights, losses = per_domain_problem(30, 4)
    _, report = fit_target(weights, losses, np.full(4, 0.25), names(4), folds=3,
                           per_domain_max_seconds=1e-6)
    assert PER_DOMAIN not in report.cv_by_model
    assert report.settings["per_domain"].startswith("not tried: 4 parts would take about")


def test_predictions_in_batches_equal_one_batch(monkeypatch):
    weights, y = smooth_problem(60, 5)
    ensemble, _ = fit_regressor(weights, y, names(5), model="ensemble", folds=3)
    probe, _ = smooth_problem(50, 5, seed=4)
    whole = ensemble.predict_with_spread(probe)
    monkeypatch.setattr(saved, "PREDICT_BATCH_ROWS", 7)  # 50 rows: 8 batches
    for before, after in zip(whole, ensemble.predict_with_spread(probe), strict=True):
        np.testing.assert_allclose(before, after, rtol=0, atol=1e-12)


def test_the_gps_fused_posterior_mean_is_sklearns():
    weights, y = smooth_problem(80, 6)
    gp, _ = fit_regressor(weights, y, names(6), model="gp", folds=3)
    probe, _ = smooth_problem(40, 6, seed=5)
    probe[:5] = weights[:5]  # distance zero, where the fused distances round
    member = gp.members[0]
    features = _log_and_raw(probe)
    sklearn_mean = np.mean([posterior.predict(features) for posterior in member._gps], axis=0)
    np.testing.assert_allclose(member.predict(probe), sklearn_mean, rtol=0, atol=1e-9)


def test_linear_coefficients_name_every_domain():
    weights, y = smooth_problem(60, 5)
    regressor, _ = fit_regressor(weights, y, names(5), model="lightgbm", folds=3)
    assert list(regressor.linear_coefficients) == names(5)


def test_tiny_local_pipeline_sizes_work():
    weights, y = smooth_problem(24, 20)
    regressor, report = fit_regressor(weights, y, names(20), folds=5)
    assert np.isfinite(report.cv_spearman) and np.isfinite(regressor.predict(weights)).all()
    assert "law" not in report.cv_by_model  # 24 rows for 42 law parameters: left out
    # Fewer rows than folds: the folds are capped at the rows.
    _, report = fit_regressor(weights[:4], y[:4], names(20), model="linear", folds=5)
    assert np.isfinite(report.cv_rmse)


def test_tuning_keeps_the_best_of_the_defaults_and_the_trials():
    weights, y = smooth_problem(80, 5)
    _, untuned = fit_regressor(weights, y, names(5), model="lightgbm", folds=3)
    _, tuned = fit_regressor(weights, y, names(5), model="lightgbm", folds=3, tune_trials=4)
    assert tuned.cv_rmse <= untuned.cv_rmse + 1e-12
    assert tuned.settings["lightgbm"]["rounds"] >= 1


def test_bad_inputs_raise():
    weights, y = smooth_problem(30, 4)
    with pytest.raises(ValueError, match="unknown model"):
        fit_regressor(weights, y, names(4), model="forest")
    with pytest.raises(ValueError, match=r"\(rows, domains\)"):
        fit_regressor(weights, y, names(5))
    regressor, _ = fit_regressor(weights, y, names(4), model="linear")
    with pytest.raises(ValueError, match="4 domains"):
        regressor.predict(np.ones((2, 3)) / 3)


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared paper data not present")
def test_real_paper_data_with_128_training_rows():
    train = read_proxy_csvs(
        PAPER_DATA / "train_mixture_1m.csv", PAPER_DATA / "train_pile_loss_1m.csv"
    )
    test = read_proxy_csvs(PAPER_DATA / "test_mixture_1m.csv", PAPER_DATA / "test_pile_loss_1m.csv")
    target = train.targets.index(PILE_CC)
    regressor, _ = fit_regressor(train.weights[:128], train.losses[:128, target], train.domains)
    rho = spearmanr(regressor.predict(test.weights), test.losses[:, test.targets.index(PILE_CC)])
    assert rho[0] >= 0.97


def test_domain_interactions_recover_how_each_weight_moves_each_loss():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(4), size=200)
    effects = np.array([[-1.0, 0.2, 0.0, 0.3], [0.1, -0.8, 0.4, 0.0]])  # loss rows, domain columns
    losses = 3 + weights @ effects.T + rng.normal(0, 1e-3, (200, 2))
    found = domain_interactions(weights, losses)
    # Weights sum to 1, so coefficients are identified up to a constant per loss
    np.testing.assert_allclose(found - found.mean(axis=1, keepdims=True),
                               effects - effects.mean(axis=1, keepdims=True), atol=0.02)


def test_rows_far_off_their_prediction_are_left_out_and_the_fit_recovers(monkeypatch):
    # A run that went wrong (a bad seed, a mislabelled mixture) bends every model near it.
    weights, y = smooth_problem(150, 6)
    planted = np.arange(0, 150, 19)
    y[planted] += 0.1  # about 20 noise SDs
    fresh_weights, fresh_y = smooth_problem(200, 6, seed=1)
    regressor, report = fit_regressor(weights, y, names(6))
    assert report.left_out == planted.tolist() == report.settings["outlier_rows"]
    monkeypatch.setattr(selection, "OUTLIER_ROUNDS", 0)
    bent, kept_all = fit_regressor(weights, y, names(6))
    assert kept_all.left_out == []
    assert report.cv_spearman > kept_all.cv_spearman  # scored on every row, the planted too
    error = np.sqrt(np.mean((regressor.predict(fresh_weights) - fresh_y) ** 2))
    assert error < 0.5 * np.sqrt(np.mean((bent.predict(fresh_weights) - fresh_y) ** 2))


def test_a_left_out_run_is_not_the_best_training_proxy():
    weights, y = smooth_problem(60, 4)
    y[5] = y.min() - 0.3  # a run gone wrong, low: the best proxy it is not evidence of
    regressor, report = fit_regressor(weights, y, names(4), model="gp")
    assert 5 in report.left_out
    assert regressor.fit_summary["best_train_target"] == np.delete(y, report.left_out).min()


def test_a_refit_that_predicts_a_constant_is_not_kept():
    # Spearman of a constant prediction is taken as 0, above a first fit's negative CV score.
    weights = np.random.default_rng(0).dirichlet(np.ones(3), size=30)
    y = np.full(30, 3.0)
    y[7] = 3.5
    regressor, report = fit_regressor(weights, y, names(3))
    assert report.left_out == []
    fresh = np.random.default_rng(1).dirichlet(np.ones(3), size=100)
    assert np.ptp(regressor.predict(fresh)) > 0


def test_a_per_domain_fit_says_which_domains_left_a_proxy_out():
    weights, _ = smooth_problem(40, 3)
    rng = np.random.default_rng(1)
    columns = 3.0 + 0.1 * np.log(weights + 0.01) + rng.normal(0, 0.005, (40, 3))
    columns[[4, 5], 1] += 0.2  # two runs gone wrong on the second domain only
    columns[[8, 9], 2] += 0.2
    target = {"d0": 1 / 3, "d1": 1 / 3, "d2": 1 / 3}
    _, report = fit_target(weights, columns, np.full(3, 1 / 3), names(3), model=PER_DOMAIN)
    assert {4, 5, 8, 9} <= set(report.left_out)
    fourth, eighth = (left_out_record(report, target, columns.mean(axis=1), row) for row in (4, 8))
    assert "d1" in fourth["left_out_by"] and "d2" not in fourth["left_out_by"]
    assert "d2" in eighth["left_out_by"] and eighth["target"] == columns[8].mean()


def test_clean_rows_are_all_kept():
    for seed in range(3):
        weights, y = smooth_problem(150, 6, seed)
        assert fit_regressor(weights, y, names(6))[1].left_out == []


def test_predictions_are_only_for_mixtures():
    weights, y = smooth_problem(30, 3)
    regressor, _ = fit_regressor(weights, y, names(3), model="linear", folds=3)
    rounded = weights[:4] * 1.003  # off by rounding, as the paper's CSVs' rows are: renormalised
    np.testing.assert_allclose(regressor.predict(rounded),
                               regressor.predict(rounded / rounded.sum(axis=1, keepdims=True)))
    for bad, what in (([[np.nan, 0.5, 0.5]], "NaN or infinite weights"),
                      ([[-0.5, 1.0, 0.5]], "negative weights"),
                      ([[0.2, 0.3, 0.5], [20, 30, 50]], r"row\(s\) \[1\] of 2 have weights that "
                                                        r"do not sum to 1")):
        with pytest.raises(ValueError, match=what):
            regressor.predict(np.array(bad))


MODEL_CODE_CHECK = """
import sys
import mlflow.pyfunc
import numpy as np
import pandas as pd
import regmix  # another project's package of that name, imported first
logged = mlflow.pyfunc.load_model(sys.argv[1])
table = pd.DataFrame(np.load(sys.argv[2]), columns=sys.argv[3].split(","))
np.save(sys.argv[4], logged.predict(table))
assert not hasattr(regmix, "components") and "regmix.regression" not in sys.modules
"""


def test_a_logged_model_runs_its_own_code_whatever_regmix_is_imported(tmp_path, tracking):
    """A logged model carries its predictor as a package named after that code's hash: neither
    another project's `regmix` nor another regmix version's code stands in for it, and it
    needs no kfp where it is served."""
    weights, y = smooth_problem(30, 3)
    regressor, _ = fit_regressor(weights, y, names(3), model="linear", folds=3)
    regressor.save(tmp_path / "model")
    mlflow.set_tracking_uri(tracking["uri"])
    with mlflow.start_run(experiment_id=tracking["experiment_id"]) as run:
        log_mlflow_model(tmp_path / "model", regressor)
    uri = f"runs:/{run.info.run_id}/regressor"
    logged_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "logged")))
    (package,) = (logged_dir / "code").iterdir()
    assert package.name.startswith("regmix_regressor_")
    assert sorted(p.name for p in package.glob("*.py")) == sorted(PREDICTOR_MODULES)
    requirements = (logged_dir / "requirements.txt").read_text()
    assert "kfp" not in requirements and "optuna" not in requirements
    # Another version's model (other code, so another package name) loads beside this one in
    # this process, each running its own code, and the checkout's modules stay as they were
    other = Path(shutil.copytree(logged_dir, tmp_path / "other_version"))
    code = other / "code" / "regmix_regressor_other"
    (other / "code" / package.name).rename(code)
    (code / "pyfunc.py").write_text((code / "pyfunc.py").read_text().replace(
        "return self.regressor.predict(", "return 100 + self.regressor.predict("))
    mlmodel = other / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace(package.name, code.name))
    table = pd.DataFrame(weights, columns=names(3))[names(3)[::-1]]
    checkout_modules = {n: m for n, m in sys.modules.items() if n.startswith("regmix")}
    other_version = mlflow.pyfunc.load_model(str(other))
    logged = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(other_version.predict(table), 100 + regressor.predict(weights))
    np.testing.assert_allclose(logged.predict(table), regressor.predict(weights))
    assert all(sys.modules[n] is m for n, m in checkout_modules.items())
    with pytest.raises(Exception, match=r"mixture row\(s\) \[0\] of 1 have negative weights"):
        logged.predict(pd.DataFrame([[-0.5, 1.0, 0.5]], columns=names(3)))
    # In a process that imported another project's `regmix` first
    (tmp_path / "elsewhere" / "regmix").mkdir(parents=True)
    (tmp_path / "elsewhere" / "regmix" / "__init__.py").write_text("")
    (tmp_path / "check.py").write_text(MODEL_CODE_CHECK)
    np.save(tmp_path / "weights.npy", weights)
    subprocess.run([sys.executable, str(tmp_path / "check.py"), uri, str(tmp_path / "weights.npy"),
                    ",".join(names(3)), str(tmp_path / "predicted.npy")], check=True,
                   cwd=tmp_path / "elsewhere", env={**os.environ, "MLFLOW_TRACKING_URI": tracking["uri"],
                                                    "PYTHONPATH": str(tmp_path / "elsewhere")})
    np.testing.assert_allclose(np.load(tmp_path / "predicted.npy"), regressor.predict(weights))
