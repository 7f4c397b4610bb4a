"""The config's `cluster:` section: what each task's pod asks for on Kubernetes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from regmix.config.sections import CPU_QUANTITY, MEMORY_QUANTITY, SECONDS, Strict, memory_bytes

# Where a cluster's data preparation puts the token arrays: a folder on the volume every pod
# mounts (pipelines/cluster.py sets it), so no pod downloads them as a KFP artifact
SHARED_TOKENS_ENV = "REGMIX_SHARED_TOKENS"
# Keys of the MLflow client Secret (k8s/secrets/mlflow-client.yaml), exposed under the same
# names: the MLflow client reads them from the environment. Every pipeline task gets them too.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
IMAGE_UID = 1000  # the image's non-root user (docker/Dockerfile)


def volume_env(mount_path: str) -> dict[str, str]:
    """Caches, prepared token arrays and kept checkpoints/results on the shared volume: they
    outlive a pod, and every pod reads the same arrays in place."""
    return {"HF_HOME": f"{mount_path}/cache/huggingface", "REGMIX_CACHE": f"{mount_path}/cache/regmix",
            SHARED_TOKENS_ENV: f"{mount_path}/tokens"}


class Toleration(Strict):
    """Lets a pod onto nodes with a matching taint (GPU node pools are usually tainted)."""

    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None  # for operator Equal
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None  # None: any


class TaskPod(Strict):
    """What one kind of task's pod asks for and where it may run; requests equal limits."""

    gpus: int = Field(0, ge=0)
    cpu: str | None = Field(None, pattern=CPU_QUANTITY)  # None: not requested
    memory: str | None = Field(None, pattern=MEMORY_QUANTITY)
    node_selector: dict[str, str] = {}  # e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations: list[Toleration] = []


class LargePod(TaskPod):
    nodes: int = Field(1, ge=1)  # > 1: a PyTorchJob over this many nodes, `gpus` on each


class DataVolume(Strict):
    """A PersistentVolumeClaim (k8s/ makes `regmix-data`) for download caches and large-run jobs."""

    claim: str
    mount_path: str = "/data"


class ClusterConfig(Strict):
    """How the compiled pipeline runs on Kubernetes; the defaults ask for nothing.

    kfp.local ignores all of it, so a config without this section runs locally as before.
    """

    # docker/Dockerfile's image, whose pods then must run as its uid 1000; None: $REGMIX_IMAGE
    # when compiling, else regmix.components.IMAGE
    image: str | None = None
    # Secrets (kubernetes.io/dockerconfigjson) to pull `image` from a private registry with, on
    # every task's pod and the PyTorchJob's (which run under no pipeline service account)
    image_pull_secrets: list[str] = []
    namespace: str = "regmix"  # where the pipeline's pods (and large-run PyTorchJobs) run
    gpu_resource: str = "nvidia.com/gpu"  # the extended resource GPUs are requested as
    data: TaskPod = TaskPod()  # data preparation
    cpu: TaskPod = TaskPod()  # planning, regression, search, gate, tracking
    proxy: TaskPod = TaskPod()  # every proxy task (training and gate proxies)
    large: LargePod = LargePod()  # every larger-model run (large, baselines, rank check)
    volume: DataVolume | None = None
    shm_size: str = Field("16Gi", pattern=MEMORY_QUANTITY)  # /dev/shm of GPU pods (NCCL)
    mlflow_secret: str | None = None  # a Secret with MLFLOW_TRACKING_URI/_USERNAME/_PASSWORD
    service_account: str | None = None  # runs' service account; None: KFP's default
    # KFP may hand a run the result of an earlier data preparation with the same inputs (the
    # only task it may cache); false prepares again (`regmix submit/schedule --no-cache`), e.g.
    # after the volume's token arrays were deleted.
    cache_data: bool = True
    retries: int = Field(0, ge=0)  # per task, for preempted nodes and flaky pulls
    backoff: str = Field("60s", pattern=SECONDS)  # first wait; doubles each retry
    backoff_max: str = Field("3600s", pattern=SECONDS)

    @model_validator(mode="after")
    def _multinode(self):
        if self.large.nodes > 1 and (self.image is None or self.volume is None):
            raise ValueError(
                "cluster.large.nodes > 1 runs a PyTorchJob: set cluster.image (its pods' image) "
                "and cluster.volume (a ReadWriteMany claim its nodes share)"
            )
        return self

    @model_validator(mode="after")
    def _shm_fits(self):
        # GPU pods get a memory-backed /dev/shm, which counts against the container's memory
        # limit: as large as the limit, it leaves the trainer nothing (OOM-killed, not refused).
        for kind in ("data", "cpu", "proxy", "large"):
            pod = getattr(self, kind)
            if pod.gpus and pod.memory and memory_bytes(self.shm_size) >= memory_bytes(pod.memory):
                raise ValueError(
                    f"cluster.shm_size ({self.shm_size}) must be below cluster.{kind}.memory "
                    f"({pod.memory}): /dev/shm is memory-backed and counts against the pod's "
                    f"memory limit; lower cluster.shm_size or raise cluster.{kind}.memory"
                )
        return self
