"""Run the pipeline on this machine through `kfp.local`, then summarise it from MLflow."""

import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import mlflow
from kfp import local

from regmix.config.cluster import ClusterConfig
from regmix.config.schema import RegMixConfig
from regmix.errors import UserError
from regmix.pipelines.pipeline import build_pipeline
from regmix.tracking.runs import (
    OWNER_PID_ENV,
    PROXY_STAGES,
    checked_tracking_uri,
    default_tracking_uri,
    latest_run,
    runs_by_stage,
)

TRAINING_STAGES = (*PROXY_STAGES, "large", "baseline", "rank")


class PipelineFailed(RuntimeError):
    """A stage failed; the stage's own log (printed above it) says why."""


# kfp.local workaround: a stage's exception does not reach this process, only its log. A user
# error a stage raised is read back from its traceback's last line in the streamed task log.
USER_ERROR_CLASSES = {error.__name__: error for error in UserError.__subclasses__()}
USER_ERROR_LINE = re.compile(rf"^(?:regmix\.errors\.)?({'|'.join(USER_ERROR_CLASSES)}): (.+)$")


class TaskLog:
    """Where kfp.local prints the tasks' logs (a line at a time, through this process's stdout):
    passed on, and the last user error in them kept. An error only data preparation can see
    (a domain with too few tokens for its validation split) then ends `regmix run` as the
    checks before it do: one line naming the fix, not a stage's traceback."""

    def __init__(self, out):
        self.out, self.user_error = out, None

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if match := USER_ERROR_LINE.match(line.strip()):
                self.user_error = USER_ERROR_CLASSES[match[1]](match[2])
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def run_local(config: RegMixConfig, tracking_uri: str | None = None,
              pipeline_root: Path = Path("mlruns/pipeline-root")) -> dict:
    """Run every stage as a local subprocess; returns the run summary."""
    # The `cluster` section is for Kubernetes (pods, volumes, PyTorchJobs): here every stage is
    # a subprocess on this machine, whatever the section says.
    config = config.model_copy(update={"cluster": ClusterConfig()})
    uri = checked_tracking_uri(tracking_uri or config.tracking.uri or default_tracking_uri())
    label = uuid.uuid4().hex[:12]
    # The run's tasks tag its MLflow run with this process, so that a rerun can tell when the
    # run is dead and close it (regmix.tracking.runs.close_dead_runs)
    os.environ[OWNER_PID_ENV] = str(os.getpid())
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(pipeline_root.resolve()), raise_on_error=True)
    started = time.perf_counter()
    task_log = TaskLog(sys.stdout)
    try:
        with warnings.catch_warnings(), redirect_stdout(task_log), run_scratch():
            # kfp.local warns, task by task, that each runs here rather than in its image
            # (ghcr.io/regmix/regmix): here that is the point, the stages run from this checkout.
            warnings.filterwarnings("ignore", "You may be attemping to run a task that uses "
                                    "custom or non-Python base image", RuntimeWarning)
            build_pipeline(config)(tracking_uri=uri, run_label=label)
    except RuntimeError as e:
        if task_log.user_error is not None:
            raise task_log.user_error from None
        raise PipelineFailed(f"pipeline run {label} failed: {e}") from None
    return summarize(uri, config.name, label, time.perf_counter() - started)


@contextmanager
def run_scratch():
    """Point the tasks' TMPDIR at one folder of this run, removed when the run ends: each KFP
    task writes its program into a `mktemp -d` folder it never removes (a /tmp/tmp.* per task,
    about 30 a run), and the stages' own temporary files go there too."""
    scratch = tempfile.mkdtemp(prefix="regmix-run-")
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = scratch
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
        shutil.rmtree(scratch, ignore_errors=True)


def evidence_metric(by_stage: dict, name: str) -> float | None:
    return next((r.data.metrics[name] for r in by_stage.get("evidence", [])
                 if name in r.data.metrics), None)


