"""MLflow bookkeeping shared by every stage, and the pipeline's start-tracking step.

The names here are the contract users see in the MLflow UI: one experiment per pipeline name,
one parent run per pipeline run, one child run per stage task tagged `regmix.stage`.
"""

import fcntl
import functools
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from regmix.config.loading import parse_config
from regmix.config.schema import check_compiled_settings
from regmix.errors import ConfigError, TrackingUnavailable
from regmix.probe import http_status

STAGE_TAG, PIPELINE_TAG, HASH_TAG = "regmix.stage", "regmix.pipeline_run", "regmix.mixture_hash"
CORPUS_TAG = "regmix.corpus_fingerprint"  # the prepared data (tokenizer + arrays) a proxy saw
OWNER_TAG = "regmix.owner"  # host:pid of the process a pipeline run lives in
OWNER_PID_ENV = "REGMIX_RUN_PID"  # set by `regmix run` for the stages it starts
# Stages whose runs are proxies: the training draw, active-learning rounds and the gate.
PROXY_STAGES = ("proxy", "active-proxy", "gate-proxy")
# MLflow 3 opens an experiment of this kind on its runs table, not on the GenAI overview
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow calls that fail transiently are retried with exponential backoff (BACKOFF_S, twice
# that, ..., at most MAX_WAIT_S a wait) for RETRY_S seconds: long enough for a server pod to be
# rescheduled and its database to come back, on top of MLflow's own HTTP retries.
RETRY_S = float(os.environ.get("REGMIX_MLFLOW_RETRY_S", "600"))
BACKOFF_S = float(os.environ.get("REGMIX_MLFLOW_BACKOFF_S", "1"))
MAX_WAIT_S = 60.0
CHECK_TIMEOUT_S = 10.0  # the check before a run: a server that does not answer in this long
# MLflow error codes that say "try again later" rather than "this request is wrong".
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "IO_ERROR", "DEADLINE_EXCEEDED",
                   "REQUEST_LIMIT_EXCEEDED", "ABORTED"}

log = logging.getLogger("regmix.tracking")


def is_transient(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError  # e.g. "database is locked" on SQLite

    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_CODES
    return isinstance(error, OSError | OperationalError)


def retried(call):
    """Retry an MLflow call on transient errors; then raise TrackingUnavailable."""

    @functools.wraps(call)
    def with_retries(*args, **kwargs):
        first_failure = None
        for attempt in itertools.count():
            try:
                return call(*args, **kwargs)
            except Exception as e:
                if not is_transient(e):
                    raise
                first_failure = first_failure or time.monotonic()
                spent = time.monotonic() - first_failure
                delay = min(BACKOFF_S * 2**attempt, MAX_WAIT_S)
                if spent + delay > RETRY_S:
                    raise TrackingUnavailable(
                        f"MLflow failed {call.__name__} {attempt + 1} times over {spent:.0f} s "
                        f"(REGMIX_MLFLOW_RETRY_S={RETRY_S:g}), the last time with "
                        f"{type(e).__name__}: {str(e)[:300]}") from e
                log.warning("MLflow %s failed (%s); retrying in %.0f s (%.0f of %.0f s spent)",
                            call.__name__, str(e)[:200], delay, spent, RETRY_S)
                time.sleep(delay)

    return with_retries


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else SQLite under ./mlruns (absolute, so subprocesses agree)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"
    )


UI_ENV = "REGMIX_MLFLOW_UI"  # where users open MLflow's UI, when not at the tracking URI
LOCAL_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address


def served_ui(tracking_uri: str) -> str | None:
    """The address of a UI that is up for this store: $REGMIX_MLFLOW_UI (a UI behind an
    ingress or a port-forward), else the tracking server itself; None for a local store."""
    if address := os.environ.get(UI_ENV):
        return address.rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return None


def ui_address(tracking_uri: str) -> str:
    """Where a user opens the MLflow UI on this store: a served one, else `mlflow ui`'s."""
    return served_ui(tracking_uri) or LOCAL_UI


def tracking_client(uri: str):
    """An MlflowClient for `uri`. Its first use creates a SQLite store's tables, which two
    processes starting at once (a scheduled run beside a manual one) would both do, and one
    fail ("table ... already exists"): a lock file beside the database lets one at a time."""
    import mlflow

    if not uri.startswith("sqlite:///"):
        return mlflow.MlflowClient(uri)
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:  # never deleted: another process may hold it open
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        return mlflow.MlflowClient(uri)


