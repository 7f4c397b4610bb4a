"""The whole pipeline through kfp.local on configs/tiny.yaml, asserted on the MLflow store.

Three runs share one store: the first trains everything, an identical rerun trains nothing
(every proxy and larger-model result is found by its content hash), and a run with 8 more
training proxies trains exactly those 8 in the proxy stage. The first two run the command as a
user does: its output to a pipe (plain lines), then to a terminal (the live view).
"""

import json
import os
import pty
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from regmix.data.tinypile.sources import DOMAINS

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A working folder (kfp.local writes under cwd) and its MLflow store."""
    folder = tmp_path_factory.mktemp("e2e")
    (folder / "mlruns").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield folder, f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def run_command(store, config: Path, name: str, terminal: bool = False) -> tuple[dict, str]:
    """`regmix run` in a process of its own, its output to a pipe or to a pseudo-terminal;
    returns the summary and everything it printed."""
    folder, uri = store
    command = [sys.executable, "-m", "regmix.pipelines.cli", "run", "--config", str(config),
               "--tracking-uri", uri, "--summary-json", f"{name}.json"]
    if terminal:
        controller, terminal_end = pty.openpty()
        process = subprocess.Popen(command, cwd=folder, stdout=terminal_end,
                                   stderr=terminal_end, env={**os.environ, "COLUMNS": "120"})
        os.close(terminal_end)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(controller)
        code, printed = process.wait(), b"".join(chunks).decode()
    else:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        code, printed = done.returncode, done.stdout + done.stderr
    assert code == 0, printed[-3000:]
    return json.loads((folder / f"{name}.json").read_text()), printed


@pytest.fixture(scope="module")
def first_run(store):
    return run_command(store, TINY, "first")


@pytest.fixture(scope="module")
def first(first_run):
    return first_run[0]


@pytest.mark.network
def test_a_run_prints_plain_progress_lines_off_a_terminal(first_run):
    summary, printed = first_run
    lines = printed.splitlines()
    assert len(lines) < 60 and "\x1b" not in printed  # no control codes, no KFP log
    log = Path(lines[0].rsplit(" ", 1)[1])
    assert log.name == f"{summary['pipeline_run']}.log" and "Executing task" in log.read_text()
    assert any(line.startswith("proxies ") and "12/12 done, 0 failed, 0 reused" in line
               and "best proxy m" in line for line in lines)
    assert f"RegMix run {summary['pipeline_run']} finished" in printed


@pytest.mark.network  # builds (or reuses the cached) tinypile from Debian and PyPI packages
def test_tiny_pipeline_end_to_end(store, first):
    summary = first
    assert abs(sum(summary["chosen_mixture"].values()) - 1) < 1e-5  # params keep 6 decimals
    # 12 training proxies; 3 from one active-learning round; the gate's 5 fresh ones (chosen
    # included) plus seed replicas of the chosen and the best proxy on fresh seeds 1 and 2.
    assert summary["proxies_trained"] == 12 + 3 + 9 and summary["proxies_reused"] == 0
    # The chosen mixture and a uniform baseline at the large size; 3 rank-check mixtures.
    assert summary["trained"] == {"proxy": 12, "active-proxy": 3, "gate-proxy": 9, "large": 1,
                                  "baseline": 1, "rank": 3}
    assert summary["failed"] == {}
    assert set(summary["baselines"]) == {"uniform"} and summary["large_target_loss"] > 0
    # One seed at the larger size: a margin, no noise bound, so no win claimed
    uniform = summary["evidence"]["uniform"]
    assert set(uniform) == {"mean", "std", "seeds", "margin", "noise", "chosen_wins"}
    assert uniform["seeds"] == 1 and uniform["noise"] is None and uniform["chosen_wins"] is False
    assert uniform["margin"] == pytest.approx(uniform["mean"] - summary["large_target_loss"])
    assert summary["gate_baselines"] == {}  # configs/tiny.yaml checks the plumbing only
    assert -1 <= summary["cv_spearman"] <= 1 and summary["gate_spearman"] is not None

    client = mlflow.MlflowClient(store[1])
    experiment = client.get_experiment_by_name("regmix-tiny")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`regmix.pipeline_run` = '{summary['pipeline_run']}'")
    stages = [r.data.tags["regmix.stage"] for r in runs]
    assert stages.count("proxy") == 12 and stages.count("gate-proxy") == 9
    assert {"pipeline", "mixtures", "regression", "search", "gate"} <= set(stages)
    # The active round refits on all 15 proxies and searches again before the gate.
    assert stages.count("regression") == 2 and stages.count("search") == 2
    refit = next(r for r in runs if r.info.run_name == "fit-regression-round-1")
    assert refit.data.params["proxies"] == "15"
    domains = list(summary["chosen_mixture"])
    assert len(domains) >= 12
    for run in runs:
        if run.data.tags["regmix.stage"] == "proxy":
            assert {f"weight.{d}" for d in domains} <= set(run.data.params)
            assert {f"val_loss.{d}" for d in domains} <= set(run.data.metrics)
            assert "regmix.mixture_hash" in run.data.tags
    gate = next(r for r in runs if r.data.tags["regmix.stage"] == "gate")
    assert {"gate.spearman", "gate.passed"} <= set(gate.data.metrics)
    assert ("large" in stages) == summary["gate_passed"]
    parent = next(r for r in runs if r.data.tags["regmix.stage"] == "pipeline")
    assert parent.info.status == "FINISHED"


@pytest.mark.network
def test_identical_rerun_trains_nothing_and_shows_it_live_on_a_terminal(store, first):
    again, printed = run_command(store, TINY, "again", terminal=True)
    assert "\x1b[" in printed and "✓" in printed  # a rich live view, redrawn in place
    assert "12/12 done, 0 failed, 12 reused" in printed
    assert again["trained"] == {"proxy": 0, "active-proxy": 0, "gate-proxy": 0, "large": 0,
                                "baseline": 0, "rank": 0}
    assert again["proxies_trained"] == 0 and again["proxies_reused"] == 12 + 3 + 9
    # Same results in, same decisions out.
    assert again["chosen_mixture"] == first["chosen_mixture"]
    # (the compare stage sums its collected results in the order KFP gives: the last bit may differ)
    assert again["large_target_loss"] == pytest.approx(first["large_target_loss"], rel=1e-12)
    assert again["baselines"] == pytest.approx(first["baselines"], rel=1e-12)


@pytest.mark.network
def test_eight_more_proxies_train_exactly_eight(store, first, tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["mixtures"]["count"] += 8  # the sampler is prefix-stable: the first 12 are the same
    config["rank_check"]["mixtures"] = 0
    # A cluster section, a multi-node large run included, changes nothing under kfp.local
    config["cluster"] = {"image": "registry.example/regmix:1", "volume": {"claim": "regmix-data"},
                         "large": {"nodes": 2, "gpus": 8}, "retries": 1}
    grown = tmp_path / "grown.yaml"
    grown.write_text(yaml.safe_dump(config))
    summary, _ = run_command(store, grown, "grown")
    assert summary["trained"]["proxy"] == 8 and summary["trained"]["rank"] == 0
    # The 2-node large run trained here, through kfp.local, instead of submitting a PyTorchJob
    assert summary["gate_passed"] and summary["trained"]["large"] == 1
    client = mlflow.MlflowClient(store[1])
    fits = [client.get_run(run_id) for run_id in summary["mlflow"]["run_ids"]["regression"]]
    fit = next(f for f in fits if f.info.run_name == "fit-regression")
    assert fit.data.metrics["proxies_reused"] == 12 and fit.data.metrics["proxies_trained"] == 8


@pytest.mark.network
def test_the_gate_refuses_a_large_run_that_cannot_beat_its_baseline(store, first, tmp_path):
    """The chosen mixture is pinned to all code, and the baseline is the same mixture: on every
    seed the two train alike, so the margin is 0 and nothing larger may train."""
    config = yaml.safe_load(TINY.read_text())
    pinned_weights = {d.name: 0.0 for d in DOMAINS} | {"code_python": 1.0}  # exactly
    config["search"].update(fixed=pinned_weights, allow_extrapolation=True)
    config["gate"].update(seeds=3, baselines=["same"])
    config["large"]["extra_baselines"] = {"same": {"code_python": 1.0}}
    config["active_learning"]["rounds"] = config["rank_check"]["mixtures"] = 0
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(yaml.safe_dump(config))
    summary, _ = run_command(store, pinned, "pinned")
    assert summary["chosen_mixture"]["code_python"] == 1.0
    assert not summary["gate_passed"]
    assert "chosen mixture does not beat same at proxy size: level with it" \
        in summary["gate_reason"]
    assert "what would help" in summary["gate_reason"]
    assert summary["gate_baselines"] == {"same": {
        "mean": pytest.approx(summary["gate_baselines"]["same"]["mean"]), "std": pytest.approx(
            summary["gate_baselines"]["same"]["std"]), "seeds": 3, "margin": 0.0, "noise": 0.0,
        "chosen_wins": False}}
    assert summary["trained"]["large"] == summary["trained"]["baseline"] == 0
    assert summary["evidence"] == {} and summary["large_target_loss"] is None


@pytest.fixture(scope="module")
def mlflow_api(store, first):
    """`mlflow server` on the store the runs logged to, as a user opens it: its REST API's base."""
    folder, uri = store
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def get(base: str, route: str, **query) -> bytes:
    return urllib.request.urlopen(f"{base}/{route}?{urllib.parse.urlencode(query)}",
                                  timeout=30).read()


