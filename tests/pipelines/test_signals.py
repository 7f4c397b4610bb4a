"""Ctrl-C and SIGTERM during `regmix run` (configs/tiny.yaml, real signals, a real process): the
task processes stop with the run, its MLflow runs are closed KILLED, one line says what was
kept, and the exit code is 128 + the signal."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def training_tasks(run: subprocess.Popen, timeout: float = 300) -> list[psutil.Process]:
    """The run's processes once a proxy task has trained for a few seconds."""
    def command(task: psutil.Process) -> str:
        try:
            return " ".join(task.cmdline())
        except psutil.Error:  # it ended (or is a zombie) since it was listed
            return ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        tasks = psutil.Process(run.pid).children(recursive=True)
        if any("train_proxy_op" in command(t) for t in tasks):
            time.sleep(5)
            return psutil.Process(run.pid).children(recursive=True)
        time.sleep(0.5)
    raise AssertionError(f"no proxy task started (exit code {run.poll()})")


@pytest.mark.network  # builds (or reuses the cached) tinypile
@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-to-the-run", "ctrl-c-to-the-terminal-group"])
def test_a_signal_stops_the_run_and_its_tasks_in_one_line(tmp_path, signum, to_group):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A session of its own, as a terminal gives a foreground job: Ctrl-C reaches its group. A
    # foreground job takes Ctrl-C even where this test runs as a background job (`cmd &` in a
    # script ignores SIGINT, and its children inherit that)
    run = subprocess.Popen([sys.executable, "-m", "regmix.pipelines.cli", "run", "--config",
                            str(TINY), "--tracking-uri", uri], cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tasks = training_tasks(run)
    if to_group:
        os.killpg(run.pid, signum)
    else:
        run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signum
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err
    assert last.startswith(f"regmix: interrupted ({signal.Signals(signum).name}); ")
    assert last.endswith("proxies finished and kept; rerun the same command to continue")
    assert not [t for t in tasks if t.is_running() and t.status() != psutil.STATUS_ZOMBIE]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("regmix-tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    parent = next(r for r in runs if r.data.tags["regmix.stage"] == "pipeline")
    assert parent.info.status == "KILLED"
