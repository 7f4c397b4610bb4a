import logging
import subprocess
import sys
import time

import mlflow
import pytest

import regmix.tracking.runs
from regmix.config.loading import parse_config
from regmix.config.schema import compiled_settings
from regmix.errors import ConfigError, TrackingUnavailable
from regmix.report import build_report
from regmix.tracking.runs import (
    check_answers,
    retried,
    run_start_tracking,
    stage_run,
    start_pipeline_run,
)
from regmix.train.proxy import find_finished
from tests.conftest import tiny_config_dict


@pytest.fixture
def quick_retries(monkeypatch):
    """Waits of 0.05, 0.1, 0.2 s, ..., for a second in all."""
    monkeypatch.setattr(regmix.tracking.runs, "BACKOFF_S", 0.05)
    monkeypatch.setattr(regmix.tracking.runs, "RETRY_S", 1.0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # only ours, counted below


def test_an_unreachable_mlflow_is_retried_for_the_budget_then_named(quick_retries, caplog):
    caplog.set_level(logging.WARNING, "regmix.tracking")
    nobody = {"uri": "http://127.0.0.1:9", "experiment_id": "0"}  # a closed port: refused
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"failed find_finished (\d+) times over \d+ s "
                       r"\(REGMIX_MLFLOW_RETRY_S=1\).*http://127.0.0.1:9") as error:
        find_finished(nobody, "0" * 16)
    assert 0.3 < time.monotonic() - started < 5  # the budget is spent waiting, not more
    tries = int(error.value.args[0].split(" times")[0].rsplit(" ", 1)[1])
    assert tries >= 4 and caplog.text.count("retrying in") == tries - 1  # a line per wait


def test_a_wrong_request_is_not_retried(quick_retries, tracking, caplog):
    caplog.set_level(logging.WARNING, "regmix.tracking")
    client = mlflow.MlflowClient(tracking["uri"])
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found|No Run"):
        retried(client.get_run)("f" * 32)
    assert "retrying" not in caplog.text


def test_a_failing_stage_keeps_its_own_error_and_marks_the_run_failed(tracking):
    with pytest.raises(KeyError), stage_run(tracking, "search", "search-mixture") as run:
        raise KeyError("a bug inside the stage")
    assert mlflow.MlflowClient(tracking["uri"]).get_run(run.info.run_id).info.status == "FAILED"
    with stage_run(tracking, "search", "search-mixture") as run:
        pass
    assert mlflow.MlflowClient(tracking["uri"]).get_run(run.info.run_id).info.status == "FINISHED"
    assert mlflow.active_run() is None


def test_a_run_cannot_change_what_its_pipeline_was_compiled_with(tmp_path):
    import json

    compiled = json.dumps(compiled_settings(parse_config(tiny_config_dict("x.yaml"))))
    edited = tiny_config_dict("x.yaml", proxy={"parallelism": 3.0},  # as KFP hands numbers over
                              cluster={"retries": 3.0})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match=r"changes cluster.retries to 3 \(compiled: 0\), "
                                          r"proxy.parallelism to 3 \(compiled: 8\); .* "
                                          r"recompile with `regmix compile`"):
        run_start_tracking(edited, uri, "r1", compiled)
    # Numbers that KFP hands over as floats are the same settings
    same = tiny_config_dict("x.yaml", proxy={"per_task": 4.0}, cluster={})
    tracking = run_start_tracking(same, uri, "r1", compiled)
    assert mlflow.MlflowClient(uri).get_run(tracking["parent_run_id"]).data.tags


# Imports first, then waits for the go file: the processes open the store within milliseconds
RACER = """
import os, sys, time
from pathlib import Path
from regmix.tracking.runs import start_pipeline_run
uri, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.002)
start_pipeline_run(uri, "regmix-race", f"run-{os.getpid()}", {})
"""


def test_runs_starting_together_on_a_new_store_all_start(tmp_path):
    """Fault drill: three real processes open one fresh SQLite store at once (a scheduled run
    beside manual ones): each makes its parent run, none fails creating the tables."""
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(tmp_path / f"ready{i}"),
                                str(go)], stderr=subprocess.PIPE, text=True) for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(r.poll() is None for r in racers)
        time.sleep(0.05)
    go.touch()
    errors = [r.communicate(timeout=120)[1] for r in racers]
    assert [r.returncode for r in racers] == [0, 0, 0], errors[0][-2000:] + errors[1][-2000:]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("regmix-race")
    assert len(client.search_runs([experiment.experiment_id])) == 3


# A pipeline run with a stage run open, then its process killed as kill -9 would
KILLED_RUN = """
import os, signal, sys
from regmix.tracking.runs import start_pipeline_run, stage_run
tracking = start_pipeline_run(sys.argv[1], "regmix-test", "killed-run", {})
with stage_run(tracking, "proxy", "m0000"):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_rerun_closes_runs_whose_process_died_and_leaves_live_ones(tmp_path):
    """Fault drill: a real process killed with SIGKILL leaves its pipeline run and a proxy run
    RUNNING; the next run of the pipeline marks both KILLED. A run whose process lives (this
    one) stays RUNNING, and `regmix report` on it says it is incomplete."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    live = start_pipeline_run(uri, "regmix-test", "live-run", {})
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, uri], timeout=120)
    assert killed.returncode == -9
    client = mlflow.MlflowClient(uri)

    def statuses() -> dict[str, str]:
        return {r.info.run_name: r.info.status
                for r in client.search_runs([live["experiment_id"]])}

    assert statuses() == {"pipeline-live-run": "RUNNING", "pipeline-killed-run": "RUNNING",
                          "m0000": "RUNNING"}
    start_pipeline_run(uri, "regmix-test", "rerun", {})
    assert statuses() == {"pipeline-live-run": "RUNNING", "pipeline-killed-run": "KILLED",
                          "m0000": "KILLED", "pipeline-rerun": "RUNNING"}
    build_report(uri, "regmix-test", "live-run", tmp_path / "report")
    assert "- run **incomplete**: MLflow has it RUNNING" in (
        tmp_path / "report" / "report.md").read_text()


def test_the_check_before_a_run_takes_any_http_answer_and_names_silence():
    """Any HTTP answer (here a 404 from a plain server) means a server is there; once it is
    stopped, the check names the URI in one line."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    check_answers(uri)
    server.shutdown()
    server.server_close()
    with pytest.raises(TrackingUnavailable, match=f"the MLflow server at {uri} does not answer"):
        check_answers(uri)


TELEMETRY_ON = ("import mlflow; from mlflow.telemetry.client import get_telemetry_client; "
                "print(get_telemetry_client() is not None)")


@pytest.mark.parametrize("first, chosen, telemetry", [
    ("", None, "True"),                  # MLflow alone, outside CI: on (the test can fail)
    ("import regmix; ", None, "False"),  # a regmix process: off, as in every task and pod
    ("import regmix; ", "false", "True"),  # a user's explicit choice stands
])
def test_regmix_processes_run_without_mlflow_telemetry(first, chosen, telemetry):
    # Its failing config fetch pops an environment variable under a running request; once in
    # CI a container task failed with KeyError('_MLFLOW_TELEMETRY_SESSION_ID').
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}  # no CI or pytest variables: a user's shell
    if chosen:
        env["MLFLOW_DISABLE_TELEMETRY"] = chosen
    shown = subprocess.run([sys.executable, "-c", first + TELEMETRY_ON], env=env,
                           capture_output=True, text=True, check=True).stdout.split()[-1]
    assert shown == telemetry
