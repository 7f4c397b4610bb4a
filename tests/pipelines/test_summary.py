"""The run summary's comparisons with the baselines, read back from MLflow, and how they print."""

import mlflow
import pytest

from regmix.evidence import run_compare_baselines
from regmix.pipelines.cli import format_summary
from regmix.tracking.outcome import comparisons
from regmix.tracking.runs import stage_run

KEYS = {"mean", "std", "seeds", "margin", "noise", "chosen_wins"}


def large(name: str, seed: int, loss: float) -> dict:
    return {"name": name, "seed": seed, "val_loss": {"wiki": loss}}


def test_the_larger_size_comparison_reads_back_with_the_summary_keys(tracking):
    # Prior: 0.05 worse on every seed (a win beyond noise); uniform: one seed (no bound)
    results = [large("chosen", s, 3.0 + 0.1 * s) for s in range(3)]
    results += [large("prior", s, 3.05 + 0.1 * s) for s in range(3)]
    results += [large("uniform", 0, 3.02)]
    run_compare_baselines(results, {"target": {"wiki": 1.0}}, tracking)
    run = mlflow.MlflowClient(tracking["uri"]).search_runs(
        [tracking["experiment_id"]], "tags.`regmix.stage` = 'evidence'")[0]
    evidence = comparisons(run, "large")
    assert set(evidence) == {"prior", "uniform"} and all(set(b) == KEYS for b in evidence.values())
    assert evidence["prior"]["margin"] == pytest.approx(0.05)
    assert evidence["prior"]["chosen_wins"] is True and evidence["prior"]["seeds"] == 3
    assert evidence["uniform"] == {"mean": pytest.approx(3.02), "std": 0.0, "seeds": 1,
                                   "margin": pytest.approx(3.02 - 3.1), "noise": None,
                                   "chosen_wins": False}  # no bound: no win claimed


def test_the_gate_comparison_reads_back_from_its_metrics(tracking):
    with stage_run(tracking, "gate", "validate-prediction") as run:
        mlflow.log_metrics({"gate.prior.mean": 3.1, "gate.prior.std": 0.02, "gate.prior.seeds": 3,
                            "gate.prior.margin": 0.004, "gate.prior.noise": 0.01,
                            "gate.prior.chosen_wins": 0.0, "gate.spearman": 0.9})
    gate = mlflow.MlflowClient(tracking["uri"]).get_run(run.info.run_id)
    assert comparisons(gate, "gate") == {"prior": {
        "mean": 3.1, "std": 0.02, "seeds": 3, "margin": 0.004, "noise": 0.01,
        "chosen_wins": False}}
    assert comparisons(None, "gate") == {}


def test_the_printed_summary_gives_each_verdict():
    summary = {
        "pipeline_run": "r", "wall_seconds": 60.0, "chosen_mixture": {"a": 0.7, "b": 0.3},
        "predicted_loss": 3.0, "cv_spearman": 0.9, "gate_spearman": 0.95, "gate_passed": True,
        "gate_reason": "prediction validated", "large_target_loss": 2.9,
        "gate_baselines": {"prior": {"mean": 3.1, "std": 0.0, "seeds": 3, "margin": 0.1,
                                     "noise": 0.01, "chosen_wins": True}},
        "evidence": {"uniform": {"mean": 2.95, "std": 0.0, "seeds": 1, "margin": 0.05,
                                 "noise": None, "chosen_wins": False}},
        "proxies_trained": 10, "proxies_reused": 0, "trained": {"proxy": 10},
        "mlflow": {"tracking_uri": "sqlite:///x.db", "experiment": "e", "experiment_id": "1",
                   "parent_run_id": "p"},
    }
    text = format_summary(summary)
    assert "gate: chosen vs baselines at proxy size" in text
    assert "prior        3.1000  chosen wins: margin +0.1000 vs noise 0.0100 over 3 seeds" in text
    assert "larger size: chosen 2.9000 vs baselines" in text
    assert "uniform      2.9500  margin +0.0500 (no noise bound: fewer than 2 paired seeds)" in text
