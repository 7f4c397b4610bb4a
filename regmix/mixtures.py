"""Stage 1, sample_mixtures: the paper's Dirichlet sampler around the token prior.

A mixture is `{"id", "weights": {domain: weight}, "hash"}`; weights are >= 0 and sum to 1.
The hash keys a proxy result by everything that determines it (mixture, corpus fingerprint
(tokenizer included), model shape, training recipe, seed), so finished results can be reused.
"""

import hashlib
import json

import mlflow
import numpy as np

from regmix.config.constraints import search_constraints
from regmix.config.sections import STRENGTH_RANGE
from regmix.errors import ConfigError
from regmix.tracking.runs import stage_run

SAMPLE_BLOCK = 256  # candidates per draw; fixed so the sequence is independent of count


def token_prior(train_tokens: np.ndarray, temperature: float) -> np.ndarray:
    """The paper's prior: each domain's token share raised to a temperature, renormalised."""
    share = train_tokens / train_tokens.sum()
    prior = share**temperature
    return prior / prior.sum()


def epoch_caps(train_tokens: np.ndarray, token_budget: int, max_epochs: float) -> np.ndarray:
    """Largest weight per domain that repeats it at most `max_epochs` times in the budget."""
    return np.minimum(max_epochs * train_tokens / token_budget, 1.0)


def dirichlet_around(
    prior: np.ndarray, count: int, rng: np.random.Generator,
    strength_range: tuple[float, float] = STRENGTH_RANGE,
) -> np.ndarray:
    """The paper's draw: each row from Dirichlet(prior * strength), its strength log-uniform.

    Small strengths give sparse mixtures, large ones mixtures close to the prior.
    """
    log_lo, log_hi = np.log(strength_range)
    strength = np.exp(rng.uniform(log_lo, log_hi, size=(count, 1)))
    # Dirichlet with tiny concentrations underflows to all-zero rows; gamma draws keep it exact.
    draws = rng.gamma(prior * strength)
    empty = draws.sum(1) == 0
    draws[empty, rng.integers(len(prior), size=empty.sum())] = 1.0
    return draws / draws.sum(1, keepdims=True)


