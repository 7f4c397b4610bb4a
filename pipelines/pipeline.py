"""The RegMix pipeline: wiring only; every stage lives in `components/`.

prepare_data -> sample_mixtures -> train_proxy x N (ParallelFor) -> fit_regression (Collected)
-> search_mixture -> [active learning x rounds: propose -> train_proxy (ParallelFor) -> refit
-> search_mixture] -> gate proxies (ParallelFor) -> validate_prediction
-> [If passed] large runs: chosen mixture + baselines x seeds (ParallelFor) -> compare
Optionally, beside the gate: the rank-invariance check (training mixtures retrained larger).
An exit handler closes the MLflow parent run as FINISHED or FAILED whatever happens.

kfp.local 2.17 replaces upstream task-output parameters inside a ParallelFor body with the
loop item, so loop bodies take only the item, pipeline parameters and artifacts; the planning
steps put the tracking context into each item.
"""

import json

from kfp import dsl

from regmix.components.active import propose_proxies_op
from regmix.components.data import data_settings_op, prepare_data_op
from regmix.components.gate import plan_gate_op, validate_prediction_op
from regmix.components.large import (
    compare_baselines_op,
    plan_large_op,
    plan_rank_check_op,
    rank_invariance_op,
    train_target_op,
)
from regmix.components.mixtures import sample_mixtures_op
from regmix.components.proxy import train_proxy_op
from regmix.components.regression import fit_regression_op, refit_regression_op
from regmix.components.search import search_mixture_op
from regmix.components.tracking import finish_tracking_op, start_tracking_op
from regmix.config.schema import RegMixConfig, compiled_settings
from regmix.pipelines.cluster import apply_cluster_settings


def build_pipeline(config: RegMixConfig):
    """A KFP pipeline for this config; the config is its (overridable) `config` parameter."""
    # KFP parameters cannot hold nulls; an absent key means the same (every optional field
    # defaults to None).
    defaults = config.model_dump(mode="json", exclude_none=True)
    parallelism, large_parallelism = config.proxy.parallelism, config.large.parallelism
    rank_check = config.rank_check.mixtures > 0
    active_rounds = config.active_learning.rounds
    cluster = config.cluster
    compiled = json.dumps(compiled_settings(config))  # a run may not change these

    # The config's tracking.uri is the runs' default; without one the pods use
    # $MLFLOW_TRACKING_URI (from `cluster.mlflow_secret`).
    @dsl.pipeline(name=config.name, description="RegMix: data mixture as regression")
    def regmix(config: dict = defaults, tracking_uri: str = config.tracking.uri or "",
               run_label: str = ""):
        run = {"config": config, "tracking_uri": tracking_uri, "run_label": run_label,
               "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        with dsl.ExitHandler(finish_tracking_op(**run), name="track-run"):
            tracking = start_tracking_op(**run, compiled=compiled).output
            data = prepare_data_op(settings=data_settings_op(config=config).output)
            meta, tokens = data.outputs["Output"], data.outputs["data"]
            plan = sample_mixtures_op(config=config, data_meta=meta, tracking=tracking)
            with dsl.ParallelFor(plan.output, parallelism=parallelism) as task:
                proxies = train_proxy_op(config=config, task=task, data=tokens)
            fit = fit_regression_op(config=config, proxy_results=dsl.Collected(proxies.output),
                                    data_meta=meta,
                                    tracking=tracking)
            search = search_mixture_op(config=config, regressor=fit.outputs["regressor"],
                                       data_meta=meta, tracking=tracking)
            for active_round in range(1, active_rounds + 1):  # unrolled: KFP has no loops
                proposal = propose_proxies_op(config=config, regressor=fit.outputs["regressor"],
                                              chosen=search.outputs["Output"], data_meta=meta,
                                              tracking=tracking, active_round=active_round)
                with dsl.ParallelFor(proposal.output, parallelism=parallelism) as active_task:
                    active = train_proxy_op(config=config, task=active_task, data=tokens,
                                            stage="active-proxy")
                fit = refit_regression_op(config=config, previous=fit.outputs["regressor"],
                                          proxy_results=dsl.Collected(active.output),
                                          data_meta=meta, tracking=tracking,
                                          active_round=active_round)
                search = search_mixture_op(config=config, regressor=fit.outputs["regressor"],
                                           data_meta=meta, tracking=tracking)
            fit_report, chosen = fit.outputs["Output"], search.outputs["Output"]

            gate_plan = plan_gate_op(config=config, data_meta=meta, chosen=chosen,
                                     fit_report=fit_report, regressor=fit.outputs["regressor"],
                                     tracking=tracking)
            with dsl.ParallelFor(gate_plan.output, parallelism=parallelism) as gate_task:
                gate_proxies = train_proxy_op(config=config, task=gate_task, data=tokens,
                                              stage="gate-proxy")
            gate = validate_prediction_op(
                config=config, gate_results=dsl.Collected(gate_proxies.output),
                fit_report=fit_report, regressor=fit.outputs["regressor"], tracking=tracking,
            )
            with dsl.If(gate.output == True, name="gate-passed"):  # noqa: E712
                large_plan = plan_large_op(config=config, data_meta=meta, chosen=chosen,
                                           fit_report=fit_report, tracking=tracking)
                with dsl.ParallelFor(large_plan.output, parallelism=large_parallelism) as large_run:
                    large = train_target_op(config=config, run=large_run, data=tokens)
                compare_baselines_op(config=config, results=dsl.Collected(large.output),
                                     fit_report=fit_report, tracking=tracking)

            if rank_check:
                # One Collected per consumer: the KFP compiler cannot share one between tasks.
                rank_plan = plan_rank_check_op(config=config, data_meta=meta,
                                               proxy_results=dsl.Collected(proxies.output),
                                               tracking=tracking)
                with dsl.ParallelFor(rank_plan.output, parallelism=large_parallelism) as rank_run:
                    ranked = train_target_op(config=config, run=rank_run, data=tokens)
                rank_invariance_op(config=config, proxy_results=dsl.Collected(proxies.output),
                                   rank_results=dsl.Collected(ranked.output), data_meta=meta,
                                   tracking=tracking)

        apply_cluster_settings(cluster)  # every task's image, resources, volumes, retries

    return regmix
