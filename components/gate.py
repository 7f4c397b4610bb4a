"""KFP ops: plan the gate's proxies and validate the prediction."""

import math
import numpy as np
from kfp import dsl
from kfp.dsl import Input
from scipy.stats import spearmanr
from scipy.stats import t as student_t



@component
def plan_gate_op(config: dict, data_meta: dict, chosen: dict, fit_report: dict,
                 regressor: Input[dsl.Model], tracking: dict) -> list:
    """Fresh gate mixtures and seed replicas, as proxy tasks."""
    from regmix.config.loading import parse_config
    from regmix.gate import plan_gate_proxies
    from regmix.regression.saved import saved_train_weights

    fitted = saved_train_weights(regressor.path, data_meta["domains"])
    return plan_gate_proxies(parse_config(config), data_meta, chosen["weights"],
                             fit_report["best_train_weights"], tracking, fitted)


@component
def validate_prediction_op(
    config: dict, gate_results: list, fit_report: dict, regressor: Input[dsl.Model], tracking: dict,
) -> bool:
    """Compare predicted and measured losses on the fresh proxies; log the decision.

    Returns only `passed`: kfp.local 2.17 cannot resolve a dsl.If on one of several named
    outputs, and the decision itself lives in MLflow (gate.json) and the report.
    """
    import mlflow
    import numpy as np

    from regmix.config.loading import parse_config
    from regmix.gate import CHOSEN, chosen_was_fitted, decide
    from regmix.regression.saved import Regressor
    from regmix.tracking.runs import stage_run

    cfg = parse_config(config)
    results = [r for task in gate_results for r in task["results"] if "error" not in r]
    model = Regressor.load(regressor.path)
    weights = np.array([[r["weights"][d] for d in model.domains] for r in results])
    ids = [r["id"] for r in results]
    predicted = dict(zip(ids, map(float, model.predict(weights)), strict=True))
    failed = [r for task in gate_results for r in task["results"] if "error" in r]
    chosen_failed = next((r for r in failed if r["id"] == CHOSEN), None)
    if chosen_failed:
        raise RuntimeError(f"the chosen mixture's gate proxy failed ({chosen_failed['error']}); "
                           "the gate cannot judge it. Rerun: finished proxies are reused")
    chosen = next(r["weights"] for r in results if r["id"] == CHOSEN)
    fitted = chosen_was_fitted(chosen, model.domains, model.train_weights)
    decision = decide(results, predicted, fit_report["target"], fit_report, cfg.gate, fitted)
    with stage_run(tracking, "gate", "validate-prediction"):
        mlflow.log_metrics({
            "gate.spearman": decision["spearman"], "gate.spearman_low": decision["spearman_low"],
            "gate.spearman_high": decision["spearman_high"],
            "gate.passed": float(decision["passed"]),
            "gate.chosen_measured": decision["chosen_measured"],
            "gate.chosen_predicted": decision["chosen_predicted"],
            "gate.best_train_measured": decision["best_train_measured"],
            "gate.tolerance": decision["tolerance"],
            "gate.proxies_reused": sum(r["reused"] for r in results),
            "gate.proxies_failed": len(failed),
        })
        mlflow.set_tag("gate.reason", decision["reason"])
        if failed:
            mlflow.log_dict({r["id"]: r["error"] for r in failed}, "failed_proxies.json")
        mlflow.log_dict(decision, "gate.json")
    return decision["passed"]
