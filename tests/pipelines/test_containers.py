"""The cluster rehearsed on one machine: configs/tiny.yaml with `--runner docker`, every stage in
the project's image (built by `regmix image build`) as uid 1000, against `regmix mlflow up`'s
MLflow server on PostgreSQL. Then a rerun that trains nothing.

Then a fault drill: a proxy's container killed and the MLflow server restarted mid-run.

Needs a Docker engine, the image and PostgreSQL. Where they are missing the tests skip, saying
why, unless REGMIX_REQUIRE_DOCKER=1 (as .ci/run sets after building the image): then they fail.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from regmix.config.cluster import IMAGE_UID
from regmix.pipelines import mlflow_server
from regmix.pipelines.cli import main
from regmix.pipelines.containers import RUN_LABEL, VOLUME_FOLDER
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
        yield folder, uri, ports
    mlflow_server.down(folder / "server")
    shutil.rmtree(folder, ignore_errors=True)


def run_in_containers(folder: Path, uri: str, name: str, config: Path = TINY) -> dict:
    code = main(["run", "--config", str(config), "--runner", "docker", "--tracking-uri", uri,
                 "--summary-json", f"{name}.json"])
    assert code == 0
    return json.loads((folder / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def first(rehearsal):
    folder, uri, _ = rehearsal
    return run_in_containers(folder, uri, "first")


def test_the_tiny_pipeline_runs_in_the_image_against_mlflow_on_postgres(rehearsal, first):
    folder, uri, _ = rehearsal
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
    folder, uri, _ = rehearsal
    again = run_in_containers(folder, uri, "again")
    assert again["proxies_trained"] == 0 and again["proxies_reused"] == 12 + 3 + 9
    assert again["chosen_mixture"] == first["chosen_mixture"]


def container_training(mixture_ids: list[str], after: float = 6, timeout: float = 600) -> str:
    """The id of a container that trains one of `mixture_ids`, once it has run `after` seconds."""
    first_seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = subprocess.run(["docker", "ps", "-q", "--no-trunc"], capture_output=True,
                                 text=True, check=True).stdout.split()
        for container in running:
            args = subprocess.run(["docker", "inspect", "--format", "{{json .Args}}", container],
                                  capture_output=True, text=True).stdout
            if "train_proxy_op" in args and any(f'\\"{m}\\"' in args for m in mixture_ids):
                first_seen.setdefault(container, time.monotonic())
                if time.monotonic() - first_seen[container] >= after:
                    return container
        time.sleep(0.5)
    raise AssertionError(f"no container trained any of {mixture_ids}")


def finished_proxy_hashes(uri: str) -> list[str]:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("regmix-tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`regmix.stage` = 'proxy' and "
                              "attributes.status = 'FINISHED'", max_results=1000)
    return [r.data.tags["regmix.mixture_hash"] for r in runs]


def test_a_killed_proxy_container_and_a_restarted_server_lose_nothing(rehearsal, first):
    """8 more proxies: one of their containers is killed mid-training and the MLflow server
    restarted while the run goes on; the rerun trains only what did not finish, once."""
    folder, uri, ports = rehearsal
    config = yaml.safe_load(TINY.read_text())
    config["mixtures"]["count"] += 8
    config["rank_check"]["mixtures"] = 0
    grown = folder / "grown.yaml"
    grown.write_text(yaml.safe_dump(config))
    drilled = subprocess.Popen(
        [sys.executable, "-m", "regmix.pipelines.cli", "run", "--config", str(grown), "--runner",
         "docker", "--tracking-uri", uri], cwd=folder, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    new = [f"m{i:04d}" for i in range(12, 20)]
    subprocess.run(["docker", "kill", container_training(new)], check=True, capture_output=True)
    mlflow_server.down(folder / "server")
    mlflow_server.up(folder / "server", *ports)
    assert drilled.wait(timeout=900) != 0  # the killed task fails the run
    before = finished_proxy_hashes(uri)
    rerun = run_in_containers(folder, uri, "rerun", grown)
    after = finished_proxy_hashes(uri)
    assert len(set(after)) == len(after)  # none trained twice
    assert len(after) == 12 + 8 and rerun["trained"]["proxy"] == len(after) - len(before) > 0


def test_an_interrupted_run_stops_its_containers(rehearsal):
    """SIGTERM to `regmix run --runner docker`: its task containers (the engine's, not its
    children) stop with it, and the one line says what was kept."""
    folder, uri, _ = rehearsal
    config = yaml.safe_load(TINY.read_text())
    config["seed"] = 7  # new mixtures: proxies that train
    reseeded = folder / "reseeded.yaml"
    reseeded.write_text(yaml.safe_dump(config))
    run = subprocess.Popen(
        [sys.executable, "-m", "regmix.pipelines.cli", "run", "--config", str(reseeded),
         "--runner", "docker", "--tracking-uri", uri], cwd=folder, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    container_training([f"m{i:04d}" for i in range(12)])
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err
    assert err.strip().splitlines()[-1].endswith("rerun the same command to continue")
    left = subprocess.run(["docker", "ps", "-q", "--filter", f"label={RUN_LABEL}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert left == []


def test_docker_runner_needs_a_server_not_a_sqlite_file(rehearsal, capsys):
    code = main(["run", "--config", str(TINY), "--runner", "docker",
                 "--tracking-uri", "sqlite:///mlruns/other.db"])
    assert code == 2
    assert "regmix mlflow up" in capsys.readouterr().err
