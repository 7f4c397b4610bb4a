"""The larger runs and the evidence they give (Stage 6, run only when the gate passes).

The chosen mixture and the comparison mixtures (baselines: the natural token distribution,
uniform, the best proxy's mixture, the user's own) are trained the same way, on the same seeds,
and compared seed by seed. The rank-invariance check (the paper's premise) retrains some
training mixtures at a larger size and compares rankings. All use the proxies' trainer
(`regmix/train/`) with another shape and recipe. The paired noise bound is also the gate's.
"""

import math

import mlflow
import numpy as np
from scipy.stats import spearmanr
from scipy.stats import t as student_t

from regmix.config.sections import target_loss
from regmix.mixtures import mixture_hash, token_prior
from regmix.tracking.runs import stage_run

PAIRED_CONFIDENCE = 0.975  # one-sided


def paired_difference(first: list[float], second: list[float]) -> tuple[float, float]:
    """The mean of the per-seed differences first - second (two mixtures trained on the same
    seeds, so a seed's own luck cancels), and the half-width of its one-sided t bound: a mean
    beyond it is a real difference, not seed noise. Needs at least 2 seeds."""
    differences = np.subtract(first, second)
    quantile = float(student_t.ppf(PAIRED_CONFIDENCE, len(differences) - 1))
    spread = quantile * float(np.std(differences, ddof=1)) / math.sqrt(len(differences))
    return float(differences.mean()), spread


def target_run(name: str, role: str, weights: dict[str, float], seed: int, key: dict) -> dict:
    """One larger-model training run; `role` picks the shape: large, baseline or rank."""
    return {"id": f"{name}@seed{seed}", "name": name, "role": role, "weights": weights,
            "seed": seed, "hash": mixture_hash(weights, **{**key, "seed": seed})}


def target_key(config, meta: dict, role: str) -> dict:
    spec = config.rank_check if role == "rank" else config.large
    return {"fingerprint": meta["fingerprint"], "shape": spec.model.resolve().to_dict(),
            "recipe": spec.train.identity()}


def baseline_mixtures(config, meta: dict, best_proxy: dict[str, float],
                      names: list[str]) -> dict[str, dict]:
    """The mixtures `names` stand for: the built-in baselines ("prior": the token shares, the
    natural choice; "uniform"; "best_proxy") or the user's, from large.extra_baselines."""
    domains = meta["domains"]
    tokens = np.array([meta["tokens"][d]["train"] for d in domains], dtype=np.float64)
    known = {
        "prior": dict(zip(domains, token_prior(tokens, 1.0).tolist(), strict=True)),
        "uniform": {d: 1 / len(domains) for d in domains},
        "best_proxy": best_proxy,
        **config.large.extra_baselines,
    }
    return {name: known[name] for name in names}


def plan_large_runs(config, meta: dict, chosen: dict[str, float],
                    best_proxy: dict[str, float]) -> list[dict]:
    """The chosen mixture and every baseline, each with `large.seeds` seeds."""
    key = target_key(config, meta, "large")
    names = [*config.large.baselines, *config.large.extra_baselines]
    mixtures = {"chosen": chosen, **baseline_mixtures(config, meta, best_proxy, names)}
    return [target_run(name, "large" if name == "chosen" else "baseline", weights,
                       config.seed + s, key)
            for name, weights in mixtures.items() for s in range(config.large.seeds)]


def plan_rank_check(config, meta: dict, proxy_results: list[dict]) -> list[dict]:
    """Training mixtures spread evenly over the measured proxy losses, to retrain larger."""
    target = config.regression.target_weights(meta["domains"])
    ranked = sorted((r for r in proxy_results if "error" not in r),
                    key=lambda r: target_loss(r["val_loss"], target))
    picks = np.unique(np.linspace(0, len(ranked) - 1, config.rank_check.mixtures).round()).astype(int)
    key = target_key(config, meta, "rank")
    return [target_run(ranked[i]["id"], "rank", ranked[i]["weights"], config.seed, key)
            for i in picks]


def compare(results: list[dict], target: dict[str, float]) -> dict:
    """Each mixture's mean and seed spread; against each baseline, the chosen mixture's margin
    over the seeds both were trained on, and whether it wins beyond seed noise: the same paired
    t bound as the gate's (a seed's luck is shared by every mixture trained on it, so comparing
    means against each mixture's own spread hides a consistent gap behind seed noise). Each
    mixture keeps its per-seed losses, to judge some of the seeds later
    (benchmarks/seed_subset.py)."""
    losses: dict[str, dict[int, float]] = {}
    for r in results:
        losses.setdefault(r["name"], {})[int(r["seed"])] = target_loss(r["val_loss"], target)
    chosen = losses["chosen"]
    return {name: {**(seed_stats(by_seed) if name == "chosen" else against(chosen, by_seed)),
                   "losses": dict(sorted(by_seed.items()))}
            for name, by_seed in losses.items()}


