"""The large run's launcher: the PyTorchJob it builds, and how it follows one through the real
`kubernetes` client against a local fake of the API paths it uses (no cluster can run here)."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client

from regmix.config.loading import load_config
from regmix.train import launcher
from regmix.train.launcher import (
    JobFailed,
    job_state,
    main,
    pytorchjob_manifest,
    run_pytorchjob,
    run_train_target,
)
from tests.fake_api import FakeApi

JOBS = "/apis/kubeflow.org/v1/namespaces/regmix/pytorchjobs"
RUN = {"id": "chosen@seed0", "name": "chosen", "role": "large", "weights": {"arxiv": 1.0},
       "seed": 0, "hash": "abc"}
TRACKING = {"pipeline_run": "run-1"}


def multinode_config(nodes: int = 4, mount_path: str = "/data"):
    config = load_config("configs/pile.yaml")
    cluster = config.cluster.model_copy(update={
        "large": config.cluster.large.model_copy(update={"nodes": nodes}),
        "volume": config.cluster.volume.model_copy(update={"mount_path": mount_path})})
    return config.model_copy(update={"cluster": cluster})


def condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def fake_kubernetes(states: list[dict], on_create=None, earlier: dict | None = None,
                    deletion: str = "done") -> FakeApi:
    """PyTorchJob create/get/delete and the master pod's log. Each get of a job this fake
    created shows the next of `states`; `earlier` is the status of a job an earlier attempt of
    the task left behind. A delete is `done`, finds the job `gone` already (404), or is
    accepted but `stuck` (a finalizer that never finishes: the job stays)."""
    jobs: dict[str, dict] = {}
    if earlier is not None:
        jobs["regmix-large-x"] = {"metadata": {"name": "regmix-large-x"}, "status": earlier}

    def create(match, query, body):
        if body["metadata"]["name"] in jobs:
            return 409, {"kind": "Status", "reason": "AlreadyExists", "code": 409}
        jobs[body["metadata"]["name"]] = body
        if on_create:
            on_create(body)
        return 201, body

    def get(match, query, body):
        job = jobs.get(match["name"])
        if job is None:
            return 404, {"kind": "Status", "reason": "NotFound", "code": 404}
        if "status" in job:
            return 200, job
        return 200, {**job, "status": states.pop(0) if len(states) > 1 else states[0]}

    def delete(match, query, body):
        if deletion == "stuck":
            return 200, {"kind": "Status", "status": "Success"}
        jobs.pop(match["name"])
        if deletion == "gone":  # deleted by someone else just before this call
            return 404, {"kind": "Status", "reason": "NotFound", "code": 404}
        return 200, {"kind": "Status", "status": "Success"}

    return FakeApi({
        ("POST", JOBS): create,
        ("GET", JOBS + "/(?P<name>[^/]+)"): get,
        ("DELETE", JOBS + "/(?P<name>[^/]+)"): delete,
        ("GET", "/api/v1/namespaces/regmix/pods/(?P<pod>[^/]+)/log"):
            lambda m, q, b: (200, f"{m['pod']}: CUDA out of memory\n"),
    })


def api_client(url: str) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


def test_manifest_is_a_pytorchjob_of_nonroot_gpu_pods_valid_for_kubernetes():
    manifest = pytorchjob_manifest("regmix-large-x", multinode_config(), "/data/jobs/x")
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = manifest["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"] == {"backoffLimit": 2, "cleanPodPolicy": "Running"}
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    pod = replicas["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == "ghcr.io/regmix/regmix:0.1.0"
    assert container["command"][-3:] == ["-m", "regmix.train.launcher", "/data/jobs/x"]
    assert container["resources"]["limits"] == {"cpu": "96", "memory": "960Gi",
                                                "nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "regmix-data"}} in pod["volumes"]
    assert pod["imagePullSecrets"] == []  # none configured
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["optional"]
                  for e in container["env"] if "valueFrom" in e}
    assert secret_env == {"MLFLOW_TRACKING_URI": False, "MLFLOW_TRACKING_USERNAME": True,
                          "MLFLOW_TRACKING_PASSWORD": True}  # a Secret with only the URI works
    # checkpoints on the shared volume, where every node and a recreated pod find them
    assert {"name": "REGMIX_CACHE", "value": "/data/cache/regmix"} in container["env"]
    # The pod template, as Kubernetes' own schema sees it (the CRD embeds a core PodTemplateSpec).
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                  "metadata": {"name": "worker"},
                                  "template": replicas["Worker"]["template"]}, "1.32", strict=True)


def test_the_jobs_pods_pull_the_image_with_the_configured_secrets():
    config = multinode_config()
    private = config.model_copy(update={"cluster": config.cluster.model_copy(
        update={"image_pull_secrets": ["registry-creds"]})})
    manifest = pytorchjob_manifest("regmix-large-x", private, "/data/jobs/x")
    for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-creds"}]


def test_the_job_is_followed_until_it_succeeds_logging_each_change(caplog):
    manifest = pytorchjob_manifest("regmix-large-x", multinode_config(), "/data/jobs/x")
    states = [{}, {"conditions": [condition("Created")]},
              {"conditions": [condition("Created"), condition("Running")],
               "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 3}}},
              {"conditions": [condition("Created"), condition("Succeeded", "JobSucceeded")]}]
    with fake_kubernetes(states) as api, caplog.at_level(logging.INFO, "regmix.launcher"):
        job = run_pytorchjob(manifest, api_client(api.url), poll_seconds=0.01)
        ((_, created),) = api.calls("POST", JOBS)
    assert created == manifest
    assert job["metadata"]["name"] == "regmix-large-x"
    logged = caplog.text
    assert "Running (Master {'active': 1}, Worker {'active': 3})" in logged
    assert "Succeeded JobSucceeded" in logged


def test_a_failed_job_fails_the_task_with_its_reason_and_the_master_log():
    manifest = pytorchjob_manifest("regmix-large-x", multinode_config(), "/data/jobs/x")
    states = [{"conditions": [condition("Failed", "BackoffLimitExceeded", "pods failed 3 times")]}]
    with fake_kubernetes(states) as api, pytest.raises(JobFailed) as failed:
        run_pytorchjob(manifest, api_client(api.url), poll_seconds=0.01)
    message = str(failed.value)
    assert "regmix/regmix-large-x failed: BackoffLimitExceeded: pods failed 3 times" in message
    assert "regmix-large-x-master-0: CUDA out of memory" in message


def test_a_retried_task_follows_the_job_its_first_attempt_made():
    manifest = pytorchjob_manifest("regmix-large-x", multinode_config(), "/data/jobs/x")
    succeeded = {"conditions": [condition("Running"), condition("Succeeded")]}
    with fake_kubernetes([], earlier=succeeded) as api:
        job = run_pytorchjob(manifest, api_client(api.url), poll_seconds=0.01)
        assert len(api.calls("POST", JOBS)) == 1 and api.calls("DELETE", JOBS + "/.*") == []
    assert job_state(job)[0] == "Succeeded"


def test_a_retried_task_replaces_the_job_its_first_attempt_saw_fail(caplog):
    manifest = pytorchjob_manifest("regmix-large-x", multinode_config(), "/data/jobs/x")
    failed = {"conditions": [condition("Failed", "BackoffLimitExceeded")]}
    with fake_kubernetes([{"conditions": [condition("Succeeded")]}], earlier=failed) as api, \
            caplog.at_level(logging.INFO, "regmix.launcher"):
        job = run_pytorchjob(manifest, api_client(api.url), poll_seconds=0.01)
        ((query, _),) = api.calls("DELETE", JOBS + "/regmix-large-x")
        posts = api.calls("POST", JOBS)
    assert query == {"propagationPolicy": "Foreground"}  # its pods go before the name is free
    assert len(posts) == 2 and posts[-1][1] == manifest  # refused (exists), then created anew
    assert job_state(job)[0] == "Succeeded"
    assert "failed in an earlier attempt" in caplog.text


def test_a_failed_job_deleted_by_someone_else_meanwhile_is_still_replaced():
    manifest = pytorchjob_manifest("regmix-large-x", multinode_config(), "/data/jobs/x")
    failed = {"conditions": [condition("Failed", "BackoffLimitExceeded")]}
    with fake_kubernetes([{"conditions": [condition("Succeeded")]}], earlier=failed,
                         deletion="gone") as api:
        job = run_pytorchjob(manifest, api_client(api.url), poll_seconds=0.01)
        posts = api.calls("POST", JOBS)
    assert len(posts) == 2 and job_state(job)[0] == "Succeeded"


def test_a_failed_job_stuck_in_deletion_fails_the_task_with_the_fix(monkeypatch):
    monkeypatch.setattr(launcher, "JOB_DELETE_SECONDS", 0.2)
    manifest = pytorchjob_manifest("regmix-large-x", multinode_config(), "/data/jobs/x")
    failed = {"conditions": [condition("Failed", "BackoffLimitExceeded")]}
    with fake_kubernetes([failed], earlier=failed, deletion="stuck") as api, \
            pytest.raises(JobFailed, match="still being deleted after 0.2 s .* delete it "
                                                    "by hand, then retry the run"):
        run_pytorchjob(manifest, api_client(api.url), poll_seconds=0.01)
    assert len(api.calls("POST", JOBS)) == 1  # never created over the stuck one


def fake_train_target(data_dir, run, config, tracking):
    return {"id": run["id"], "val_loss": {"arxiv": 2.5},
            "tokens": sum(1 for _ in (Path(data_dir) / "train").iterdir())}


def test_a_multinode_run_shares_data_and_result_through_the_volume(tmp_path, monkeypatch):
    data = tmp_path / "artifact"
    (data / "train").mkdir(parents=True)
    (data / "train" / "arxiv.npy").write_bytes(b"tokens")
    volume = tmp_path / "volume"
    monkeypatch.setattr(launcher, "train_target", fake_train_target)

    def run_the_pods(job):  # what the job's master pod does: torchrun -m regmix.train.launcher WORK
        main([job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
                       ["containers"][0]["command"][-1]])

    with fake_kubernetes([{"conditions": [condition("Succeeded")]}], on_create=run_the_pods) as api:
        monkeypatch.setattr(launcher, "in_cluster_api", lambda: api_client(api.url))
        result = run_train_target(multinode_config(2, str(volume)), RUN, str(data), TRACKING)
    assert result == {"id": "chosen@seed0", "val_loss": {"arxiv": 2.5}, "tokens": 1}
    (work,) = (volume / "jobs").iterdir()
    assert re.fullmatch(r"regmix-large-[0-9a-f]{12}", work.name)
    assert (work / "data" / "train" / "arxiv.npy").read_bytes() == b"tokens"
    request = json.loads((work / "request.json").read_text())
    assert request["run"] == RUN and request["data_dir"] == str(work / "data")
    assert request["tracking"] == TRACKING


def test_one_node_without_several_gpus_trains_in_process(monkeypatch):
    monkeypatch.setattr(launcher, "train_target",
                        lambda data_dir, run, config, tracking: {"ran": data_dir})
    assert run_train_target(load_config("configs/tiny.yaml"), RUN, "/data/x", TRACKING) == {"ran": "/data/x"}


def test_the_torchrun_workers_entry_point_runs_main(tmp_path):
    """`torchrun -m regmix.train.launcher WORK` (and the PyTorchJob's command) runs `main`."""
    out = subprocess.run([sys.executable, "-m", "regmix.train.launcher", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "request.json" in out.stderr  # it read the work folder