def evidence_names(by_stage: dict) -> list[str]:
    """The mixtures the compare stage compared (its metrics are `large.<name>.mean`)."""
    return sorted({key.removeprefix("large.").removesuffix(".mean")
                   for r in by_stage.get("evidence", []) for key in r.data.metrics
                   if key.startswith("large.") and key.endswith(".mean")})


def comparisons(run, prefix: str) -> dict:
    """Each baseline's record in a run's metrics `<prefix>.<name>.<key>`, as the summary gives
    it: mean, std, seeds, margin (baseline - chosen), noise (the one-sided paired bound; None
    without one) and chosen_wins (margin > noise; False without a bound)."""
    metrics = run.data.metrics if run else {}
    names = sorted({key[len(prefix) + 1:].rsplit(".", 1)[0] for key in metrics
                    if key.startswith(f"{prefix}.") and key.endswith(".margin")})
    return {name: {"mean": metrics[f"{prefix}.{name}.mean"],
                   "std": metrics.get(f"{prefix}.{name}.std"),
                   "seeds": int(metrics.get(f"{prefix}.{name}.seeds", 1)),
                   "margin": metrics[f"{prefix}.{name}.margin"],
                   "noise": metrics.get(f"{prefix}.{name}.noise"),
                   "chosen_wins": bool(metrics.get(f"{prefix}.{name}.chosen_wins", 0.0))}
            for name in names}


def summarize(tracking_uri: str, experiment: str, label: str, wall_seconds: float) -> dict:
    """The run's outcome, read back from MLflow (the record of truth, not in-process state)."""
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    by_stage = runs_by_stage(client, exp.experiment_id, label)
    fit, search, gate = (latest_run(by_stage.get(s)) for s in ("regression", "search", "gate"))
    # Runs this pipeline run trained, per stage; reused results log no run of their own.

    def count(stage: str, finished: bool) -> int:
        return sum((r.info.status == "FINISHED") == finished for r in by_stage.get(stage, []))

    trained = {stage: count(stage, finished=True) for stage in TRAINING_STAGES}
    failed = {stage: n for stage in TRAINING_STAGES if (n := count(stage, finished=False))}
    summary = {
        "pipeline_run": label,
        "wall_seconds": round(wall_seconds, 1),
        "chosen_mixture": {k.removeprefix("weight."): float(v)
                           for k, v in search.data.params.items() if k.startswith("weight.")},
        "predicted_loss": search.data.metrics["predicted_loss"],
        "cv_spearman": fit.data.metrics["cv_spearman"],
        "gate_spearman": gate.data.metrics["gate.spearman"] if gate else None,
        "gate_passed": bool(gate.data.metrics["gate.passed"]) if gate else False,
        "gate_reason": gate.data.tags.get("gate.reason") if gate else "gate did not run",
        # From the compare stage, which sees reused large runs too (those log no new run).
        "large_target_loss": evidence_metric(by_stage, "large.chosen.mean"),
        "baselines": {name: evidence_metric(by_stage, f"large.{name}.mean")
                      for name in evidence_names(by_stage) if name != "chosen"},
        # The chosen mixture against each baseline, seed by seed: at proxy size in the gate,
        # at the larger size after it
        "gate_baselines": comparisons(gate, "gate"),
        "evidence": comparisons(next((r for r in by_stage.get("evidence", [])
                                      if "large.chosen.mean" in r.data.metrics), None), "large"),
        "rank_invariance_spearman": evidence_metric(by_stage, "rank_invariance.spearman"),
        "trained": trained,
        "failed": failed,  # stages with failed training runs only
        "proxies_trained": sum(trained[stage] for stage in PROXY_STAGES),
        "proxies_reused": int(fit.data.metrics["proxies_reused"])
        + int(gate.data.metrics.get("gate.proxies_reused", 0) if gate else 0),
        "mlflow": {
            "tracking_uri": tracking_uri,
            "experiment": experiment,
            "experiment_id": exp.experiment_id,
            "parent_run_id": latest_run(by_stage["pipeline"]).info.run_id,
            "run_ids": {stage: [r.info.run_id for r in rs] for stage, rs in by_stage.items()
                        if stage not in PROXY_STAGES},
        },
    }
    return summary
