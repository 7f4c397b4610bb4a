"""Where a larger-model run trains: in its task's pod, over that pod's GPUs, or over several nodes.

`run_train_target` picks from the config and the pod it runs in:
- at most one GPU here (kfp.local, CPU, one-GPU pods): `train_target` in process;
- several GPUs here: `torchrun --standalone` over them;
- `cluster.large.nodes > 1`: a Kubeflow Training Operator PyTorchJob of that many pods with
  `cluster.large.gpus` GPUs each, which the task creates, follows, and fails with.
The torchrun workers are this module's `main`: they read the run from `request.json` in a work
folder and rank 0 writes `result.json` beside it; for a PyTorchJob that folder (and a copy of
the data) lies on the shared data volume.
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from regmix.config.cluster import IMAGE_UID, MLFLOW_ENV, volume_env
from regmix.config.loading import parse_config
from regmix.config.schema import RegMixConfig
from regmix.data.prepare import TokenData
from regmix.files import replacing, write_text
from regmix.train.loop import limit_cpu_threads
from regmix.train.proxy import train_proxy

log = logging.getLogger("regmix.launcher")

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_DELETE_SECONDS = 600  # how long a retry waits for a failed job's pods to go


class JobFailed(RuntimeError):
    """A large run's PyTorchJob failed; the message has its reason and its master's last lines."""


def run_train_target(config: RegMixConfig, run: dict, data_dir: str, tracking: dict) -> dict:
    """Train one larger-model run where the config and this pod put it: in this process,
    torchrun over the pod's GPUs, or a PyTorchJob over several nodes; returns its result."""
    if config.cluster.large.nodes > 1:
        return run_on_nodes(data_dir, run, config, tracking)
    gpus = torch.cuda.device_count()
    if gpus <= 1:
        return train_target(data_dir, run, config, tracking)
    with tempfile.TemporaryDirectory() as work:
        write_request(Path(work), data_dir, run, config, tracking)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={gpus}", "-m", "regmix.train.launcher", work], check=True)
        return json.loads((Path(work) / "result.json").read_text())


def run_on_nodes(data_dir: str, run: dict, config: RegMixConfig, tracking: dict) -> dict:
    """Run it as a PyTorchJob; its nodes share the data and the work folder on the volume."""
    name = job_name(run, tracking)
    work = Path(config.cluster.volume.mount_path) / "jobs" / name
    shared_data = work / "data"
    if not shared_data.exists():  # a retried task finds the copy made
        with replacing(shared_data) as partial:
            shutil.copytree(data_dir, partial)
    write_request(work, str(shared_data), run, config, tracking)
    run_pytorchjob(pytorchjob_manifest(name, config, str(work)), in_cluster_api())
    return json.loads((work / "result.json").read_text())


def job_name(run: dict, tracking: dict) -> str:
    """One name per run of one pipeline run, so that a retried task finds its job again."""
    named = {**run, "tracking": tracking}
    digest = hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()
    return f"regmix-large-{digest[:12]}"


