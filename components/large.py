"""Stage 6, train_large: the target-size model on the chosen mixture, and the evidence it wins.

Runs only when the gate passes. The chosen mixture and the comparison mixtures (baselines: the
natural token distribution, uniform, the best proxy's mixture, the user's own) are trained the
same way, on the same seeds, and compared seed by seed. The rank-invariance check
(the paper's premise) retrains some training mixtures at a larger size and compares rankings.
All use the proxies' trainer (`components/proxy.py`) with another shape and recipe.
"""

import numpy as np
from kfp import dsl
from kfp.dsl import Input
from scipy.stats import spearmanr

from components import component
from components.config import target_loss
from components.gate import PAIRED_CONFIDENCE, paired_difference
from components.mixtures import mixture_hash, token_prior


def target_run(name: str, role: str, weights: dict[str, float], seed: int, key: dict,
               tracking: dict) -> dict:
    """One larger-model training run; `role` picks the shape: large, baseline or rank."""
    return {"id": f"{name}@seed{seed}", "name": name, "role": role, "weights": weights,
            "seed": seed, "hash": mixture_hash(weights, **{**key, "seed": seed}),
            "tracking": tracking}


def target_key(config, meta: dict, role: str) -> dict:
    spec = config.rank_check if role == "rank" else config.large
    return {"fingerprint": meta["fingerprint"], "shape": spec.model.resolve().to_dict(),
            "recipe": spec.train.identity()}


def baseline_mixtures(config, meta: dict, best_proxy: dict[str, float]) -> dict[str, dict]:
    domains = meta["domains"]
    tokens = np.array([meta["tokens"][d]["train"] for d in domains], dtype=np.float64)
    known = {
        "prior": dict(zip(domains, token_prior(tokens, 1.0).tolist(), strict=True)),
        "uniform": {d: 1 / len(domains) for d in domains},
        "best_proxy": best_proxy,
    }
    return {**{b: known[b] for b in config.large.baselines}, **config.large.extra_baselines}


def plan_large_runs(config, meta: dict, chosen: dict[str, float], best_proxy: dict[str, float],
                    tracking: dict) -> list[dict]:
    """The chosen mixture and every baseline, each with `large.seeds` seeds."""
    key = target_key(config, meta, "large")
    mixtures = {"chosen": chosen, **baseline_mixtures(config, meta, best_proxy)}
    return [target_run(name, "large" if name == "chosen" else "baseline", weights,
                       config.seed + s, key, tracking)
            for name, weights in mixtures.items() for s in range(config.large.seeds)]


def plan_rank_check(config, meta: dict, proxy_results: list[dict], tracking: dict) -> list[dict]:
    """Training mixtures spread evenly over the measured proxy losses, to retrain larger."""
    target = config.regression.target_weights(meta["domains"])
    ranked = sorted((r for r in proxy_results if "error" not in r),
                    key=lambda r: target_loss(r["val_loss"], target))
    picks = np.unique(np.linspace(0, len(ranked) - 1, config.rank_check.mixtures).round()).astype(int)
    key = target_key(config, meta, "rank")
    return [target_run(ranked[i]["id"], "rank", ranked[i]["weights"], config.seed, key, tracking)
            for i in picks]


def compare(results: list[dict], target: dict[str, float]) -> dict:
    """Each mixture's mean and seed spread; against each baseline, the chosen mixture's margin
    over the seeds both were trained on, and whether it wins beyond seed noise: the same paired
    t bound as the gate's (a seed's luck is shared by every mixture trained on it, so comparing
    means against each mixture's own spread hides a consistent gap behind seed noise)."""
    losses: dict[str, dict[int, float]] = {}
    for r in results:
        losses.setdefault(r["name"], {})[int(r["seed"])] = target_loss(r["val_loss"], target)
    stats = {name: {"mean": float(np.mean(list(v.values()))),
                    "std": float(np.std(list(v.values()), ddof=1)) if len(v) > 1 else 0.0,
                    "seeds": len(v)} for name, v in losses.items()}
    chosen = losses["chosen"]
    for name, by_seed in losses.items():
        if name == "chosen":
            continue
        seeds = sorted(set(by_seed) & set(chosen))
        s = stats[name] | {"paired_seeds": len(seeds)}
        if len(seeds) >= 2:  # > 0: the chosen mixture is better
            s["margin"], s["noise"] = paired_difference([by_seed[i] for i in seeds],
                                                        [chosen[i] for i in seeds])
            s["chosen_wins"] = s["margin"] > s["noise"]
        else:  # no pairs to judge the margin by
            s["margin"], s["chosen_wins"] = s["mean"] - stats["chosen"]["mean"], None
        stats[name] = s
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


