"""KFP ops: plan the gate's proxies and validate the prediction."""

from kfp import dsl

from regmix.components import component


@component
def plan_gate_op(config: dict, data_meta: dict, chosen: dict, fit_report: dict,
                 regressor: dsl.Input[dsl.Model], tracking: dict) -> list:
    """Fresh gate mixtures and seed replicas, as proxy tasks."""
    from pathlib import Path

    from regmix.components.loop_items import with_tracking
    from regmix.config.loading import parse_config
    from regmix.gate import run_plan_gate

    tasks = run_plan_gate(parse_config(config), data_meta, chosen, fit_report, Path(regressor.path))
    return with_tracking(tasks, tracking)


@component
def validate_prediction_op(
    config: dict, gate_results: list, fit_report: dict, regressor: dsl.Input[dsl.Model], tracking: dict,
) -> bool:
    """Compare predicted and measured losses on the fresh proxies; log the decision.

    Returns only `passed`: kfp.local 2.17 cannot resolve a dsl.If on one of several named
    outputs, and the decision itself lives in MLflow (gate.json) and the report.
    """
    from pathlib import Path

    from regmix.config.loading import parse_config
    from regmix.gate import run_validate_prediction

    decision = run_validate_prediction(parse_config(config), gate_results, fit_report,
                                       Path(regressor.path), tracking)
    return decision["passed"]
