"""KFP ops: the larger runs (chosen mixture and baselines), their comparison, the rank check."""

import numpy as np
from kfp import dsl
from kfp.dsl import Input
from scipy.stats import spearmanr



@component
def plan_large_op(config: dict, data_meta: dict, chosen: dict, fit_report: dict,
                  tracking: dict) -> list:
    """The large runs: chosen mixture and baselines, over seeds."""
    from regmix.config.loading import parse_config
    from regmix.evidence import plan_large_runs

    return plan_large_runs(parse_config(config), data_meta, chosen["weights"],
                           fit_report["best_train_weights"], tracking)


@component
def train_target_op(config: dict, run: dict, data: Input[dsl.Dataset]) -> dict:
    """Train one larger model (large, baseline or rank-check run) and log its losses."""
    from regmix.config.loading import parse_config
    from regmix.train.launcher import run_target

    # In process, torchrun over the pod's GPUs, or a PyTorchJob over several nodes.
    return run_target(data.path, run, parse_config(config))


@component
def compare_baselines_op(config: dict, results: list, fit_report: dict, tracking: dict) -> dict:
    """Chosen mixture vs baselines at the large size, judged against seed noise."""
    import mlflow

    from regmix.evidence import compare
    from regmix.tracking.runs import stage_run

    stats = compare(results, fit_report["target"])
    with stage_run(tracking, "evidence", "compare-baselines"):
        for name, s in stats.items():
            mlflow.log_metrics({f"large.{name}.{k}": s[k] for k in ("mean", "std", "margin", "noise")
                                if k in s})
            if s.get("chosen_wins") is not None:
                mlflow.log_metric(f"large.{name}.chosen_wins", float(s["chosen_wins"]))
        mlflow.log_dict(stats, "baselines.json")
    return stats


@component
def plan_rank_check_op(config: dict, data_meta: dict, proxy_results: list, tracking: dict) -> list:
    """Training mixtures to retrain at the larger rank-check size."""
    from regmix.config.loading import parse_config
    from regmix.evidence import plan_rank_check

    results = [r for task in proxy_results for r in task["results"]]
    return plan_rank_check(parse_config(config), data_meta, results, tracking)


@component
def rank_invariance_op(config: dict, proxy_results: list, rank_results: list, data_meta: dict,
                       tracking: dict) -> dict:
    """Spearman between proxy-size and larger-size rankings of the same mixtures."""
    import mlflow

    from regmix.config.loading import parse_config
    from regmix.evidence import rank_invariance
    from regmix.tracking.runs import stage_run

    target = parse_config(config).regression.target_weights(data_meta["domains"])
    results = [r for task in proxy_results for r in task["results"]]
    check = rank_invariance(results, rank_results, target)
    with stage_run(tracking, "evidence", "rank-invariance"):
        mlflow.log_metrics({"rank_invariance.spearman": check["spearman"],
                            "rank_invariance.mixtures": check["mixtures"]})
        mlflow.log_dict(check, "rank_invariance.json")
    return check
