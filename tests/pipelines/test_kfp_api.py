"""`regmix submit/schedule/runs` through the real kfp.Client against a local fake of the part of
KFP's v2beta1 REST API they use (a real Kubeflow Pipelines cannot run here)."""

import json
from datetime import UTC, datetime

import pytest

from regmix.pipelines.cli import main
from regmix.pipelines.kfp_api import connect
from tests.fake_api import FakeApi

API = "/apis/v2beta1"
PILE = "configs/pile.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")


def fake_kfp(runs: list[dict]) -> FakeApi:
    experiments: list[dict] = []

    def find_experiments(match, query, body):
        (predicate,) = json.loads(query["filter"])["predicates"]
        found = [e for e in experiments if e["display_name"] == predicate["stringValue"]]
        return 200, {"experiments": found} if found else {}

    def create_experiment(match, query, body):
        experiments.append({**body, "experiment_id": f"exp-{len(experiments) + 1}"})
        return 200, experiments[-1]

    def create_run(match, query, body):
        runs.append({**body, "run_id": f"run-{len(runs) + 1}", "state": "PENDING",
                     "created_at": datetime.now(UTC).isoformat()})
        return 200, runs[-1]

    def list_runs(match, query, body):
        newest = sorted(runs, key=lambda r: r["created_at"], reverse=True)
        return 200, {"runs": newest[: int(query["page_size"])], "total_size": len(runs)}

    def create_recurring_run(match, query, body):
        return 200, {**body, "recurring_run_id": "rec-1", "status": "ENABLED"}

    return FakeApi({
        ("GET", f"{API}/healthz"): lambda m, q, b: (200, {"multi_user": False}),
        ("GET", f"{API}/experiments"): find_experiments,
        ("POST", f"{API}/experiments"): create_experiment,
        ("POST", f"{API}/runs"): create_run,
        ("GET", f"{API}/runs"): list_runs,
        ("POST", f"{API}/recurringruns"): create_recurring_run,
    })


@pytest.fixture
def kfp_api():
    with fake_kfp(runs=[]) as api:
        yield api


def test_submit_makes_the_experiment_once_and_starts_runs_of_the_cluster_pipeline(kfp_api, capsys):
    for _ in range(2):
        assert main(["submit", "--host", kfp_api.url, "--config", PILE]) == 0
    (_, experiment), = kfp_api.calls("POST", f"{API}/experiments")  # made once, then found
    assert experiment["display_name"] == "regmix-pile"
    first, second = (body for _, body in kfp_api.calls("POST", f"{API}/runs"))
    assert first["experiment_id"] == second["experiment_id"] == "exp-1"
    assert first["display_name"] == "regmix-pile"
    spec = first["pipeline_spec"]  # the compiled package, its Kubernetes settings included
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "regmix-pile"
    executors = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train-proxy-op"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert first["runtime_config"].get("parameters", {}) == {}  # MLflow URI from the Secret
    out = capsys.readouterr().out
    assert f"run run-2: {kfp_api.url}/#/runs/details/run-2" in out
    assert f"Experiment details: {kfp_api.url}/#/experiments/details/exp-1" in out  # kfp's, kept


