"""Stage 5, validate_prediction: does the regression's prediction hold on fresh proxies?

Fresh mixtures, never seen by the regression, are trained as proxies alongside the chosen
mixture. The gate passes when the predicted and measured rankings agree (Spearman at least the
threshold) and the chosen mixture measures no worse than the best training proxy by more than
the regression's cross-validated error.
"""

from typing import NamedTuple

import numpy as np
from kfp import dsl
from kfp.dsl import Input
from scipy.stats import spearmanr

from components import component
from components.config import target_loss
from components.mixtures import (
    as_mixtures,
    chunk,
    epoch_caps,
    proxy_key,
    sample_mixtures,
    token_prior,
)


def plan_gate_proxies(config, meta: dict, chosen: dict[str, float], tracking: dict) -> list[dict]:
    """The chosen mixture plus fresh held-out mixtures, drawn with a seed the training never used."""
    domains = meta["domains"]
    tokens = np.array([meta["tokens"][d]["train"] for d in domains], dtype=np.int64)
    mix = config.mixtures
    rng = np.random.default_rng([config.seed, 1])  # a separate stream from the training draw
    fresh = sample_mixtures(
        token_prior(tokens, mix.temperature), config.gate.proxies - 1,
        epoch_caps(tokens, config.proxy.train.tokens, mix.max_epochs), rng,
        (mix.strength_min, mix.strength_max), mix.min_weight,
    )
    weights = np.vstack([[chosen[d] for d in domains], fresh])
    mixtures = as_mixtures(weights, domains, "g", proxy_key(config, meta))
    mixtures[0]["id"] = "chosen"
    return chunk(mixtures, config.proxy.per_task, tracking)


def decide(
    results: list[dict], predicted: dict[str, float], target: dict[str, float],
    best_train: float, cv_rmse: float, threshold: float,
) -> dict:
    """The gate decision and every number behind it."""
    measured = {r["id"]: target_loss(r["val_loss"], target) for r in results}
    ids = sorted(measured)
    spearman = float(spearmanr([predicted[i] for i in ids], [measured[i] for i in ids]).statistic)
    spearman = 0.0 if np.isnan(spearman) else spearman
    chosen = measured["chosen"]
    ranks_ok = spearman >= threshold
    chosen_ok = chosen <= best_train + cv_rmse
    reasons = []
    if not ranks_ok:
        reasons.append(f"Spearman {spearman:.3f} on {len(ids)} fresh proxies < {threshold}")
    if not chosen_ok:
        reasons.append(f"chosen mixture measured {chosen:.4f} > best training proxy "
                       f"{best_train:.4f} + CV RMSE {cv_rmse:.4f}")
    return {
        "passed": ranks_ok and chosen_ok,
        "reason": "; ".join(reasons) or "prediction validated",
        "spearman": spearman,
        "threshold": threshold,
        "chosen_measured": chosen,
        "chosen_predicted": predicted["chosen"],
        "best_train_measured": best_train,
        "cv_rmse": cv_rmse,
        "measured": measured,
        "predicted": predicted,
    }


@component
def plan_gate_op(config: dict, data_meta: dict, chosen: dict, tracking: dict) -> list:
    """Fresh gate mixtures (the chosen one first), as proxy tasks."""
    from components.config import parse_config
    from components.gate import plan_gate_proxies

    return plan_gate_proxies(parse_config(config), data_meta, chosen["weights"], tracking)


@component
def validate_prediction_op(
    config: dict, gate_results: list, fit_report: dict, regressor: Input[dsl.Model], tracking: dict,
) -> NamedTuple("GateOutputs", passed=bool, decision=dict):
    """Compare predicted and measured losses on the fresh proxies; log the decision."""
    from collections import namedtuple

    import mlflow
    import numpy as np

    from components.config import parse_config
    from components.gate import decide
    from components.regression import Regressor
    from components.tracking import stage_run

    cfg = parse_config(config)
    results = [r for task in gate_results for r in task["results"]]
    model = Regressor.load(regressor.path)
    weights = np.array([[r["weights"][d] for d in model.domains] for r in results])
    ids = [r["id"] for r in results]
    predicted = dict(zip(ids, map(float, model.predict(weights)), strict=True))
    decision = decide(results, predicted, fit_report["target"], fit_report["best_train_target"],
                      fit_report["cv_rmse"], cfg.gate.spearman_threshold)
    with stage_run(tracking, "gate", "validate-prediction"):
        mlflow.log_metrics({"gate.spearman": decision["spearman"],
                            "gate.passed": float(decision["passed"]),
                            "gate.chosen_measured": decision["chosen_measured"],
                            "gate.chosen_predicted": decision["chosen_predicted"],
                            "gate.proxies_reused": sum(r["reused"] for r in results)})
        mlflow.set_tag("gate.reason", decision["reason"])
        mlflow.log_dict(decision, "gate.json")
    return namedtuple("GateOutputs", ["passed", "decision"])(decision["passed"], decision)
