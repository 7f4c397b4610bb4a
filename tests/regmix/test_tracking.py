import logging

import mlflow
import pytest

import regmix.tracking.runs
from regmix.config.loading import parse_config
from regmix.config.schema import compiled_settings
from regmix.errors import ConfigError, TrackingUnavailable
from regmix.tracking.runs import TRIES, retried, run_start_tracking, stage_run
from regmix.train.proxy import find_finished
from tests.conftest import tiny_config_dict


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(regmix.tracking.runs, "BACKOFF_S", 0.0)
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