def checked_tracking_uri(uri: str, existing: bool = False) -> str:
    """The MLflow tracking URI, if MLflow accepts it (a plain folder or an unknown scheme would
    otherwise fail inside the first stage, or inside `report`). With `existing`, for commands
    that read runs, a SQLite store must be there already (not made empty by a typo)."""
    from mlflow.exceptions import MlflowException

    database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if existing and database and not Path(database).is_file():
        raise ConfigError(f"tracking URI '{uri}': no MLflow store there; give the URI the run "
                          "logged to (--tracking-uri, or $MLFLOW_TRACKING_URI)")
    try:
        tracking_client(uri)
    except (MlflowException, OSError) as e:
        first = str(getattr(e, "message", e)).strip().split(". ")[0]
        raise ConfigError(f"tracking URI '{uri}': {first}; give sqlite:///PATH/mlflow.db or an "
                          "http(s):// MLflow server") from None
    if uri.startswith(("http://", "https://")):
        check_answers(uri)
    return uri


def check_answers(uri: str) -> None:
    """Raise TrackingUnavailable unless an MLflow server at `uri` answers: before a run starts,
    rather than after every stage's retries. Any HTTP answer counts (a proxy may ask for a
    login), and so does a TLS handshake whose certificate MLflow's own settings may accept
    (MLFLOW_TRACKING_SERVER_CERT_PATH); no connection, or none within CHECK_TIMEOUT_S, does
    not."""
    import ssl

    try:
        http_status(f"{uri.rstrip('/')}/health", CHECK_TIMEOUT_S)
    except OSError as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return
        raise TrackingUnavailable(f"the MLflow server at {uri} does not answer ({reason}); start "
                                  "it, or give another --tracking-uri") from None