def train_target(data_dir: str, run: dict, config) -> dict:
    from components.data import TokenData
    from components.proxy import limit_cpu_threads, train_proxy

    limit_cpu_threads(config.large.cpu_threads)
    spec = config.rank_check if run["role"] == "rank" else config.large
    data = TokenData.open(data_dir)
    target = config.regression.target_weights(data.domains)
    result = train_proxy(data, run, spec.model.resolve(), spec.train, int(run["seed"]),
                         run["tracking"], target, stage=run["role"])
    if "error" in result:  # diverged: no loss to compare or rank; fail the task with the fix
        raise RuntimeError(f"{run['role']} run {run['id']}: {result['error']}")
    return {**result, "name": run["name"], "seed": run["seed"]}


@component
def plan_large_op(config: dict, data_meta: dict, chosen: dict, fit_report: dict,
                  tracking: dict) -> list:
    """The large runs: chosen mixture and baselines, over seeds."""
    from components.config import parse_config
    from components.large import plan_large_runs

    return plan_large_runs(parse_config(config), data_meta, chosen["weights"],
                           fit_report["best_train_weights"], tracking)


@component
def train_target_op(config: dict, run: dict, data: Input[dsl.Dataset]) -> dict:
    """Train one larger model (large, baseline or rank-check run) and log its losses."""
    from components.config import parse_config
    from components.launcher import run_target

    # In process, torchrun over the pod's GPUs, or a PyTorchJob over several nodes.
    return run_target(data.path, run, parse_config(config))


@component
def compare_baselines_op(config: dict, results: list, fit_report: dict, tracking: dict) -> dict:
    """Chosen mixture vs baselines at the large size, judged against seed noise."""
    import mlflow

    from components.large import compare
    from components.tracking import stage_run

    stats = compare(results, fit_report["target"])
    with stage_run(tracking, "evidence", "compare-baselines"):
        for name, s in stats.items():
            mlflow.log_metrics({f"large.{name}.{k}": s[k] for k in ("mean", "std", "margin", "noise")
                                if k in s})
            if s.get("chosen_wins") is not None:
                mlflow.log_metric(f"large.{name}.chosen_wins", float(s["chosen_wins"]))
        mlflow.log_dict(stats, "baselines.json")
    return stats


@component
def plan_rank_check_op(config: dict, data_meta: dict, proxy_results: list, tracking: dict) -> list:
    """Training mixtures to retrain at the larger rank-check size."""
    from components.config import parse_config
    from components.large import plan_rank_check

    results = [r for task in proxy_results for r in task["results"]]
    return plan_rank_check(parse_config(config), data_meta, results, tracking)


@component
def rank_invariance_op(config: dict, proxy_results: list, rank_results: list, data_meta: dict,
                       tracking: dict) -> dict:
    """Spearman between proxy-size and larger-size rankings of the same mixtures."""
    import mlflow

    from components.config import parse_config
    from components.large import rank_invariance
    from components.tracking import stage_run

    target = parse_config(config).regression.target_weights(data_meta["domains"])
    results = [r for task in proxy_results for r in task["results"]]
    check = rank_invariance(results, rank_results, target)
    with stage_run(tracking, "evidence", "rank-invariance"):
        mlflow.log_metrics({"rank_invariance.spearman": check["spearman"],
                            "rank_invariance.mixtures": check["mixtures"]})
        mlflow.log_dict(check, "rank_invariance.json")
    return check
