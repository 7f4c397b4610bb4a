"""KFP ops: open and close the pipeline's MLflow parent run."""

import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from kfp import dsl



@component
def start_tracking_op(config: dict, tracking_uri: str, run_label: str, job_id: str,
                      compiled: str = "") -> dict:
    """Create the MLflow parent run for this pipeline run (labelled by the caller or job id),
    once the run's config is known to keep what the pipeline was compiled with (`compiled`:
    its COMPILED_SETTINGS as JSON)."""
    import json

    from regmix.config.loading import parse_config
    from regmix.config.schema import check_compiled_settings
    from regmix.tracking.runs import default_tracking_uri, start_pipeline_run

    if compiled:
        check_compiled_settings(parse_config(config), json.loads(compiled))
    return start_pipeline_run(
        tracking_uri or default_tracking_uri(), config["name"], run_label or job_id, config
    )


@component
def finish_tracking_op(config: dict, tracking_uri: str, run_label: str, job_id: str,
                       status: dsl.PipelineTaskFinalStatus, report: dsl.Output[dsl.HTML],
                       summary: dsl.Output[dsl.Markdown]):
    """Exit handler: write the run report (shown in the KFP UI) and close the parent run."""
    import logging
    import shutil
    import tempfile
    from pathlib import Path

    from regmix.report import build_report
    from regmix.tracking.runs import default_tracking_uri, finish_pipeline_run

    uri, label = tracking_uri or default_tracking_uri(), run_label or job_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            html = build_report(uri, config["name"], label, Path(tmp), outcome=status.state)
            shutil.copy(html, report.path)
            shutil.copy(html.with_name("report.md"), summary.path)
    except Exception:  # a report problem must not hide how the run itself ended
        logging.getLogger("regmix.report").exception("could not write the run report")
    finish_pipeline_run(uri, config["name"], label, status.state)