def seed_stats(by_seed: dict) -> dict:
    """A mixture's mean target loss over its seeds and their spread."""
    values = list(by_seed.values())
    return {"mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "seeds": len(values)}


def against(chosen: dict, baseline: dict) -> dict:
    """A baseline's `seed_stats` and the chosen mixture's margin over it (baseline - chosen,
    > 0: chosen is better) on the seeds both trained on, with the paired one-sided noise bound
    and whether the margin clears it; with fewer than 2 shared seeds, no bound
    (`chosen_wins` None)."""
    seeds = sorted(set(baseline) & set(chosen))
    stats = seed_stats(baseline) | {"paired_seeds": len(seeds)}
    if len(seeds) >= 2:
        stats["margin"], stats["noise"] = paired_difference([baseline[i] for i in seeds],
                                                            [chosen[i] for i in seeds])
        stats["chosen_wins"] = stats["margin"] > stats["noise"]
    else:  # no pairs to judge the margin by
        stats["margin"] = stats["mean"] - seed_stats(chosen)["mean"]
        stats["chosen_wins"] = None
    return stats


def verdict(baseline: dict) -> str:
    """How the chosen mixture fared against one baseline of `compare`, in words."""
    margin, wins = baseline["margin"], baseline["chosen_wins"]
    if wins is None:
        return (f"chosen {'ahead' if margin > 0 else 'behind'} by {abs(margin):.4f} with "
                f"{baseline.get('paired_seeds', 1)} shared seed(s) (set large.seeds >= 2 to "
                "judge it against seed noise)")
    beyond = (f"the seed noise ({PAIRED_CONFIDENCE:.1%} t bound {baseline['noise']:.4f} over "
              f"{baseline['paired_seeds']} seeds)" if "noise" in baseline
              else "the seed spread")  # a record from before the paired comparison
    if wins:
        return f"chosen wins by {margin:.4f}, beyond {beyond}"
    return f"chosen does not win beyond {beyond}: margin {margin:.4f}"


def rank_invariance(proxy_results: list[dict], rank_results: list[dict],
                    target: dict[str, float]) -> dict:
    proxy = {r["id"]: target_loss(r["val_loss"], target) for r in proxy_results if "error" not in r}
    larger = {r["name"]: target_loss(r["val_loss"], target) for r in rank_results}
    ids = sorted(larger)
    rho = spearmanr([proxy[i] for i in ids], [larger[i] for i in ids]).statistic
    return {"spearman": float(rho), "mixtures": len(ids),
            "losses": {i: {"proxy": proxy[i], "larger": larger[i]} for i in ids}}


def run_plan_large(config, meta: dict, chosen: dict, fit_report: dict) -> list[dict]:
    """The large-runs stage's plan: the chosen mixture and baselines, over seeds."""
    return plan_large_runs(config, meta, chosen["weights"], fit_report["best_train_weights"])


def run_compare_baselines(results: list[dict], fit_report: dict, tracking: dict) -> dict:
    """Chosen mixture vs baselines at the large size, judged against seed noise, and logged."""
    stats = compare(results, fit_report["target"])
    with stage_run(tracking, "evidence", "compare-baselines"):
        for name, s in stats.items():
            mlflow.log_metrics({f"large.{name}.{k}": s[k]
                                for k in ("mean", "std", "seeds", "margin", "noise") if k in s})
            if s.get("chosen_wins") is not None:
                mlflow.log_metric(f"large.{name}.chosen_wins", float(s["chosen_wins"]))
        mlflow.log_dict(stats, "baselines.json")
    return stats


def run_plan_rank_check(config, meta: dict, proxy_tasks: list[dict]) -> list[dict]:
    """Training mixtures to retrain at the larger rank-check size."""
    return plan_rank_check(config, meta, [r for task in proxy_tasks for r in task["results"]])


def run_rank_invariance(config, proxy_tasks: list[dict], rank_results: list[dict], meta: dict,
                        tracking: dict) -> dict:
    """Spearman between proxy-size and larger-size rankings of the same mixtures, logged."""
    target = config.regression.target_weights(meta["domains"])
    results = [r for task in proxy_tasks for r in task["results"]]
    check = rank_invariance(results, rank_results, target)
    with stage_run(tracking, "evidence", "rank-invariance"):
        mlflow.log_metrics({"rank_invariance.spearman": check["spearman"],
                            "rank_invariance.mixtures": check["mixtures"]})
        mlflow.log_dict(check, "rank_invariance.json")
    return check
