"""Stage 5, validate_prediction: does the regression's prediction hold on fresh proxies?

Fresh mixtures, never seen by the regression, are trained as proxies alongside the chosen
mixture. The gate passes when
- the rank agreement between predicted and measured loss holds with confidence: the lower
  bound of a bootstrap interval on Spearman reaches the threshold, and
- the chosen mixture is not measurably worse than the best training proxy: both are retrained
  on the same fresh seeds and their per-seed differences weighed against their own noise, not
  taken raw, and
- the chosen mixture beats every `gate.baselines` mixture (by default the prior: the token
  shares, what a user would train on anyway) by more than the paired noise bound, retrained
  on the same seeds: a large run that cannot beat what you would do anyway is not spent.
When it fails, the decision says why and estimates from the regression's learning curve how
many more proxies would be needed.
"""

import math
from pathlib import Path

import mlflow
import numpy as np
from scipy.stats import spearmanr

from regmix.config.sections import target_loss
from regmix.evidence import PAIRED_CONFIDENCE, against, baseline_mixtures, paired_difference
from regmix.mixtures import as_mixtures, chunk, draw_mixtures, mixture_hash, proxy_key
from regmix.regression.saved import Regressor, saved_train_weights
from regmix.tracking.runs import stage_run

CHOSEN, BEST = "chosen", "best"


def seeded(name: str, weights: dict[str, float], seed: int, key: dict) -> dict:
    return {"id": f"{name}@seed{seed}", "weights": weights, "seed": seed,
            "hash": mixture_hash(weights, **{**key, "seed": seed})}


def replica_seeds(seed: int, seeds: int) -> list[int]:
    """The seeds both mixtures are retrained with; none for one seed (nothing to pair)."""
    return [seed + i for i in range(1, seeds + 1)] if seeds > 1 else []


def _rounded(weights: np.ndarray) -> bytes:
    return np.round(weights, 4).tobytes()  # as the sampler tells duplicates


def chosen_was_fitted(chosen: dict[str, float], domains: list[str], fitted: np.ndarray) -> bool:
    """Whether the chosen mixture is one the regression was fitted on: the search may return a
    training mixture itself (on a tree model's flat surface, the best one). Its prediction is
    then in-sample, so it is no test of the regression and stays out of the rank check."""
    return _rounded(np.array([chosen[d] for d in domains])) in {_rounded(w) for w in fitted}


def fresh_mixtures(config, meta: dict, count: int, fitted: np.ndarray) -> np.ndarray:
    """`count` draws from the config's sampler, none a mixture the regression was fitted on.

    A sparse sampler repeats one-hot mixtures: the demo's gate once drew the training set's
    {code_go: 1}, which the regression had seen. The sampler's draws extend one sequence as
    more are asked for, so the fresh ones are the same whatever had to be skipped.
    """
    seen = {_rounded(w) for w in fitted}
    wanted = count
    while True:
        rng = np.random.default_rng([config.seed, 1])  # a separate stream from the training draw
        drawn = [w for w in draw_mixtures(config, meta, wanted, rng) if _rounded(w) not in seen]
        if len(drawn) >= count:
            return np.stack(drawn[:count])
        wanted += count - len(drawn)


def plan_gate_proxies(
    config, meta: dict, chosen: dict[str, float], best: dict[str, float], fitted: np.ndarray,
) -> list[dict]:
    """`gate.proxies` held-out mixtures, the chosen one first (unless the regression was fitted
    on it: then one more fresh one), none of the `fitted` training mixtures; plus seed replicas
    for the noise; and the same seeds of every `gate.baselines` mixture, to compare with.

    The replicas of the chosen mixture and of the best training proxy share seeds, none of them
    the run's own: the best proxy's loss at that seed is the lowest of many noisy losses, so it
    is biased low (the winner's curse), and reusing it would fail a chosen mixture as good as it.
    """
    domains, key = meta["domains"], proxy_key(config, meta)
    held_out = config.gate.proxies - (0 if chosen_was_fitted(chosen, domains, fitted) else 1)
    fresh = fresh_mixtures(config, meta, held_out, fitted)
    weights = np.vstack([[chosen[d] for d in domains], fresh])
    mixtures = as_mixtures(weights, domains, "g", key)
    mixtures[0]["id"] = CHOSEN
    seeds = replica_seeds(config.seed, config.gate.seeds)
    mixtures += [seeded(CHOSEN, chosen, s, key) for s in seeds]
    mixtures += [seeded(BEST, best, s, key) for s in seeds]
    others = [b for b in config.gate.baselines if b != "best_proxy"]  # best_proxy: BEST's
    for name, weights in baseline_mixtures(config, meta, best, others).items():
        mixtures += [seeded(name, weights, s, key) for s in seeds]
    return chunk(mixtures, config.proxy.per_task)


