"""The RegMix pipeline: wiring only; every stage lives in `components/`.

prepare_data -> sample_mixtures -> train_proxy x N (ParallelFor) -> fit_regression (Collected)
-> search_mixture -> gate proxies (ParallelFor) -> validate_prediction -> [If passed] train_large
An exit handler closes the MLflow parent run as FINISHED or FAILED whatever happens.
"""

from kfp import dsl

from components.config import RegMixConfig
from components.data import prepare_data_op
from components.gate import plan_gate_op, validate_prediction_op
from components.large import train_large_op
from components.mixtures import sample_mixtures_op
from components.proxy import train_proxy_op
from components.regression import fit_regression_op
from components.search import search_mixture_op
from components.tracking import finish_tracking_op, start_tracking_op


def build_pipeline(config: RegMixConfig):
    """A KFP pipeline for this config; the config is its (overridable) `config` parameter."""
    # KFP parameters cannot hold nulls; an absent key means the same (every optional field
    # defaults to None).
    defaults = config.model_dump(mode="json", exclude_none=True)
    parallelism = config.proxy.parallelism

    @dsl.pipeline(name=config.name, description="RegMix: data mixture as regression")
    def regmix(config: dict = defaults, tracking_uri: str = "", run_label: str = ""):
        run = {"config": config, "tracking_uri": tracking_uri, "run_label": run_label,
               "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        with dsl.ExitHandler(finish_tracking_op(**run), name="track-run"):
            tracking = start_tracking_op(**run).output
            data = prepare_data_op(config=config)
            meta, tokens = data.outputs["Output"], data.outputs["data"]
            plan = sample_mixtures_op(config=config, data_meta=meta, tracking=tracking)
            with dsl.ParallelFor(plan.output, parallelism=parallelism) as task:
                proxies = train_proxy_op(config=config, task=task, data=tokens)
            fit = fit_regression_op(config=config, proxy_results=dsl.Collected(proxies.output),
                                    data_meta=meta, tracking=tracking)
            search = search_mixture_op(config=config, regressor=fit.outputs["regressor"],
                                       data_meta=meta, tracking=tracking)
            chosen = search.outputs["Output"]
            gate_plan = plan_gate_op(config=config, data_meta=meta, chosen=chosen, tracking=tracking)
            with dsl.ParallelFor(gate_plan.output, parallelism=parallelism) as gate_task:
                gate_proxies = train_proxy_op(config=config, task=gate_task, data=tokens,
                                              stage="gate-proxy")
            gate = validate_prediction_op(
                config=config, gate_results=dsl.Collected(gate_proxies.output),
                fit_report=fit.outputs["Output"], regressor=fit.outputs["regressor"],
                tracking=tracking,
            )
            with dsl.If(gate.outputs["passed"] == True, name="gate-passed"):  # noqa: E712
                train_large_op(config=config, chosen=chosen, data=tokens, tracking=tracking)

    return regmix