def test_schedule_creates_a_recurring_run_on_a_six_field_cron(kfp_api, capsys):
    assert main(["schedule", "--host", kfp_api.url, "--config", PILE,
                 "--cron", "0 0 3 * * *"]) == 0
    (_, body), = kfp_api.calls("POST", f"{API}/recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert body["display_name"] == "regmix-pile-scheduled"
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True
    assert int(body["max_concurrency"]) == 1
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "regmix-pile"
    assert "recurringrun/details/rec-1" in capsys.readouterr().out


@pytest.mark.parametrize(("cron", "message"), [
    ("0 3 * * *", "has 5 fields; KFP's cron has 6, seconds first: use '0 0 3 * * *'"),
    ("0 0 0 3 * * *", "has 7 fields; KFP's cron has 6"),
])
def test_schedule_rejects_other_than_six_fields_before_any_request(kfp_api, capsys, cron, message):
    assert main(["schedule", "--host", kfp_api.url, "--config", PILE, "--cron", cron]) == 2
    assert message in capsys.readouterr().err
    assert kfp_api.requests == []


def test_runs_lists_the_newest_runs_first(capsys):
    runs = [{"run_id": f"run-{i}", "display_name": name, "state": state,
             "created_at": f"2026-01-0{i}T03:00:00Z"}
            for i, (name, state) in enumerate([("old", "SUCCEEDED"), ("new", "RUNNING")], 1)]
    with fake_kfp(runs) as kfp_api:
        assert main(["runs", "--host", kfp_api.url, "--limit", "5"]) == 0
        (query, _), = kfp_api.calls("GET", f"{API}/runs")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[1:] == ["RUNNING", "run-2", "new"]
    assert lines[1].split()[1:] == ["SUCCEEDED", "run-1", "old"]
    assert query["sort_by"] == "created_at desc" and query["page_size"] == "5"


def test_runs_lists_nothing_when_kfp_has_no_runs(kfp_api, capsys):
    assert main(["runs", "--host", kfp_api.url]) == 0
    assert capsys.readouterr().out == ""


LOGIN_PAGE = "<html><body>Log in</body></html>"


@pytest.mark.parametrize(("args", "missing"), [
    (["submit", "--config", PILE], "a run id"),
    (["schedule", "--config", PILE, "--cron", "0 0 3 * * *"], "an experiment id"),
    (["runs"], "multi_user in its healthz"),
])
def test_a_login_page_in_front_of_kfp_fails_naming_the_host_and_the_fix(capsys, args, missing):
    # Behind Dex or oauth2-proxy every request ends on the login page's HTML, which
    # kfp_server_api reads as objects whose every field is None.
    page = lambda m, q, b: (200, LOGIN_PAGE)  # noqa: E731
    routes = {(method, f"{API}/{path}"): page for method, path in [
        ("GET", "healthz"), ("GET", "experiments"), ("POST", "experiments"), ("POST", "runs"),
        ("GET", "runs"), ("POST", "recurringruns")]}
    with FakeApi(routes) as login:
        assert main([args[0], "--host", login.url, *args[1:]]) == 1
        assert login.calls("POST", f"{API}/recurringruns") == []  # not in an experiment "None"
    out, err = capsys.readouterr()
    assert "/None" not in out  # kfp's own "Experiment details: <link>" is held back
    assert (f"the KFP API at {login.url} answered without {missing}: "
            "is it behind a login page") in err
    assert "port-forward ml-pipeline-ui" in err


def test_a_profile_namespace_goes_to_the_experiment_and_runs_not_to_kfps_address(kfp_api):
    # kfp.Client's own `namespace` is where KFP is installed; given the profile namespace it
    # would look for the API at ml-pipeline.<profile>.svc, which does not exist.
    assert main(["submit", "--host", kfp_api.url, "--config", PILE, "--namespace", "team-a"]) == 0
    (_, experiment), = kfp_api.calls("POST", f"{API}/experiments")
    assert experiment["namespace"] == "team-a"
    (query, _), = kfp_api.calls("GET", f"{API}/experiments")
    assert query["namespace"] == "team-a"


def test_in_a_cluster_the_client_finds_kfp_in_its_own_namespace(monkeypatch):
    # What a Kubeflow notebook sees (faked: no cluster here): in-cluster credentials, a
    # multi-user KFP. The API's address is KFP's service in `kubeflow`, whatever the profile.
    import kfp
    import kubernetes

    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    multi_user = type("Healthz", (), {"multi_user": True})
    monkeypatch.setattr(kfp.Client, "get_kfp_healthz", lambda self: multi_user)
    host = connect(None)._run_api.api_client.configuration.host
    assert host == "ml-pipeline.kubeflow.svc.cluster.local:8888"


def cached_tasks(pipeline_spec: dict) -> list[str]:
    """The tasks, at any depth of the pipeline's DAGs, whose KFP caching is on."""
    found = []
    for dag in [pipeline_spec["root"], *pipeline_spec["components"].values()]:
        for name, task in dag.get("dag", {}).get("tasks", {}).items():
            if task.get("cachingOptions", {}).get("enableCache"):
                found.append(name)
    return found


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 0 3 * * 6"]])
def test_no_cache_starts_runs_that_prepare_the_data_again(kfp_api, command):
    path = f"{API}/runs" if command[0] == "submit" else f"{API}/recurringruns"
    assert main([*command, "--host", kfp_api.url, "--config", PILE]) == 0
    assert main([*command, "--host", kfp_api.url, "--config", PILE, "--no-cache"]) == 0
    cached, fresh = (body["pipeline_spec"]["pipeline_spec"] for _, body in kfp_api.calls("POST", path))
    assert cached_tasks(cached) == ["prepare-data-op"]  # the only task KFP may cache
    assert cached_tasks(fresh) == []