def bootstrap_spearman(
    predicted: np.ndarray, measured: np.ndarray, draws: int, confidence: float, seed: int,
) -> tuple[float, float, float]:
    """Spearman and its percentile bootstrap interval over the fresh proxies."""
    point = float(spearmanr(predicted, measured).statistic)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(predicted), size=(draws, len(predicted)))
    values = [spearmanr(predicted[i], measured[i]).statistic for i in samples]
    # A draw of tied values has no rank correlation: it counts as none (0), as in the
    # regression's CV. Dropping it would lift the interval above its own point estimate.
    values = np.nan_to_num(np.array(values), nan=0.0)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return (0.0 if np.isnan(point) else point), float(low), float(high)


MAX_PROXIES_GROWTH = 100  # proxies_needed gives no estimate beyond 100x the curve's largest


def proxies_needed(curve: list[list[float]], threshold: float) -> int | None:
    """Training proxies at which the learning curve's Spearman would reach `threshold`.

    Fits 1 - rho = a * n^-b on the (n, CV Spearman) points. None when no estimate is worth
    giving: fewer than 3 points, not improving, or beyond MAX_PROXIES_GROWTH x the most proxies
    on the curve (a power law fitted to a near-flat curve extrapolates to absurd counts).
    """
    points = [(n, r) for n, r in curve if r < 1]
    if len(points) < 3 or threshold >= 1:
        return None
    n, rho = np.array(points, dtype=float).T
    slope, intercept = np.polyfit(np.log(n), np.log(1 - rho), 1)
    if slope >= 0:
        return None
    log_needed = (math.log(1 - threshold) - intercept) / slope  # in logs: no overflow
    if log_needed > math.log(MAX_PROXIES_GROWTH * n.max()):
        return None
    return math.ceil(math.exp(log_needed))


# Fewer finished fresh proxies than this and the rank check fails, whatever it measured: a
# percentile bootstrap over 2-4 points that happen to be in order gives the interval [1, 1].
# Predictions unrelated to the losses then still clear a 0.8 lower bound in about 49 % (2
# proxies), 22 % (3) and 6.5 % (4) of trials, against 0.9 % with 5 and 0.2 % with 6: only a
# perfect order clears it there (1/5!, 1/6!), and one swapped pair clears 0.8 (at 90 %) only
# from 8 proxies on: the default gate.proxies.
MIN_FRESH_PROXIES = 5