def write_request(work: Path, data_dir: str, run: dict, config: RegMixConfig, tracking: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    request = {"data_dir": data_dir, "run": run, "tracking": tracking,
               "config": config.model_dump(mode="json", exclude_none=True)}
    write_text(work / "request.json", json.dumps(request))


def main(argv: list[str] | None = None) -> None:
    """A torchrun worker: train the run in WORK/request.json; rank 0 writes WORK/result.json."""
    logging.basicConfig(level=logging.INFO)
    work = Path((argv if argv is not None else sys.argv[1:])[0])
    request = json.loads((work / "request.json").read_text())
    result = train_target(request["data_dir"], request["run"], parse_config(request["config"]),
                          request["tracking"])
    if os.environ.get("RANK", "0") == "0":
        write_text(work / "result.json", json.dumps(result))  # whole or absent


# ---------------------------------------------------------------- the PyTorchJob
def pytorchjob_manifest(name: str, config: RegMixConfig, work_dir: str) -> dict:
    """A PyTorchJob (kubeflow.org/v1) of `cluster.large.nodes` pods running this module's worker."""
    cluster, large = config.cluster, config.cluster.large
    resources = {"cpu": large.cpu, "memory": large.memory,
                 cluster.gpu_resource: str(large.gpus) if large.gpus else None}
    resources = {k: v for k, v in resources.items() if v is not None}
    env = [{"name": "HOME", "value": "/tmp"}]  # the root filesystem is read-only
    env += [{"name": k, "value": v} for k, v in volume_env(cluster.volume.mount_path).items()]
    if cluster.mlflow_secret:
        # Only the URI is required: username and password exist only behind an auth proxy.
        env += [{"name": key, "valueFrom": {"secretKeyRef": {
            "name": cluster.mlflow_secret, "key": key, "optional": key != "MLFLOW_TRACKING_URI"}}}
            for key in MLFLOW_ENV]
    container = {
        "name": "pytorch",  # the Training Operator finds its container by this name
        "image": cluster.image,
        # The operator sets torchrun's PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ... on each pod.
        "command": ["python", "-m", "torch.distributed.run", "-m", "regmix.train.launcher",
                    work_dir],
        "env": env,
        "resources": {"requests": resources, "limits": resources},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "data", "mountPath": cluster.volume.mount_path},
                         {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    template = {
        # An Istio sidecar would sit between the nodes' rendezvous and NCCL connections.
        "metadata": {"labels": {"app.kubernetes.io/part-of": "regmix"},
                     "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {
            "automountServiceAccountToken": False,  # training needs no Kubernetes API
            "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID,
                                "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "nodeSelector": large.node_selector,
            "tolerations": [t.model_dump(exclude_none=True) for t in large.tolerations],
            "containers": [container],
            "imagePullSecrets": [{"name": name} for name in cluster.image_pull_secrets],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": cluster.volume.claim}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cluster.shm_size}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template},
                "Worker": {"replicas": large.nodes - 1, "restartPolicy": "OnFailure",
                           "template": template}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": cluster.namespace,
                     "labels": {"app.kubernetes.io/part-of": "regmix"}},
        "spec": {
            "nprocPerNode": str(large.gpus or 1),
            # Pods restart in place on failure up to `retries` times; finished jobs free GPUs.
            "runPolicy": {"backoffLimit": cluster.retries, "cleanPodPolicy": "Running"},
            "pytorchReplicaSpecs": replicas,
        },
    }


def in_cluster_api():
    """A Kubernetes API client with this pod's service account (k8s/base/rbac.yaml)."""
    from kubernetes import client, config

    config.load_incluster_config()
    return client.ApiClient()


def run_pytorchjob(manifest: dict, api, poll_seconds: float = 30.0) -> dict:
    """Create the job (or find the one a previous attempt made, replacing it if it failed), log
    its state changes until it ends, and raise `JobFailed` with its reason and master's last
    log lines if it fails."""
    from kubernetes import client

    jobs = client.CustomObjectsApi(api)
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    create_or_follow(jobs, manifest, poll_seconds)
    seen = None
    while True:
        job = jobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state, detail = job_state(job)
        if (state, detail) != seen:
            log.info("PyTorchJob %s: %s %s", name, state, detail)
            seen = (state, detail)
        if state == "Succeeded":
            return job
        if state == "Failed":
            tail = master_log_tail(api, namespace, name)
            raise JobFailed(f"PyTorchJob {namespace}/{name} failed: {detail}\n"
                            f"last lines of {name}-master-0:\n{tail}")
        time.sleep(poll_seconds)


def create_or_follow(jobs, manifest: dict, poll_seconds: float) -> None:
    """Create the job. If an earlier attempt of this task made it, follow that one, unless it
    failed: then a retried task would only re-read the failure, so the job is replaced (its
    checkpoints on the volume let the new one resume)."""
    from kubernetes import client

    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    job_api = (GROUP, VERSION, namespace, PLURAL)

    def create() -> None:
        jobs.create_namespaced_custom_object(*job_api, manifest)
        log.info("created PyTorchJob %s/%s", namespace, name)

    try:
        create()
        return
    except client.ApiException as e:
        if e.status != 409:
            raise
    state, detail = job_state(jobs.get_namespaced_custom_object(*job_api, name))
    if state != "Failed":
        log.info("PyTorchJob %s/%s exists (an earlier attempt made it); following it",
                 namespace, name)
        return
    log.info("PyTorchJob %s/%s failed in an earlier attempt (%s); replacing it",
             namespace, name, detail)
    try:
        jobs.delete_namespaced_custom_object(*job_api, name, propagation_policy="Foreground")
    except client.ApiException as e:
        if e.status != 404:  # gone already: fine
            raise
    deadline = time.monotonic() + JOB_DELETE_SECONDS
    while True:  # the name is free only once the job and its pods are gone
        try:
            jobs.get_namespaced_custom_object(*job_api, name)
        except client.ApiException as e:
            if e.status == 404:
                break
            raise
        if time.monotonic() > deadline:
            raise JobFailed(f"PyTorchJob {namespace}/{name} failed earlier and is still being "
                            f"deleted after {JOB_DELETE_SECONDS} s (a stuck finalizer?); delete "
                            "it by hand, then retry the run")
        time.sleep(poll_seconds)
    create()


def job_state(job: dict) -> tuple[str, str]:
    """The job's latest true condition (Created, Running, Restarting, Succeeded, Failed) and its
    reason, message and replica counts."""
    status = job.get("status") or {}
    true = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    if not true:
        return "Pending", ""
    last = true[-1]
    replicas = ", ".join(f"{role} {counts}" for role, counts in
                         sorted((status.get("replicaStatuses") or {}).items()))
    detail = f"{last.get('reason', '')}: {last.get('message', '')}"
    return last["type"], f"({replicas}) {detail}" if replicas else detail


def master_log_tail(api, namespace: str, name: str, lines: int = 40) -> str:
    from kubernetes import client

    try:
        return client.CoreV1Api(api).read_namespaced_pod_log(
            f"{name}-master-0", namespace, container="pytorch", tail_lines=lines)
    except client.ApiException as e:
        return f"(no log: {e.status} {e.reason})"


def train_target(data_dir: str, run: dict, config, tracking: dict) -> dict:
    """Train one larger model (large, baseline or rank-check run) in this process."""
    limit_cpu_threads(config.large.cpu_threads)
    spec = config.rank_check if run["role"] == "rank" else config.large
    data = TokenData.open(data_dir)
    target = config.regression.target_weights(data.domains)
    result = train_proxy(data, run, spec.model.resolve(), spec.train, int(run["seed"]),
                         tracking, target, stage=run["role"])
    if "error" in result:  # diverged: no loss to compare or rank; fail the task with the fix
        raise RuntimeError(f"{run['role']} run {run['id']}: {result['error']}")
    return {**result, "name": run["name"], "seed": run["seed"]}


if __name__ == "__main__":
    main()