def capped(weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Each row with every weight at most its cap, the excess shared among the row's weights
    still under their caps in proportion to them (zeros stay zero, the row still sums to 1);
    a row that cannot hold its mass under the caps comes back as NaN."""
    weights = np.atleast_2d(np.asarray(weights, dtype=float)).copy()
    for _ in range(weights.shape[1]):  # each pass caps at least one more domain
        excess = np.clip(weights - caps, 0.0, None).sum(axis=1, keepdims=True)
        if not (excess > 1e-12).any():
            break
        weights = np.minimum(weights, caps)
        room = np.where(weights < caps, weights, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            weights += excess * room / room.sum(axis=1, keepdims=True)
    over = (weights > caps + 1e-9).any(axis=1)
    weights[over] = np.nan  # 0/0 above: no room left under the caps
    return weights


def sample_mixtures(
    prior: np.ndarray,
    count: int,
    caps: np.ndarray,
    rng: np.random.Generator,
    strength_range: tuple[float, float] = STRENGTH_RANGE,
    min_weight: float = 0.002,
    max_blocks: int = 400,
) -> np.ndarray:
    """`count` distinct mixtures drawn by `dirichlet_around`.

    Weights under `min_weight` are zeroed and the rest renormalised (tiny weights are noise
    to a proxy); a draw that would repeat a domain past its cap is rejected, as in the paper.
    Candidates come in fixed-size blocks, so the first n mixtures do not depend on `count`:
    asking for 8 more later extends the same sequence (and finished proxies are reused).
    """
    found: dict[bytes, np.ndarray] = {}
    for _ in range(max_blocks):
        weights = dirichlet_around(prior, SAMPLE_BLOCK, rng, strength_range)
        weights[weights < min_weight] = 0.0
        weights = weights[weights.sum(1) > 0]  # every weight under min_weight: nothing left
        weights /= weights.sum(1, keepdims=True)
        for w in weights[(weights <= caps + 1e-12).all(1)]:
            found.setdefault(np.round(w, 4).tobytes(), w)  # drop near-duplicates
            if len(found) == count:
                return np.stack(list(found.values()))
    raise ValueError(
        f"mixtures: found only {len(found)} of {count} distinct mixtures within the max-epochs "
        "caps and over min_weight; raise mixtures.max_epochs, lower mixtures.min_weight or "
        "proxy.train.tokens, or add data"
    )


def mixture_hash(weights: dict[str, float], fingerprint: str, shape: dict, recipe: dict,
                 seed: int) -> str:
    key = {"weights": {d: round(w, 8) for d, w in sorted(weights.items())},
           "corpus": fingerprint, "shape": shape, "recipe": recipe, "seed": seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def as_mixtures(weights: np.ndarray, domains: list[str], prefix: str, key: dict) -> list[dict]:
    """Rows of weights as mixture dicts with ids and content hashes."""
    mixtures = []
    for i, row in enumerate(weights):
        named = {d: float(w) for d, w in zip(domains, row, strict=True)}
        mixtures.append({"id": f"{prefix}{i:04d}", "weights": named,
                         "hash": mixture_hash(named, **key)})
    return mixtures


def chunk(mixtures: list[dict], per_task: int) -> list[dict]:
    """Group mixtures into proxy tasks (pods); each task trains its mixtures one after another."""
    return [{"task": i // per_task, "mixtures": mixtures[i : i + per_task]}
            for i in range(0, len(mixtures), per_task)]


def prior_and_caps(config, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The sampling prior and per-domain max-epochs caps for this config's proxies."""
    tokens = np.array([meta["tokens"][d]["train"] for d in meta["domains"]], dtype=np.int64)
    mix = config.mixtures
    return (token_prior(tokens, mix.temperature),
            epoch_caps(tokens, config.proxy.train.tokens, mix.max_epochs))


def draw_mixtures(config, meta: dict, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` mixtures from the config's sampler (the training draw and the gate's fresh one)."""
    mix = config.mixtures
    prior, caps = prior_and_caps(config, meta)
    return sample_mixtures(prior, count, caps, rng, mix.strength_range,
                           mix.min_weight)


def plan_proxies(config, meta: dict) -> list[dict]:
    """The training proxies for a run: the prior (optionally) plus sampled mixtures, chunked."""
    mix = config.mixtures
    rng = np.random.default_rng(config.seed)
    sampled = draw_mixtures(config, meta, mix.count - mix.include_prior, rng)
    if mix.include_prior:  # the prior itself, within the caps (the sampler found mixtures that are)
        sampled = np.vstack([capped(*prior_and_caps(config, meta)), sampled])
    mixtures = as_mixtures(sampled, meta["domains"], "m", proxy_key(config, meta))
    return chunk(mixtures, config.proxy.per_task)


def proxy_key(config, meta: dict) -> dict:
    return {"fingerprint": meta["fingerprint"], "shape": config.proxy.model.resolve().to_dict(),
            "recipe": config.proxy.train.identity(), "seed": config.seed}


def check_trained_region(config, meta: dict, mixtures: list[dict]) -> None:
    """Raise ConfigError if the search's bounds leave the region these proxies will cover (the
    search stays inside it unless told otherwise): before they train, not after."""
    if config.search.allow_extrapolation:
        return
    domains = meta["domains"]
    planned = np.array([[m["weights"][d] for d in domains] for m in mixtures])
    try:
        search_constraints(config, meta).upper_bounds_in_trained_region(domains, planned)
    except ValueError as e:
        raise ConfigError(f"search: {e}") from None


def run_sample_mixtures(config, meta: dict, tracking: dict) -> list[dict]:
    """The sample-mixtures stage: the proxies' mixtures as proxy tasks `[{task, mixtures}]`,
    checked against the corpus and the search's bounds before anything trains, and logged."""
    # A misnamed domain fails here, not after every proxy trained
    config.check_domains(meta["domains"], meta.get("targets", []), meta)
    tasks = plan_proxies(config, meta)
    mixtures = [m for t in tasks for m in t["mixtures"]]
    check_trained_region(config, meta, mixtures)
    with stage_run(tracking, "mixtures", "sample-mixtures"):
        mlflow.log_params({"count": len(mixtures), "tasks": len(tasks), "seed": config.seed})
        mlflow.log_dict({"mixtures": mixtures}, "mixtures.json")
    return tasks
