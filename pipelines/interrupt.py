"""Ctrl-C and SIGTERM during `regmix run`: the run's task processes stop with it, its MLflow runs
are closed as KILLED, and one line says what was kept and how to go on (exit 130 or 143).

Finished proxies are never lost to an interruption: each is in MLflow (or kept on disk) as soon
as it finishes, and a rerun of the same command reuses them by content hash.
"""

import signal
from contextlib import contextmanager, suppress

import mlflow
import psutil

from regmix.tracking.runs import PIPELINE_TAG, PROXY_STAGES, STAGE_TAG

TASK_STOP_SECONDS = 10  # as a pod gets: SIGTERM, then SIGKILL after this long


class Interrupted(Exception):
    """The run was stopped by a signal; the message is the one line to print."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class Signalled(Exception):
    def __init__(self, signum: int):
        self.signum = signum


@contextmanager
def stopping_on_signals():
    """Within the block, SIGTERM stops the run the way Ctrl-C does: as an exception here."""
    def on_signal(signum, frame):
        raise Signalled(signum)

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    except KeyboardInterrupt:
        raise Signalled(signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_tasks() -> None:
    """Stop every process this one started (kfp.local's task shells and their stages), which
    a SIGTERM to this process alone would otherwise leave training and logging."""
    tasks = psutil.Process().children(recursive=True)
    for task in tasks:
        with suppress(psutil.NoSuchProcess):
            task.terminate()
    _, alive = psutil.wait_procs(tasks, timeout=TASK_STOP_SECONDS)
    for task in alive:
        with suppress(psutil.NoSuchProcess):
            task.kill()


def close_runs(tracking_uri: str, experiment: str, label: str) -> int | None:
    """Mark the run's open MLflow runs KILLED; how many proxies finished (None if MLflow is out
    of reach: the rerun's start closes them, see regmix.tracking.runs.close_dead_runs)."""
    try:
        client = mlflow.MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return 0
        runs = client.search_runs([exp.experiment_id], f"tags.`{PIPELINE_TAG}` = '{label}'",
                                  max_results=10_000)
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
        return sum(r.info.status == "FINISHED" and r.data.tags.get(STAGE_TAG) in PROXY_STAGES
                   for r in runs)
    except Exception:  # noqa: BLE001 - whatever MLflow raises, the line below must still print
        return None


def interrupted(signum: int, tracking_uri: str, experiment: str, label: str) -> Interrupted:
    stop_tasks()
    finished = close_runs(tracking_uri, experiment, label)
    kept = (f"{finished} proxies finished and kept" if finished is not None else
            "finished proxies are kept (MLflow did not answer to count them)")
    return Interrupted(signum, f"interrupted ({signal.Signals(signum).name}); {kept}; rerun the "
                               "same command to continue")
