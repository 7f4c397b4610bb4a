"""Run the pipeline on this machine through `kfp.local`, then summarise it from MLflow."""

import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import mlflow
from kfp import local
from rich.console import Console

from regmix.config.cluster import ClusterConfig
from regmix.config.schema import RegMixConfig
from regmix.errors import UserError
from regmix.files import cache_root
from regmix.pipelines.containers import (
    checked_server_uri,
    docker_runner,
    stop_containers,
    writable_by_the_image,
)
from regmix.pipelines.interrupt import Signalled, interrupted, stopping_on_signals
from regmix.pipelines.pipeline import build_pipeline
from regmix.pipelines.progress import ANSI, Display, RunView, fan_outs
from regmix.tracking.outcome import run_outcome
from regmix.tracking.runs import (
    OWNER_PID_ENV,
    PROXY_STAGES,
    checked_tracking_uri,
    default_tracking_uri,
    latest_run,
    runs_by_stage,
)


class PipelineFailed(RuntimeError):
    """A stage failed; the stage's own log (printed above it) says why."""


# kfp.local workaround: a stage's exception does not reach this process, only its log. A user
# error a stage raised is read back from its traceback's last line in the streamed task log.
USER_ERROR_CLASSES = {error.__name__: error for error in UserError.__subclasses__()}
USER_ERROR_LINE = re.compile(rf"^(?:regmix\.errors\.)?({'|'.join(USER_ERROR_CLASSES)}): (.+)$")
# Any other exception a stage ended with, its traceback's last line: the root cause, which the
# run's last line states (kfp.local's own error names only the task)
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Unavailable): .+$")
DISK_FULL = "No space left on device"


class TaskLog:
    """Where kfp.local prints the tasks' logs (a line at a time, through this process's stdout):
    passed on, and the last user error in them kept. An error only data preparation can see
    (a domain with too few tokens for its validation split) then ends `regmix run` as the
    checks before it do: one line naming the fix, not a stage's traceback."""

    def __init__(self, out, view: RunView | None = None):
        self.out, self.view, self.user_error, self.cause = out, view, None, None

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if match := USER_ERROR_LINE.match(line.strip()):
                self.user_error = USER_ERROR_CLASSES[match[1]](match[2])
            elif EXCEPTION_LINE.match(line.strip()):
                self.cause = line.strip()
            if self.view is not None:
                self.view.on_line(line)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