def decide(results: list[dict], predicted: dict[str, float], target: dict[str, float],
           fit_report: dict, gate, chosen_fitted: bool = False) -> dict:
    """The gate decision and every number behind it. `chosen_fitted`: the chosen mixture is a
    training mixture (`chosen_was_fitted`), so the rank check leaves it out."""
    measured = {r["id"]: target_loss(r["val_loss"], target) for r in results}
    fresh = sorted(r["id"] for r in results  # held out: no seed replicas, nothing fitted
                   if "@seed" not in r["id"] and not (chosen_fitted and r["id"] == CHOSEN))
    # Reported down to 3 points (below, a rank correlation is meaningless); decided from 5.
    spearman, low, high = bootstrap_spearman(
        np.array([predicted[i] for i in fresh]), np.array([measured[i] for i in fresh]),
        gate.bootstrap, gate.confidence, seed=0,
    ) if len(fresh) >= 3 else (0.0, float("nan"), float("nan"))
    seeds = replica_seeds_measured(measured)
    paired = [s for s in seeds if f"{BEST}@{s}" in measured]
    if len(paired) >= 2:
        # Not measurably worse: the mean per-seed difference is within its paired t bound.
        chosen = [measured[f"{CHOSEN}@{s}"] for s in paired]
        best = [measured[f"{BEST}@{s}"] for s in paired]
        tolerance = paired_difference(chosen, best)[1]
        basis = f"the {PAIRED_CONFIDENCE:.1%} t bound on the chosen - best difference over " \
                f"{len(paired)} seeds"
    else:
        chosen, best = [measured[CHOSEN]], [fit_report["best_train_target"]]
        tolerance = fit_report["cv_rmse"]
        basis = "CV RMSE (fewer than 2 paired seeds: no noise estimate)"
    gap = float(np.mean(chosen) - np.mean(best))
    baselines = compare_baselines(measured, seeds, gate.baselines)
    enough = len(fresh) >= MIN_FRESH_PROXIES
    ranks_ok, chosen_ok = enough and low >= gate.spearman_threshold, gap <= tolerance
    reasons = []
    if not enough:
        reasons.append(
            f"only {len(fresh)} of {gate.proxies} fresh gate proxies finished; the rank check "
            f"needs at least {MIN_FRESH_PROXIES}: see the failed ones in the gate run and rerun "
            "(finished proxies are reused)")
    elif not ranks_ok:
        reasons.append(
            f"Spearman {spearman:.3f} on {len(fresh)} fresh proxies, {gate.confidence:.0%} "
            f"interval [{low:.3f}, {high:.3f}]: lower bound < {gate.spearman_threshold}"
        )
        needed = proxies_needed(fit_report.get("learning_curve", []), gate.spearman_threshold)
        if needed is None:
            more = ("the learning curve does not show more proxies getting there (flat, too "
                    "slow, or under 3 points to extrapolate): train proxies longer or use a less "
                    "noisy target")
        elif needed <= fit_report["proxies"]:
            more = ("the regression's CV Spearman already clears the threshold, so the fresh "
                    "sample is too small to show it: raise gate.proxies")
        else:
            more = (f"the learning curve suggests about {needed - fit_report['proxies']} more "
                    f"training proxies ({needed} in all)")
        reasons.append(more)
    if not chosen_ok:
        reasons.append(f"chosen mixture measured {np.mean(chosen):.4f}, worse than the best "
                       f"training proxy {np.mean(best):.4f} by {gap:.4f} > {basis} "
                       f"{tolerance:.4f}")
    unbeaten = [name for name, b in baselines.items() if not b["chosen_wins"]]
    for name in unbeaten:
        reasons.append(unbeaten_reason(name, baselines[name]))
    if unbeaten:
        reasons.append("what would help: more training proxies (mixtures.count) for a better "
                       "regression, more gate seeds (gate.seeds) for a tighter bound, or a "
                       "target the mixture can move (regression.target; a target-only set "
                       "of what you care about)")
    return {
        "passed": bool(ranks_ok and chosen_ok and not unbeaten),
        "reason": "; ".join(reasons) or "prediction validated",
        "spearman": spearman, "spearman_low": low, "spearman_high": high,
        "threshold": gate.spearman_threshold, "fresh_proxies": len(fresh),
        "chosen_measured": float(np.mean(chosen)), "chosen_predicted": predicted[CHOSEN],
        "best_train_measured": float(np.mean(best)), "gap": gap, "tolerance": tolerance,
        "tolerance_basis": basis, "measured": measured, "predicted": predicted,
        "fresh": fresh, "chosen_fitted": chosen_fitted, "baselines": baselines,
    }


def replica_seeds_measured(measured: dict[str, float], first: int = 1) -> list[str]:
    """The seeds ("seed<k>", k >= `first`) the chosen mixture's gate replicas were measured on."""
    return [i.removeprefix(f"{CHOSEN}@") for i in measured
            if i.startswith(f"{CHOSEN}@seed") and int(i.removeprefix(f"{CHOSEN}@seed")) >= first]


def compare_baselines(measured: dict[str, float], seeds: list[str], names: list[str]) -> dict:
    """The chosen mixture against each baseline's replicas on the gate's seeds (`against`)."""
    chosen = {s: measured[f"{CHOSEN}@{s}"] for s in seeds}
    replicas = {name: BEST if name == "best_proxy" else name for name in names}
    return {name: against(chosen, {s: measured[f"{replica}@{s}"] for s in seeds
                                   if f"{replica}@{s}" in measured})
            for name, replica in replicas.items()}


