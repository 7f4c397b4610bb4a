"""A pipeline run's outcome, read back from its MLflow runs (the record of truth, not in-process
state): what `regmix run` prints and `--summary-json` writes, and what the parent run shows
where the MLflow UI opens (params, metrics, verdicts, a Markdown description).
"""

import time

from regmix.tracking.runs import PROXY_STAGES, latest_run

TRAINING_STAGES = (*PROXY_STAGES, "large", "baseline", "rank")
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows as a run's description


def evidence_metric(by_stage: dict, name: str) -> float | None:
    return next((r.data.metrics[name] for r in by_stage.get("evidence", [])
                 if name in r.data.metrics), None)


def evidence_names(by_stage: dict) -> list[str]:
    """The mixtures the compare stage compared (its metrics are `large.<name>.mean`)."""
    return sorted({key.removeprefix("large.").removesuffix(".mean")
                   for r in by_stage.get("evidence", []) for key in r.data.metrics
                   if key.startswith("large.") and key.endswith(".mean")})


def comparisons(run, prefix: str) -> dict:
    """Each baseline's record in a run's metrics `<prefix>.<name>.<key>`, as the summary gives
    it: mean, std, seeds, margin (baseline - chosen), noise (the one-sided paired bound; None
    without one) and chosen_wins (margin > noise; False without a bound)."""
    metrics = run.data.metrics if run else {}
    names = sorted({key[len(prefix) + 1:].rsplit(".", 1)[0] for key in metrics
                    if key.startswith(f"{prefix}.") and key.endswith(".margin")})
    return {name: {"mean": metrics[f"{prefix}.{name}.mean"],
                   "std": metrics.get(f"{prefix}.{name}.std"),
                   "seeds": int(metrics.get(f"{prefix}.{name}.seeds", 1)),
                   "margin": metrics[f"{prefix}.{name}.margin"],
                   "noise": metrics.get(f"{prefix}.{name}.noise"),
                   "chosen_wins": bool(metrics.get(f"{prefix}.{name}.chosen_wins", 0.0))}
            for name in names}


def comparison(baseline: dict) -> str:
    """One baseline of `comparisons` against the chosen mixture, in words."""
    if baseline["noise"] is None:
        return f"margin {baseline['margin']:+.4f} (no noise bound: fewer than 2 paired seeds)"
    verdict = "chosen wins" if baseline["chosen_wins"] else "no win"
    return (f"{verdict}: margin {baseline['margin']:+.4f} vs noise {baseline['noise']:.4f} "
            f"over {baseline['seeds']} seeds")


def run_outcome(by_stage: dict) -> dict:
    """The decisions and numbers of one pipeline run, from its runs grouped by stage."""
    fit, search, gate = (latest_run(by_stage.get(s)) for s in ("regression", "search", "gate"))
    # Runs this pipeline run trained, per stage; reused results log no run of their own.

    def count(stage: str, finished: bool) -> int:
        return sum((r.info.status == "FINISHED") == finished for r in by_stage.get(stage, []))

    def metric(run, name: str) -> float | None:
        return run.data.metrics.get(name) if run else None

    trained = {stage: count(stage, finished=True) for stage in TRAINING_STAGES}
    failed = {stage: n for stage in TRAINING_STAGES if (n := count(stage, finished=False))}
    return {
        "chosen_mixture": {k.removeprefix("weight."): float(v) for k, v in
                           (search.data.params if search else {}).items()
                           if k.startswith("weight.")},
        "predicted_loss": metric(search, "predicted_loss"),
        "chosen_measured_loss": metric(gate, "gate.chosen_measured"),  # at proxy size
        "cv_spearman": metric(fit, "cv_spearman"),
        "gate_spearman": metric(gate, "gate.spearman"),
        "gate_passed": bool(metric(gate, "gate.passed")),
        "gate_reason": gate.data.tags.get("gate.reason") if gate else "gate did not run",
        # From the compare stage, which sees reused large runs too (those log no new run).
        "large_target_loss": evidence_metric(by_stage, "large.chosen.mean"),
        "baselines": {name: evidence_metric(by_stage, f"large.{name}.mean")
                      for name in evidence_names(by_stage) if name != "chosen"},
        # The chosen mixture against each baseline, seed by seed: at proxy size in the gate,
        # at the larger size after it
        "gate_baselines": comparisons(gate, "gate"),
        "evidence": comparisons(next((r for r in by_stage.get("evidence", [])
                                      if "large.chosen.mean" in r.data.metrics), None), "large"),
        "rank_invariance_spearman": evidence_metric(by_stage, "rank_invariance.spearman"),
        "trained": trained,
        "failed": failed,  # stages with failed training runs only
        "proxies_trained": sum(trained[stage] for stage in PROXY_STAGES),
        "proxies_reused": int(metric(fit, "proxies_reused") or 0)
        + int(metric(gate, "gate.proxies_reused") or 0),
        "proxies_failed": sum(failed.get(stage, 0) for stage in PROXY_STAGES),
    }


def tell_parent(client, parent, outcome: dict, description: str) -> None:
    """Put the run's story on its parent run: the chosen mixture as params `chosen.<domain>`,
    the losses, Spearmans, decision and counts as metrics, each baseline's margin and verdict
    (`gate.<name>.*` at proxy size, `large.<name>.*` larger), the description in Markdown."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params = {f"chosen.{d}": round(w, 6) for d, w in outcome["chosen_mixture"].items()}
    metrics = {key: outcome[key] for key in (
        "predicted_loss", "chosen_measured_loss", "cv_spearman", "gate_spearman",
        "large_target_loss", "rank_invariance_spearman", "proxies_trained", "proxies_reused",
        "proxies_failed") if outcome[key] is not None}
    metrics |= {"gate_passed": float(outcome["gate_passed"]),
                "wall_seconds": ((parent.info.end_time or now) - parent.info.start_time) / 1000}
    tags = {"gate.decision": "PASSED" if outcome["gate_passed"] else "FAILED",
            "gate.reason": outcome["gate_reason"], DESCRIPTION_TAG: description}
    for prefix, baselines in (("gate", outcome["gate_baselines"]), ("large", outcome["evidence"])):
        for name, b in baselines.items():
            metrics |= {f"{prefix}.{name}.mean": b["mean"], f"{prefix}.{name}.margin": b["margin"],
                        f"{prefix}.{name}.chosen_wins": float(b["chosen_wins"])}
            tags[f"{prefix}.{name}.verdict"] = comparison(b)
    client.log_batch(parent.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
