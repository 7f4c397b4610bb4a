"""KFP ops: open and close the pipeline's MLflow parent run."""

from kfp import dsl

from regmix.components import component


@component
def start_tracking_op(config: dict, tracking_uri: str, run_label: str, job_id: str,
                      compiled: str = "") -> dict:
    """Create the MLflow parent run for this pipeline run (labelled by the caller or job id)."""
    from regmix.tracking.runs import run_start_tracking

    return run_start_tracking(config, tracking_uri, run_label or job_id, compiled)


@component
def finish_tracking_op(config: dict, tracking_uri: str, run_label: str, job_id: str,
                       status: dsl.PipelineTaskFinalStatus, report: dsl.Output[dsl.HTML],
                       summary: dsl.Output[dsl.Markdown]):
    """Exit handler: write the run report (shown in the KFP UI) and close the parent run."""
    from pathlib import Path

    from regmix.report import run_finish_tracking

    run_finish_tracking(config["name"], tracking_uri, run_label or job_id, status.state,
                        Path(report.path), Path(summary.path))
