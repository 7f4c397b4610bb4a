"""Optional stage between search and gate: active learning (`active_learning.rounds`).

Each round proposes proxies near the searched optimum where the regression knows least, the
pipeline trains them like any proxy, refits on every proxy so far and searches again. "Knows
least" is the ensemble members' disagreement (1 for a single model) times the distance to the
nearest trained or already proposed mixture, so one round's proxies spread out instead of
piling onto the single most uncertain point.
"""

from pathlib import Path

import mlflow
import numpy as np

from regmix.mixtures import as_mixtures, capped, chunk, dirichlet_around, prior_and_caps, proxy_key
from regmix.regression.saved import Regressor
from regmix.search import nearest_l1_distance
from regmix.tracking.runs import stage_run

# Dirichlet concentrations around the chosen mixture: from a wide neighbourhood (10) to
# close variations (300) of it.
NEIGHBOURHOOD_STRENGTH = (10.0, 300.0)


def propose_mixtures(model, chosen: np.ndarray, caps: np.ndarray, count: int, candidates: int,
                     near_fraction: float, min_weight: float,
                     rng: np.random.Generator) -> np.ndarray:
    """`count` mixtures near `chosen` where the regression `model` is least sure.

    Candidates are Dirichlet draws around `chosen`, brought within the proxies' max-epochs
    `caps` (not rejected, as the sampler does: the optimum often sits at a cap, and half the
    draws around it would be over); the best-predicted `near_fraction` of them is the
    neighbourhood of the optimum; from it, picks go greedily to the largest disagreement x
    distance to every known mixture.
    """
    pool = dirichlet_around(chosen, candidates, rng, NEIGHBOURHOOD_STRENGTH)
    pool[pool < min_weight] = 0.0
    pool = capped(pool / pool.sum(axis=1, keepdims=True), caps)
    pool = pool[np.isfinite(pool).all(axis=1)]
    if not len(pool):
        raise ValueError("active learning: no candidate mixture around the chosen one fits the "
                         "max-epochs caps; raise active_learning.candidates or mixtures.max_epochs")
    predicted, spread = model.predict_with_spread(pool)
    is_near = predicted <= np.quantile(predicted, near_fraction)
    near, disagreement = pool[is_near], spread[is_near]
    if disagreement.max() == 0:  # a single model: distance alone decides
        disagreement = np.ones(len(near))
    known = np.asarray(model.train_weights, dtype=float)
    distance = nearest_l1_distance(near, known)
    picks: list[int] = []
    for _ in range(min(count, len(near))):
        score = disagreement * distance
        score[picks] = -np.inf
        picks.append(int(np.argmax(score)))
        # The pick is now known too: the next one goes elsewhere.
        distance = np.minimum(distance, np.abs(near - near[picks[-1]]).sum(axis=1))
    return near[picks]


def plan_active_proxies(config, meta: dict, model, chosen: dict[str, float],
                        active_round: int) -> list[dict]:
    """This round's proposed proxies as proxy tasks (ids `r<round>a0000`, ...)."""
    domains = meta["domains"]
    settings = config.active_learning
    _, caps = prior_and_caps(config, meta)
    rng = np.random.default_rng([config.seed, 2, active_round])  # apart from other draws
    weights = propose_mixtures(model, np.array([chosen[d] for d in domains]), caps,
                               settings.proxies, settings.candidates, settings.near_fraction,
                               config.mixtures.min_weight, rng)
    mixtures = as_mixtures(weights, domains, f"r{active_round}a", proxy_key(config, meta))
    return chunk(mixtures, config.proxy.per_task)


def run_propose_proxies(config, regressor: Path, chosen: dict, meta: dict, tracking: dict,
                        active_round: int) -> list[dict]:
    """One active-learning round's proxies as proxy tasks, like `run_sample_mixtures`'s."""
    model = Regressor.load(regressor)
    tasks = plan_active_proxies(config, meta, model, chosen["weights"], active_round)
    mixtures = [m for t in tasks for m in t["mixtures"]]
    with stage_run(tracking, "active-learning", f"propose-round-{active_round}"):
        mlflow.log_params({"round": active_round, "proxies": len(mixtures)})
        mlflow.log_dict({"mixtures": mixtures}, "mixtures.json")
    return tasks
