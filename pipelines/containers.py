"""`regmix run --runner docker`: every stage in the project's image through kfp.local's
DockerRunner, as on the cluster: the image's uid 1000, the cluster's shared volume (caches, token
arrays, kept results and checkpoints) as a folder under the pipeline root, which is the one
folder DockerRunner mounts, and MLflow as a tracking server the containers reach over the
host's network.
"""

import os
from contextlib import contextmanager
from pathlib import Path

from kfp import local

from regmix.config.cluster import IMAGE_UID, ClusterConfig, DataVolume
from regmix.config.schema import RegMixConfig
from regmix.errors import UserError
from regmix.pipelines.image import check_engine, docker, has_image, local_image
from regmix.pipelines.interrupt import TASK_STOP_SECONDS

VOLUME_FOLDER = "volume"  # under the pipeline root: what a cluster keeps on its shared volume
RUN_LABEL = "regmix.pipeline_run"  # on each task's container: the run it belongs to


class RunnerError(UserError):
    """`--runner docker` cannot run as asked; says what to build or start."""


def checked_server_uri(uri: str) -> str:
    if not uri.startswith(("http://", "https://")):
        raise RunnerError(f"--runner docker needs an MLflow tracking server, not '{uri}' (a "
                          "container cannot share a SQLite file safely): start one with "
                          "`regmix mlflow up` and pass the URI it prints as --tracking-uri")
    return uri


def docker_runner(config: RegMixConfig, pipeline_root: Path, image: str | None,
                  label: str) -> tuple[local.DockerRunner, RegMixConfig]:
    """The runner, and the config with the cluster settings kfp.local honours: the image, and
    the volume's environment (where caches, token arrays and kept work go). Each container
    carries the run's label, so that an interrupted run can stop its own."""
    check_engine()
    image = image or local_image()
    if not has_image(image):
        raise RunnerError(f"image {image} is not on this machine: build it with `regmix image "
                          "build` (or pass --image)")
    closed = [str(folder) for folder in pipeline_root.resolve().parents
              if folder.exists() and not folder.stat().st_mode & 0o001]
    if closed:
        raise RunnerError(f"the image's uid {IMAGE_UID} cannot reach the pipeline root "
                          f"{pipeline_root.resolve()}: {closed[0]} is closed to other users; "
                          f"run from a folder they can enter (or chmod o+x {closed[0]})")
    volume = DataVolume(claim="rehearsal", mount_path=str(pipeline_root.resolve() / VOLUME_FOLDER))
    cluster = ClusterConfig(image=image, volume=volume)
    runner = local.DockerRunner(user=f"{IMAGE_UID}:{IMAGE_UID}", network_mode="host",
                                labels={RUN_LABEL: label})
    return runner, config.model_copy(update={"cluster": cluster})


@contextmanager
def writable_by_the_image(pipeline_root: Path):
    """kfp.local makes each task's output folders in this process before the task's container
    writes into them as uid 1000: they must be writable by it, as a pod's volume would be."""
    pipeline_root.mkdir(parents=True, exist_ok=True)
    pipeline_root.chmod(0o777)
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def stop_containers(label: str) -> None:
    """Stop the run's task containers: the engine runs them, not this process, so they would
    go on training and logging after it (docker stops the listed ones concurrently)."""
    running = docker("ps", "-q", "--filter", f"label={RUN_LABEL}={label}", capture_output=True,
                     text=True).stdout.split()
    if running:
        docker("stop", "-t", str(TASK_STOP_SECONDS), *running, capture_output=True)