def unbeaten_reason(name: str, baseline: dict) -> str:
    if baseline["chosen_wins"] is None:
        return (f"cannot judge the chosen mixture against {name}: {baseline['paired_seeds']} "
                "paired seed(s) finished (a failed gate proxy?); rerun, finished proxies are reused")
    bound = f"the paired noise bound {baseline['noise']:.4f} over {baseline['paired_seeds']} seeds"
    margin = baseline["margin"]
    if margin > 0:
        return (f"chosen mixture does not beat {name} at proxy size: ahead of it by "
                f"{margin:.4f}, within {bound}")
    where = f"behind it by {-margin:.4f}" if margin < 0 else "level with it"
    return f"chosen mixture does not beat {name} at proxy size: {where} ({bound})"


def run_plan_gate(config, meta: dict, chosen: dict, fit_report: dict, regressor: Path) -> list[dict]:
    """The gate's proxies as proxy tasks: fresh mixtures and seed replicas."""
    fitted = saved_train_weights(regressor, meta["domains"])
    tasks = plan_gate_proxies(config, meta, chosen["weights"], fit_report["best_train_weights"],
                              fitted)
    for m in (m for task in tasks for m in task["mixtures"] if "@seed" in m["id"]):
        # Which mixture a seed replica repeats (its runs are grouped and named by it): the
        # chosen one, a baseline, or the best proxy by its own id
        name = m["id"].split("@")[0]
        m["replica_of"] = fit_report["best_train_id"] if name == BEST else name
    return tasks


def run_validate_prediction(config, gate_tasks: list[dict], fit_report: dict, regressor: Path,
                            tracking: dict) -> dict:
    """Compare predicted and measured losses on the fresh proxies; log the decision.

    A failed gate proxy of the chosen mixture fails the stage (nothing to judge); other failed
    proxies are left out and recorded."""
    results = [r for task in gate_tasks for r in task["results"] if "error" not in r]
    failed = [r for task in gate_tasks for r in task["results"] if "error" in r]
    chosen_failed = next((r for r in failed if r["id"] == CHOSEN), None)
    if chosen_failed:
        raise RuntimeError(f"the chosen mixture's gate proxy failed ({chosen_failed['error']}); "
                           "the gate cannot judge it. Rerun: finished proxies are reused")
    model = Regressor.load(regressor)
    # (a user's baseline mixture may leave out the domains it gives no weight)
    weights = np.array([[r["weights"].get(d, 0.0) for d in model.domains] for r in results])
    ids = [r["id"] for r in results]
    predicted = dict(zip(ids, map(float, model.predict(weights)), strict=True))
    chosen = next(r["weights"] for r in results if r["id"] == CHOSEN)
    fitted = chosen_was_fitted(chosen, model.domains, model.train_weights)
    decision = decide(results, predicted, fit_report["target"], fit_report, config.gate, fitted)
    with stage_run(tracking, "gate", "validate-prediction"):
        mlflow.log_metrics({
            "gate.spearman": decision["spearman"], "gate.spearman_low": decision["spearman_low"],
            "gate.spearman_high": decision["spearman_high"],
            "gate.passed": float(decision["passed"]),
            "gate.chosen_measured": decision["chosen_measured"],
            "gate.chosen_predicted": decision["chosen_predicted"],
            "gate.best_train_measured": decision["best_train_measured"],
            "gate.tolerance": decision["tolerance"],
            "gate.proxies_reused": sum(r["reused"] for r in results),
            "gate.proxies_failed": len(failed),
        })
        for name, b in decision["baselines"].items():
            mlflow.log_metrics({f"gate.{name}.{k}": float(b[k])
                                for k in ("mean", "std", "seeds", "margin", "noise", "chosen_wins")
                                if b.get(k) is not None})
        mlflow.set_tag("gate.reason", decision["reason"])
        if failed:
            mlflow.log_dict({r["id"]: r["error"] for r in failed}, "failed_proxies.json")
        mlflow.log_dict(decision, "gate.json")
    return decision