def experiment_id(tracking_uri: str, name: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = tracking_client(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)  # this process's fluent calls log there too
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():  # experiments made before it was set
            client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    artifacts = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep artifacts beside the local database rather than in the caller's cwd.
        artifacts = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    except MlflowException as e:  # another run created it since we looked: use theirs
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def run_owner() -> str:
    """host:pid of the process a pipeline run lives in: the `regmix run` that started it
    (OWNER_PID_ENV, which its task processes inherit), else this process."""
    return f"{socket.gethostname()}:{os.environ.get(OWNER_PID_ENV, os.getpid())}"


def owner_is_dead(owner: str | None) -> bool:
    """Whether the process `run_owner` named is provably gone: on this host, and no such pid.
    A run owned elsewhere (another machine, a pod) may be alive: never taken as dead."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def close_dead_runs(client, exp_id: str) -> None:
    """Mark KILLED the pipeline runs of this experiment left RUNNING by a process that died
    (kill -9, a crash, MLflow down when the exit handler ran), and their RUNNING stage runs."""
    for parent in client.search_runs(
            [exp_id], f"tags.`{STAGE_TAG}` = 'pipeline' and attributes.status = 'RUNNING'"):
        if not owner_is_dead(parent.data.tags.get(OWNER_TAG)):
            continue
        label = parent.data.tags[PIPELINE_TAG]
        children = client.search_runs(
            [exp_id], f"tags.`{PIPELINE_TAG}` = '{label}' and attributes.status = 'RUNNING'",
            max_results=10_000)
        for run in children:  # the parent among them
            client.set_terminated(run.info.run_id, "KILLED")
        log.warning("pipeline run %s was left RUNNING by a process that is gone (%s); marked "
                    "KILLED with %d stage run(s)", label, parent.data.tags[OWNER_TAG],
                    len(children) - 1)


def start_pipeline_run(tracking_uri: str, experiment: str, pipeline_run: str, config: dict) -> dict:
    """Open the parent run every stage nests under; returns the tracking context stages share.
    Runs of the same pipeline whose process died RUNNING are closed first."""
    exp_id = experiment_id(tracking_uri, experiment)
    client = tracking_client(tracking_uri)
    close_dead_runs(client, exp_id)
    tags = {STAGE_TAG: "pipeline", PIPELINE_TAG: pipeline_run, OWNER_TAG: run_owner()}
    run = client.create_run(exp_id, run_name=f"pipeline-{pipeline_run}", tags=tags)
    client.log_dict(run.info.run_id, config, "config.json")
    return {"uri": tracking_uri, "experiment_id": exp_id, "pipeline_run": pipeline_run,
            "parent_run_id": run.info.run_id}


@contextmanager
def stage_run(tracking: dict, stage: str, name: str, tags: dict | None = None,
              start_time: int | None = None) -> Iterator:
    """A child run of the pipeline run for one stage task; failures mark it FAILED. A run
    logged after its work (a trained proxy) gives `start_time` (ms), so its duration is real.

    Opening and closing it are retried; a block that raises keeps its own exception even when
    MLflow cannot be told that the run failed.
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    mlflow.set_tracking_uri(tracking["uri"])
    all_tags = {STAGE_TAG: stage, PIPELINE_TAG: tracking["pipeline_run"],
                MLFLOW_PARENT_RUN_ID: tracking["parent_run_id"], **(tags or {})}
    # Created through the client, which takes a start time, then made the active run
    created = retried(mlflow.MlflowClient(tracking["uri"]).create_run)(
        tracking["experiment_id"], start_time=start_time, tags=all_tags, run_name=name)
    run = retried(mlflow.start_run)(run_id=created.info.run_id, nested=True)
    try:
        yield run
    except BaseException:
        try:
            mlflow.end_run("FAILED")
        except Exception:
            log.warning("could not mark MLflow run %s FAILED", run.info.run_id)
        raise
    # The fluent end_run forgets the run before it asks the server: mark it FINISHED first.
    retried(mlflow.MlflowClient(tracking["uri"]).set_terminated)(run.info.run_id, "FINISHED")
    with suppress(Exception):  # it is FINISHED already; this only clears the active run
        mlflow.end_run()


def runs_by_stage(client, experiment_id: str, label: str) -> dict[str, list]:
    """Every run of one pipeline run, grouped by its stage tag."""
    by_stage: dict[str, list] = {}
    for run in client.search_runs([experiment_id], f"tags.`{PIPELINE_TAG}` = '{label}'",
                                  max_results=10_000):
        by_stage.setdefault(run.data.tags[STAGE_TAG], []).append(run)
    return by_stage


def latest_run(runs: list | None):
    """The run that started last (active-learning rounds fit and search more than once)."""
    return max(runs, key=lambda r: r.info.start_time) if runs else None


def proxy_runs(tracking_uri: str, experiment: str, stage: str = "proxy",
               page_size: int = 1000) -> list[dict]:
    """Every finished run of a stage in an experiment as proxy results (weights, losses),
    paged through MLflow's search API; what `regmix export` writes as CSVs."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment '{experiment}' at {tracking_uri}")
    results, token = [], None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
            max_results=page_size, page_token=token,
        )
        for run in page:
            params, metrics = run.data.params, run.data.metrics
            results.append({
                "id": params.get("mixture_id", run.info.run_name),
                "hash": run.data.tags.get(HASH_TAG),
                "run_id": run.info.run_id,
                # What else a proxy's loss depends on (model, training, data): rows that
                # differ here do not compare; seeds only add noise
                "setting": {"corpus": run.data.tags.get(CORPUS_TAG),
                            **{k: v for k, v in params.items()
                               if not k.startswith("weight.") and k not in ("mixture_id", "seed")}},
                "weights": {k[7:]: float(v) for k, v in params.items() if k.startswith("weight.")},
                "val_loss": {k[9:]: v for k, v in metrics.items() if k.startswith("val_loss.")},
            })
        token = page.token
        if not token:
            return results


def finish_pipeline_run(tracking_uri: str, experiment: str, pipeline_run: str, status: str) -> None:
    """Close the parent run; found by its label, since KFP's exit task sees no task outputs."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id],
        f"tags.`{PIPELINE_TAG}` = '{pipeline_run}' and tags.`{STAGE_TAG}` = 'pipeline'",
    )
    state = "FINISHED" if status == "SUCCEEDED" else "FAILED"
    for run in runs:
        client.set_terminated(run.info.run_id, status=state, end_time=int(time.time() * 1000))


def run_start_tracking(config: dict, tracking_uri: str, label: str, compiled: str = "") -> dict:
    """Create the MLflow parent run for this pipeline run, once the run's config is known to
    keep what the pipeline was compiled with (`compiled`: its COMPILED_SETTINGS as JSON)."""
    parsed = parse_config(config)
    if compiled:
        check_compiled_settings(parsed, json.loads(compiled))
    # KFP hands every number over as a float: the parsed config has its integers back
    return start_pipeline_run(tracking_uri or default_tracking_uri(), config["name"], label,
                              parsed.model_dump(mode="json", exclude_none=True))
