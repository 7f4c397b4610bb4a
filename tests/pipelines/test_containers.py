"""The cluster rehearsed on one machine: configs/tiny.yaml with `--runner docker`, every stage in
the project's image (built by `regmix image build`) as uid 1000, against `regmix mlflow up`'s
MLflow server on PostgreSQL. Then a rerun that trains nothing.

Needs a Docker engine, the image and PostgreSQL. Where they are missing the tests skip, saying
why, unless REGMIX_REQUIRE_DOCKER=1 (as .ci/run sets after building the image): then they fail.
"""

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import mlflow
import pytest

from regmix.config.cluster import IMAGE_UID
from regmix.pipelines import mlflow_server
from regmix.pipelines.cli import main
from regmix.pipelines.containers import VOLUME_FOLDER
from regmix.pipelines.image import ImageError, check_engine, has_image, local_image

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def missing() -> str | None:
    """Why the rehearsal cannot run here, if it cannot."""
    try:
        check_engine()
    except ImageError as e:
        return str(e)
    if not has_image(local_image()):
        return f"no image {local_image()}: run `regmix image build`"
    try:
        mlflow_server.postgres_bin()
    except mlflow_server.ServerError as e:
        return str(e)
    return None


pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def rehearsal():
    """An open working folder (the image's uid must reach the pipeline root) and a server."""
    if reason := missing():
        if os.environ.get("REGMIX_REQUIRE_DOCKER") == "1":
            pytest.fail(f"REGMIX_REQUIRE_DOCKER=1 but {reason}")
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="regmix-rehearsal-"))
    folder.chmod(0o755)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    uri = mlflow_server.up(folder / "server", *ports)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield folder, uri
    mlflow_server.down(folder / "server")
    shutil.rmtree(folder, ignore_errors=True)


def run_in_containers(folder: Path, uri: str, name: str) -> dict:
    code = main(["run", "--config", str(TINY), "--runner", "docker", "--tracking-uri", uri,
                 "--summary-json", f"{name}.json"])
    assert code == 0
    return json.loads((folder / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def first(rehearsal):
    return run_in_containers(*rehearsal, "first")


def test_the_tiny_pipeline_runs_in_the_image_against_mlflow_on_postgres(rehearsal, first):
    folder, uri = rehearsal
    assert first["mlflow"]["tracking_uri"] == uri
    assert first["proxies_trained"] == 12 + 3 + 9 and first["failed"] == {}
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("regmix-tiny")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`regmix.pipeline_run` = '{first['pipeline_run']}'")
    stages = [r.data.tags["regmix.stage"] for r in runs]
    assert stages.count("proxy") == 12 and stages.count("gate") == 1
    domains = list(first["chosen_mixture"])
    for run in (r for r in runs if r.data.tags["regmix.stage"] == "proxy"):
        assert {f"weight.{d}" for d in domains} <= set(run.data.params)
        assert {f"val_loss.{d}" for d in domains} <= set(run.data.metrics)
    # Artifacts went through the server into its store, not into a path only a container saw
    parent = next(r for r in runs if r.data.tags["regmix.stage"] == "pipeline")
    assert client.list_artifacts(parent.info.run_id)
    assert any((folder / "server" / "artifacts").rglob("*.html"))
    # The stages ran as the image's user, and kept their work on the "shared volume"
    volume = folder / "mlruns" / "pipeline-root" / VOLUME_FOLDER
    locks = list((volume / "cache" / "regmix" / "locks").glob("*.lock"))  # one per trained hash
    assert len(locks) >= 12 and {p.stat().st_uid for p in locks} == {IMAGE_UID}
    assert any((volume / "cache" / "regmix" / "tinypile").rglob("manifest.json"))
    outputs = list((folder / "mlruns" / "pipeline-root").glob("regmix-tiny-*/*/executor_output.json"))
    assert outputs and {p.stat().st_uid for p in outputs} == {IMAGE_UID}


def test_a_rerun_in_containers_trains_nothing(rehearsal, first):
    again = run_in_containers(*rehearsal, "again")
    assert again["proxies_trained"] == 0 and again["proxies_reused"] == 12 + 3 + 9
    assert again["chosen_mixture"] == first["chosen_mixture"]


def test_docker_runner_needs_a_server_not_a_sqlite_file(rehearsal, capsys):
    code = main(["run", "--config", str(TINY), "--runner", "docker",
                 "--tracking-uri", "sqlite:///mlruns/other.db"])
    assert code == 2
    assert "regmix mlflow up" in capsys.readouterr().err
