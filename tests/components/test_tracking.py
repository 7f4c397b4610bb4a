import logging

import mlflow
import pytest

import components.tracking
from components.proxy import find_finished
from components.tracking import TRIES, TrackingUnavailable, retried, stage_run


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(components.tracking, "BACKOFF_S", 0.0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # only ours, counted below


def test_an_unreachable_mlflow_is_retried_then_named(quick_retries, caplog):
    caplog.set_level(logging.WARNING, "regmix.tracking")
    nobody = {"uri": "http://127.0.0.1:9", "experiment_id": "0"}  # a closed port: refused
    with pytest.raises(TrackingUnavailable,
                       match=rf"failed find_finished {TRIES} times.*http://127.0.0.1:9"):
        find_finished(nobody, "0" * 16)
    assert caplog.text.count("retrying") == TRIES - 1


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
