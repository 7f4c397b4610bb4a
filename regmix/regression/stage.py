"""The fit-regression stage: every finished proxy's mixture and target loss, one fit chosen by
cross-validation, saved beside the results it was fitted on, and logged to MLflow with its CV
quality, learning curve, plots and the pyfunc model.
"""

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from regmix.config.sections import PER_DOMAIN
from regmix.files import replacing, write_text
from regmix.regression.linear import domain_interactions
from regmix.regression.pyfunc import log_mlflow_model
from regmix.regression.selection import FitReport, best_row, fit_target
from regmix.tracking import plots
from regmix.tracking.runs import PIPELINE_TAG, stage_run

DOMAIN_INTERACTION_PLOT = "domain_interaction.png"
PROXY_RESULTS_FILE = "proxy_results.json"  # beside the model: what it was fitted on


def plot_fit(folder: Path, target: str, y: np.ndarray, report: FitReport) -> Path:
    """The fit's out-of-fold predictions against the measured target."""
    title = f"{target}\n{report.model}, CV Spearman {report.cv_spearman:.4f}"
    return plots.predicted_vs_measured(y, report.out_of_fold, title,
                                       folder / "predicted_vs_measured.png", report.left_out)


def plot_domain_interactions(folder: Path, weights: np.ndarray, domains: list[str],
                             losses: dict[str, np.ndarray], linear_cv: float | None = None) -> Path:
    """The domain interactions of every validation loss in `losses` (name -> value per row)."""
    coefficients = domain_interactions(weights, np.column_stack(list(losses.values())))
    return plots.domain_interaction(coefficients, list(losses), domains,
                                    folder / DOMAIN_INTERACTION_PLOT, linear_cv)


def registered_name(experiment: str) -> str:
    return f"regmix-{experiment}-regressor"


def register(model_info, experiment: str, tracking: dict, report: FitReport, target: str,
             proxies: int) -> None:
    """The fitted regressor as a new version of the experiment's registered model, loadable as
    `models:/regmix-<experiment>-regressor/<version>`; what it predicts and how well it ranks in
    the version's description."""
    name = registered_name(experiment)
    version = mlflow.register_model(model_info.model_uri, name,
                                    tags={PIPELINE_TAG: tracking["pipeline_run"]})
    mlflow.MlflowClient(tracking["uri"]).update_model_version(
        name, version.version, description=f"target {target}: {report.model}, CV Spearman "
        f"{report.cv_spearman:.3f} (CV RMSE {report.cv_rmse:.4f}) on {proxies} proxies")


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
        by_error: dict[str, list[str]] = {}  # one cause (a full disk, say) fails them all alike
        for r in results:
            if "error" in r:
                by_error.setdefault(r["error"], []).append(r["id"])
        failures = "; ".join(f"{ids[0]}{f' and {len(ids) - 1} more' if len(ids) > 1 else ''}: "
                             f"{error}" for error, ids in by_error.items())
        raise RuntimeError(
            f"only {len(finished)} of {len(results)} proxies finished, fewer than "
            f"regression.min_proxy_fraction={min_fraction}. Failures: {failures}. The finished "
            "ones are in MLflow and a rerun reuses them, training the others again (a damaged "
            "checkpoint or kept result is removed first); a diverged proxy diverges again "
            "unless its learning rate is lowered."
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
        with replacing(out) as folder:
            model.save(folder)
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
        register(log_mlflow_model(out, model), cfg.name, tracking, report,
                 str(cfg.regression.target), len(results))
        # Every domain's validation loss, for the domain interactions: what the proxies measured
        measured = [d for d in domains + data_meta.get("targets", [])
                    if all(d in r["val_loss"] for r in results)]
        with tempfile.TemporaryDirectory() as folder:
            plot_fit(Path(folder), str(cfg.regression.target), losses, report)
            plot_domain_interactions(Path(folder), weights, domains, {
                d: np.array([r["val_loss"][d] for r in results]) for d in measured},
                report.cv_by_model.get("linear"))
            mlflow.log_artifacts(folder, "plots")
    return {
        "model": report.model, "cv_spearman": report.cv_spearman, "cv_rmse": report.cv_rmse,
        "target": target, "proxies": len(results), "learning_curve": curve,
        "best_train_id": results[best]["id"], "best_train_target": float(losses[best]),
        "best_train_weights": results[best]["weights"],
    }


def run_fit_regression(config, proxy_tasks: list[dict], meta: dict, tracking: dict,
                       out: Path) -> dict:
    """The fit-regression stage: mixture -> target loss on every finished proxy, saved to `out`."""
    every = [r for task in proxy_tasks for r in task["results"]]
    return fit_and_log(config, every, meta, tracking, out, "fit-regression")


def run_refit_regression(config, previous: Path, proxy_tasks: list[dict], meta: dict,
                         tracking: dict, active_round: int, out: Path) -> dict:
    """An active-learning round's refit: the previous fit's proxies plus this round's."""
    earlier = json.loads((previous / PROXY_RESULTS_FILE).read_text())
    every = earlier + [r for task in proxy_tasks for r in task["results"]]
    return fit_and_log(config, every, meta, tracking, out, f"fit-regression-round-{active_round}")
