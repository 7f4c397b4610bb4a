"""Kubernetes settings for the pipeline's tasks, all from the config's `cluster` section.

KFP keeps them in the compiled pipeline: image, resources, retries and caching in the pipeline
spec, the rest (tolerations, node selectors, volumes, secrets) in its `platforms.kubernetes`
document. kfp.local ignores all of it but retries (0 unless configured) and caching (its cache
is off unless enabled); so one pipeline serves both, and a config without a `cluster` section
runs locally exactly as before.
"""

from typing import Literal

from kfp import dsl, kubernetes
from kfp.dsl import pipeline_context

from regmix.config.cluster import IMAGE_UID, MLFLOW_ENV, ClusterConfig, volume_env

Kind = Literal["data", "cpu", "proxy", "large"]

# A task's kind picks its `cluster.<kind>` pod section; components not named here are "cpu"
# (a new GPU stage must be named here to get GPUs).
KIND_BY_COMPONENT: dict[str, Kind] = {
    "prepare-data-op": "data",
    "train-proxy-op": "proxy",
    "train-target-op": "large",
}
# The (ReadWriteMany) volume holds the download caches (data preparation), the prepared token
# arrays every trainer reads in place, the folders the nodes of a multi-node large run share,
# and every trainer's checkpoints and results kept until MLflow has them: a retried or
# rescheduled pod then resumes there.
VOLUME_KINDS: tuple[Kind, ...] = ("data", "proxy", "large")


def apply_task_settings(task: dsl.PipelineTask, cluster: ClusterConfig,
                        kind: Kind) -> dsl.PipelineTask:
    """Image, resources, scheduling, volumes, secrets, retries and caching for one task."""
    pod = getattr(cluster, kind)
    if kind == "large" and cluster.large.nodes > 1:
        # The nodes train in a PyTorchJob: this task only creates and follows it, so it asks for
        # a CPU pod instead of holding a whole GPU node idle (it keeps the volume and secret).
        pod = cluster.cpu
    if cluster.image:
        task.set_container_image(cluster.image)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, cluster.image_pull_secrets)
    # Every task runs the project's image (cluster.image, else $REGMIX_IMAGE or regmix.components.IMAGE
    # as compiled), built to run as this uid.
    kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID,
                                    run_as_non_root=True)
    # Requests equal limits for the main container, so the scheduler reserves all a trainer may
    # use (KFP's launcher and Argo's sidecars may still leave the pod Burstable, not Guaranteed).
    if pod.cpu:
        task.set_cpu_request(pod.cpu).set_cpu_limit(pod.cpu)
    if pod.memory:
        task.set_memory_request(pod.memory).set_memory_limit(pod.memory)
    if pod.gpus:
        task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(pod.gpus)
        # The container runtime's 64 MB /dev/shm is too small for NCCL and DataLoader workers.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=cluster.shm_size)
    for key, value in pod.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for t in pod.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value,
                                  effect=t.effect)
    if cluster.volume and kind in VOLUME_KINDS:
        mount = cluster.volume.mount_path
        kubernetes.mount_pvc(task, cluster.volume.claim, mount)
        for key, value in volume_env(mount).items():
            task.set_env_variable(key, value)
    if cluster.mlflow_secret:
        # The URI is required; username and password only exist behind an auth proxy, and a
        # missing required key would fail the pod (CreateContainerConfigError).
        uri, *credentials = MLFLOW_ENV
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {uri: uri})
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {k: k for k in credentials},
                                     optional=True)
    if cluster.retries:
        task.set_retry(cluster.retries, backoff_duration=cluster.backoff,
                       backoff_max_duration=cluster.backoff_max)
    # Only data preparation is a pure function of its inputs. Every other task writes MLflow
    # runs a cache hit would silently skip (proxies reuse finished runs by content hash).
    task.set_caching_options(enable_caching=kind == "data" and cluster.cache_data)
    return task


def apply_cluster_settings(cluster: ClusterConfig) -> None:
    """Apply the settings to every task of the pipeline being defined: call it last in its body."""
    for task in pipeline_context.Pipeline.get_default_pipeline().tasks.values():
        apply_task_settings(task, cluster, KIND_BY_COMPONENT.get(task.component_spec.name, "cpu"))