def api(base: str, route: str, **query) -> dict:
    return json.loads(get(base, f"api/2.0/mlflow/{route}", **query))


@pytest.mark.network
def test_the_mlflow_ui_tells_the_runs_story(first, mlflow_api):
    parent_id = first["mlflow"]["parent_run_id"]
    experiment = api(mlflow_api, "experiments/get", experiment_id=first["mlflow"]["experiment_id"])
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} \
        in experiment["experiment"]["tags"]  # opens on the runs table
    parent = api(mlflow_api, "runs/get", run_id=parent_id)["run"]["data"]
    params = {p["key"]: p["value"] for p in parent["params"]}
    metrics = {m["key"]: m["value"] for m in parent["metrics"]}
    tags = {t["key"]: t["value"] for t in parent["tags"]}
    assert {k.removeprefix("chosen.") for k in params} == set(first["chosen_mixture"])
    assert metrics["predicted_loss"] == pytest.approx(first["predicted_loss"])
    assert metrics["cv_spearman"] == pytest.approx(first["cv_spearman"])
    assert metrics["proxies_trained"] == 24 and metrics["wall_seconds"] > 0
    assert metrics["large.uniform.margin"] == pytest.approx(first["evidence"]["uniform"]["margin"])
    assert tags["gate.decision"] == "PASSED" and "no noise bound" in tags["large.uniform.verdict"]
    assert tags["mlflow.note.content"].startswith(f"# RegMix run `{first['pipeline_run']}`")
    config = json.loads(get(mlflow_api, "get-artifact", path="config.json", run_uuid=parent_id))
    assert config["seed"] == 0 and isinstance(config["seed"], int)

    def artifacts(run_id: str, path: str = "") -> set[str]:
        listed = api(mlflow_api, "artifacts/list", run_id=run_id, path=path)
        return {f["path"] for f in listed.get("files", [])}

    assert {"report/report.md", "report/report.html"} <= artifacts(parent_id, "report")
    report = get(mlflow_api, "get-artifact", path="report/report.md", run_uuid=parent_id).decode()
    # By absolute address (MLflow's Markdown viewer shows a relative one as text): `mlflow ui`'s,
    # whose route this test's server, on another port, answers the same
    image = urllib.parse.urlsplit(re.search(r"!\[mixture.png\]\(([^)]+)\)", report)[1])
    assert image.netloc == "127.0.0.1:5000" and image.path == "/get-artifact"
    assert get(mlflow_api, "get-artifact", **dict(urllib.parse.parse_qsl(image.query))).startswith(
        b"\x89PNG")
    (search_id, *_) = first["mlflow"]["run_ids"]["search"]
    assert "mixture.yaml" in artifacts(search_id)

    # (runs/search is a POST: the tracking client against the same server)
    runs = mlflow.MlflowClient(mlflow_api).search_runs(
        [first["mlflow"]["experiment_id"]], f"tags.`regmix.pipeline_run` = "
        f"'{first['pipeline_run']}' and tags.`regmix.stage` = 'gate-proxy'")
    for run in runs:  # dated from the start of training: a duration at least its training's
        assert run.info.end_time - run.info.start_time >= run.data.metrics["seconds"] * 1000
        assert run.data.tags["scale"] == "proxy"
    best = [r.info.run_name for r in runs if r.info.run_name.startswith("best@")]
    assert best and all(re.match(r"best@seed\d=m\d{4} · gate-proxy$", name) for name in best)

    name = "regmix-regmix-tiny-regressor"
    # Other runs in this store (the tests beside this one) register versions too: this run's
    # are those its regression runs logged
    found = api(mlflow_api, "model-versions/search", filter=f"name='{name}'")["model_versions"]
    ours = [v for v in found if v["run_id"] in set(first["mlflow"]["run_ids"]["regression"])]
    assert len(ours) == 2  # the fit, then the active-learning round's refit
    version = max(ours, key=lambda v: int(v["version"]))
    assert "CV Spearman" in version["description"] and "target mean" in version["description"]
    mlflow.set_tracking_uri(mlflow_api)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version['version']}")
    weights = pd.DataFrame([first["chosen_mixture"]])
    assert model.predict(weights)[0] == pytest.approx(first["predicted_loss"], abs=1e-3)