@contextmanager
def output_to(log_path: Path):
    """For the block, everything this process and its tasks print goes to `log_path`, at the
    file-descriptor level (loggers hold the old stderr, libraries write to fd 2 directly);
    yields a file on the stdout the block started with."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log, open(os.dup(saved[0]), "w", encoding="utf-8",
                                         errors="replace") as terminal:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in zip((1, 2), saved, strict=True):
                os.dup2(original, fd)
                os.close(original)


def run_local(config: RegMixConfig, tracking_uri: str | None = None,
              pipeline_root: Path = Path("mlruns/pipeline-root"), image: str | None = None,
              verbose: bool = False) -> dict:
    """Run every stage on this machine, as a subprocess or (config.runner docker) in the
    project's image; returns the run summary. The stages' log goes to a file under the pipeline
    root, a live view to stdout; `verbose` streams the log instead."""
    uri = checked_tracking_uri(tracking_uri or config.tracking.uri or default_tracking_uri())
    label = uuid.uuid4().hex[:12]
    if config.runner == "docker":
        runner, config = docker_runner(config, pipeline_root, image, label)
        uri, folders = checked_server_uri(uri), writable_by_the_image(pipeline_root)
    else:
        # The `cluster` section is for Kubernetes (pods, volumes, PyTorchJobs): here every stage
        # is a subprocess on this machine, whatever the section says.
        runner, folders = local.SubprocessRunner(use_venv=False), nullcontext()
        config = config.model_copy(update={"cluster": ClusterConfig()})
    root = pipeline_root.resolve()
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    pipeline = build_pipeline(config)
    log_path = root / "logs" / f"{label}.log"
    started = time.perf_counter()
    try:
        # The run's tasks tag its MLflow run with this process, so that a rerun can tell when
        # the run is dead and close it (regmix.tracking.runs.close_dead_runs)
        with folders, stopping_on_signals(), environment(OWNER_PID_ENV, str(os.getpid())):
            run_with_output(pipeline, config, uri, label, root, log_path, verbose)
    except Signalled as e:
        if config.runner == "docker":
            stop_containers(label)
        raise interrupted(e.signum, uri, config.name, label) from None
    return summarize(uri, config.name, label, time.perf_counter() - started)


def run_with_output(pipeline, config: RegMixConfig, uri: str, label: str, root: Path,
                    log_path: Path, verbose: bool) -> None:
    """The run with its log streamed (`verbose`), or in a file beside a live view."""
    if verbose:
        task_log = TaskLog(sys.stdout)
        run_pipeline(pipeline, uri, label, task_log)
    else:
        view = RunView(root, fan_outs(pipeline.pipeline_spec), config.regression.target)
        # Measured before fd 1 points at the log: rich would ask the log file
        width = shutil.get_terminal_size().columns
        with output_to(log_path) as terminal, log_path.open("a", buffering=1) as log:
            console = Console(file=terminal, width=width, soft_wrap=True, markup=False,
                              highlight=False)
            task_log = TaskLog(log, view)
            with Display(view, console, f"regmix run {label}: full log in {log_path}"):
                run_pipeline(pipeline, uri, label, task_log, log_path)


def run_pipeline(pipeline, uri: str, label: str, task_log: TaskLog,
                 log_path: Path | None = None) -> None:
    """The pipeline through kfp.local, its log to `task_log`; a failure as one error."""
    try:
        with warnings.catch_warnings(), redirect_stdout(task_log), run_scratch():
            # kfp.local warns, task by task, that each runs here rather than in its image
            # (ghcr.io/regmix/regmix): here that is the point, the stages run from this checkout.
            warnings.filterwarnings("ignore", "You may be attemping to run a task that uses "
                                    "custom or non-Python base image", RuntimeWarning)
            pipeline(tracking_uri=uri, run_label=label)
    except RuntimeError as e:
        if task_log.user_error is not None:
            raise task_log.user_error from None
        where = f"; its log: {log_path}" if log_path else ""
        cause = f"{root_cause(task_log.cause)}; " if task_log.cause else ""
        failed = ANSI.sub("", str(e))  # kfp.local colours task names
        raise PipelineFailed(f"{cause}pipeline run {label} failed: {failed}{where}") from None


def root_cause(line: str) -> str:
    """A stage's last exception line, with what to do where this process can tell."""
    if DISK_FULL in line:
        free = {str(path): shutil.disk_usage(path).free / 1e9
                for path in (cache_root(), Path.cwd()) if path.exists()}
        where = ", ".join(f"{gb:.1f} GB free at {path}" for path, gb in free.items())
        return (f"{line} ({where}): free some space, or point REGMIX_CACHE at a bigger disk, "
                "then rerun the same command (finished proxies are kept)")
    return line


@contextmanager
def run_scratch():
    """Point the tasks' TMPDIR at one folder of this run, removed when the run ends: each KFP
    task writes its program into a `mktemp -d` folder it never removes (a /tmp/tmp.* per task,
    about 30 a run), and the stages' own temporary files go there too."""
    scratch = tempfile.mkdtemp(prefix="regmix-run-")
    try:
        with environment("TMPDIR", scratch):
            yield
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def environment(name: str, value: str):
    """`name` set to `value` for the tasks this process starts within the block, and put back
    after it: a caller's process (a test, a notebook) keeps its own environment."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def summarize(tracking_uri: str, experiment: str, label: str, wall_seconds: float) -> dict:
    """The run's outcome, read back from MLflow, with where to find it."""
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    by_stage = runs_by_stage(client, exp.experiment_id, label)
    return {
        "pipeline_run": label,
        "wall_seconds": round(wall_seconds, 1),
        **run_outcome(by_stage),
        "mlflow": {
            "tracking_uri": tracking_uri,
            "experiment": experiment,
            "experiment_id": exp.experiment_id,
            "parent_run_id": latest_run(by_stage["pipeline"]).info.run_id,
            "run_ids": {stage: [r.info.run_id for r in rs] for stage, rs in by_stage.items()
                        if stage not in PROXY_STAGES},
        },
    }
