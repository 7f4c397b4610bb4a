"""Proxy training as a stage: reuse by content hash, locks, kept results, MLflow records."""

import fcntl
import hashlib
import json
import logging
import math
import shutil
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

from regmix.config.sections import TrainRecipe, target_loss
from regmix.config.shapes import ModelShape
from regmix.data.prepare import TokenData
from regmix.errors import TrackingUnavailable
from regmix.files import cache_root, write_text
from regmix.tracking.runs import CORPUS_TAG, HASH_TAG, retried, stage_run
from regmix.train.loop import evaluate, limit_cpu_threads, resolved_precision, train_lm, train_packed

DIVERGED_TAG = "regmix.diverged"
# What sorts and groups training runs: the model's size, and the mixture seed replicas repeat
SCALE_TAG, MIXTURE_TAG = "scale", "regmix.mixture"
LARGER_STAGES = ("large", "baseline", "rank")

log = logging.getLogger("regmix.proxy")


def now_ms() -> int:
    return int(time.time() * 1000)


def checkpoint_folder(key: str) -> Path:
    """Keyed by content hash, so a re-run of a killed task finds and resumes its checkpoints."""
    return cache_root() / "checkpoints" / key


def kept_result_path(mixture_hash: str) -> Path:
    """Where a trained proxy's outcome waits until MLflow has it: a finished proxy is never lost
    to an MLflow outage, and the next attempt logs it instead of training it again."""
    return cache_root() / "results" / f"{mixture_hash}.json"


def keep_outcome(mixture_hash: str, outcome: dict) -> dict:
    path = kept_result_path(mixture_hash)
    try:
        write_text(path, json.dumps(outcome))
    except OSError as e:  # a full disk must not discard a proxy that MLflow can still take
        log.warning("proxy result not kept at %s (%s); it goes to MLflow directly", path, e)
    return outcome


OUTCOME_KEYS = {"val_loss", "train_loss", "tokens", "seconds", "curve"}


def kept_outcome(mixture_hash: str) -> dict | None:
    """The kept outcome of an earlier try, if whole; a damaged one (a truncated write, a full
    disk) is removed with a warning, and the proxy trains again."""
    path = kept_result_path(mixture_hash)
    if not path.exists():
        return None
    try:
        outcome = json.loads(path.read_text())
        if not (isinstance(outcome, dict) and outcome.keys() >= OUTCOME_KEYS):
            raise ValueError(f"not a proxy outcome (keys {sorted(outcome)[:8]})")
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        log.warning("kept proxy result %s is damaged (%s); removed, the proxy trains again",
                    path, e)
        path.unlink(missing_ok=True)
        return None
    return outcome


@contextmanager
def training_lock(mixture_hash: str):
    """Held while this process trains (or logs) the proxy with this content hash, so that two
    pipeline runs at once (a manual run beside a scheduled one) do not both train it, into one
    checkpoint folder: the second waits, then finds the first's result in MLflow. A lock file
    on the cache (the shared volume, on a cluster); flock works across NFS clients, and the
    lock goes with the process that held it, so a killed pod holds nothing."""
    path = cache_root() / "locks" / f"{mixture_hash}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:  # never deleted: a waiter may hold this very file open
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("proxy %s is being trained by another run; waiting for it", mixture_hash)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@retried
def find_finished(tracking: dict, mixture_hash: str) -> dict | None:
    """A finished (or diverged) run with this content hash, if any: its result is reused, not
    retrained.

    Any stage: the hash covers everything that determines the result (mixture, corpus,
    tokenizer, shape, recipe, seed), so the gate reuses the training proxy it replicates.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking["uri"])
    # A diverged run (FAILED, tagged) is a result too: training it again diverges again.
    for ended in ("attributes.status = 'FINISHED'", f"tags.`{DIVERGED_TAG}` = 'true'"):
        runs = client.search_runs([tracking["experiment_id"]],
                                  f"tags.`{HASH_TAG}` = '{mixture_hash}' and {ended}", max_results=1)
        if runs:
            return runs[0]
    return None


def reused_result(previous, mixture: dict, domains: list[str], stage: str) -> dict:
    metrics = previous.data.metrics
    val_loss = {d: metrics[f"val_loss.{d}"] for d in domains}
    if previous.data.tags.get(DIVERGED_TAG) == "true" or diverged_domains(val_loss):
        return failed_result(mixture, diverged_message(val_loss, stage, previous.info.run_id))
    return {"id": mixture["id"], "hash": mixture["hash"], "weights": mixture["weights"],
            "val_loss": val_loss, "train_loss": metrics["train_loss"],
            "tokens": int(metrics["tokens"]), "seconds": metrics["seconds"],
            "run_id": previous.info.run_id, "reused": True}


def failed_result(mixture: dict, error: str) -> dict:
    """A proxy that did not give a loss: reported with the results, never fitted on."""
    return {"id": mixture["id"], "hash": mixture["hash"], "weights": mixture["weights"],
            "error": error}


def diverged_domains(val_loss: dict[str, float]) -> list[str]:
    # Not below 1e300 (NaN compares false): MLflow stores an infinite metric as the largest float.
    return sorted(d for d, loss in val_loss.items() if not abs(loss) < 1e300)


class Diverged(ValueError):
    """Training diverged: its MLflow run ends FAILED (tagged), and its task reports an error."""


def diverged_message(val_loss: dict[str, float], stage: str, run_id: str) -> str:
    section = {"large": "large", "baseline": "large", "rank": "rank_check"}.get(stage, "proxy")
    domains = diverged_domains(val_loss)
    what = f"validation loss not finite on {domains}" if domains else "train loss not finite"
    return (f"diverged: {what} (MLflow run {run_id}); lower {section}.train.lr or "
            f"{section}.train.grad_clip")


@retried
def log_proxy_run(run, mixture: dict, shape: ModelShape, recipe: TrainRecipe, seed: int,
                  outcome: dict, target: dict[str, float]) -> None:
    """Log one trained proxy (inputs, loss curve, outcome) to its open MLflow run."""
    import mlflow
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    inputs = {f"weight.{d}": round(w, 6) for d, w in mixture["weights"].items()}
    # One param per setting (model.n_layer, train.lr, ...): columns MLflow can sort and compare
    inputs |= {f"model.{k}": v for k, v in shape.to_dict().items()}
    inputs |= {f"train.{k}": ", ".join(map(str, v)) if isinstance(v, list) else v  # betas
               for k, v in recipe.identity().items()}
    inputs |= {"seed": seed, "mixture_id": mixture["id"]}
    params = [Param(k, str(v)) for k, v in inputs.items()]
    val_loss, seconds = outcome["val_loss"], outcome["seconds"]
    # target_loss first: MLflow's compare view plots a run's first-logged metric by default
    metrics = {"target_loss": target_loss(val_loss, target),
               **{f"val_loss.{d}": v for d, v in val_loss.items()},
               "tokens": outcome["tokens"], "seconds": seconds,
               "tokens_per_second": outcome["tokens"] / seconds}
    # The curve's last point is the final train loss (the last step is always logged).
    curve = [Metric("train_loss", loss, now, step) for step, loss in outcome["curve"]]
    client, run_id = mlflow.MlflowClient(), run.info.run_id
    # MLflow takes at most 100 params and 1000 metrics per batch.
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    every = [Metric(k, float(v), now, 0) for k, v in metrics.items()] + curve
    for i in range(0, len(every), 1000):
        client.log_batch(run_id, metrics=every[i:i + 1000])


def run_name(stage: str, mixture: dict) -> str:
    """What tells runs apart first, so that a truncated name still does: `best@seed1=m0007 ·
    gate-proxy` (a replica names the proxy it repeats), `m0003 · proxy`, `prior@seed2 · baseline`."""
    of = mixture.get("replica_of")
    shown = mixture["id"] if of is None or mixture["id"].startswith(f"{of}@") else \
        f"{mixture['id']}={of}"
    return f"{shown} · {stage}"


def record_proxy(tracking: dict, stage: str, mixture: dict, shape: ModelShape, recipe: TrainRecipe,
                 seed: int, outcome: dict, target: dict[str, float], tags: dict | None = None) -> dict:
    """One MLflow run for one trained proxy, dated from when its training started (the kept
    outcome's `started`); then its kept copy goes. Returns the proxy result."""
    diverged = bool(diverged_domains(outcome["val_loss"])) or not math.isfinite(
        outcome["train_loss"])
    tags = {HASH_TAG: mixture["hash"], SCALE_TAG: "larger" if stage in LARGER_STAGES else "proxy",
            MIXTURE_TAG: mixture.get("replica_of") or mixture.get("name") or mixture["id"],
            **(tags or {}), **({DIVERGED_TAG: "true"} if diverged else {})}
    kept = kept_result_path(mixture["hash"])
    try:
        with stage_run(tracking, stage, run_name(stage, mixture), tags,
                       start_time=outcome.get("started")) as run:
            log_proxy_run(run, mixture, shape, recipe, seed, outcome, target)
            if diverged:  # ends the run FAILED, with what it measured logged
                raise Diverged(diverged_message(outcome["val_loss"], stage, run.info.run_id))
    except TrackingUnavailable as e:
        if not kept.exists():  # neither MLflow nor the disk took it
            raise TrackingUnavailable(f"{e}. The trained proxy could not be kept either "
                                      f"({kept.parent} not writable); it trains again on a "
                                      "rerun") from None
        raise TrackingUnavailable(f"{e}. The trained proxy is kept at {kept}; rerun once MLflow "
                                  "is back and it is logged without training again") from None
    except Diverged as e:
        error = str(e)
    kept.unlink(missing_ok=True)  # MLflow has it now
    if diverged:
        return failed_result(mixture, error)
    return {"id": mixture["id"], "hash": mixture["hash"], "weights": mixture["weights"],
            "val_loss": outcome["val_loss"], "train_loss": outcome["train_loss"],
            "tokens": outcome["tokens"], "seconds": outcome["seconds"],
            "run_id": run.info.run_id, "reused": False}


def train_proxy(
    data: TokenData, mixture: dict, shape: ModelShape, recipe: TrainRecipe, seed: int,
    tracking: dict, target: dict[str, float], stage: str = "proxy",
) -> dict:
    """Train (or reuse) one proxy and log it as one MLflow run; returns the proxy result."""
    from accelerate import PartialState

    state = PartialState()
    # The ranks of one multi-GPU run train the proxy together: none of them may wait for another
    lock = training_lock(mixture["hash"]) if state.num_processes == 1 else nullcontext()
    with lock:
        return _train_proxy(data, mixture, shape, recipe, seed, tracking, target, stage,
                            state.is_main_process)


def _train_proxy(data: TokenData, mixture: dict, shape: ModelShape, recipe: TrainRecipe,
                 seed: int, tracking: dict, target: dict[str, float], stage: str,
                 main: bool) -> dict:
    previous = find_finished(tracking, mixture["hash"])
    if previous is not None:
        return reused_result(previous, mixture, data.validation_domains, stage)
    outcome = kept_outcome(mixture["hash"])
    if outcome is None:
        checkpoints = checkpoint_folder(mixture["hash"])
        curve, started = [], now_ms()
        model, train_loss, tokens, seconds = train_lm(
            data, mixture["weights"], shape, recipe, seed,
            on_log=lambda step, loss: curve.append((step, loss)), checkpoint_dir=checkpoints)
        if main:
            outcome = keep_outcome(mixture["hash"], {
                "val_loss": evaluate(model, data, resolved_precision(recipe)),
                "train_loss": train_loss, "tokens": tokens, "seconds": seconds, "curve": curve,
                "started": started})
            shutil.rmtree(checkpoints, ignore_errors=True)  # the kept outcome is the record now
    if not main:
        # Another rank of a multi-GPU run (that trained its share, or found the outcome kept
        # by a previous try): only the main process logs, or each run is logged once per rank.
        return {"id": mixture["id"], "hash": mixture["hash"], "weights": mixture["weights"]}
    return record_proxy(tracking, stage, mixture, shape, recipe, seed, outcome, target,
                        {CORPUS_TAG: data.fingerprint})


def train_proxies_packed(
    data: TokenData, mixtures: list[dict], shape: ModelShape, recipe: TrainRecipe,
    seeds: list[int], tracking: dict, target: dict[str, float], stage: str = "proxy",
) -> list[dict]:
    """`train_proxy` for several mixtures (one seed each), the unfinished ones trained packed.

    Each proxy still gets its own MLflow run with the same params and metrics, written once the
    packed training ends; its `seconds` is its share of the packed run's time.
    """
    with ExitStack() as locks:
        for mixture_hash in sorted({m["hash"] for m in mixtures}):  # one order: no deadlock
            locks.enter_context(training_lock(mixture_hash))
        return _train_proxies_packed(data, mixtures, shape, recipe, seeds, tracking, target,
                                     stage)


def _train_proxies_packed(data: TokenData, mixtures: list[dict], shape: ModelShape,
                          recipe: TrainRecipe, seeds: list[int], tracking: dict,
                          target: dict[str, float], stage: str) -> list[dict]:
    previous = [find_finished(tracking, m["hash"]) for m in mixtures]
    results = {m["id"]: reused_result(p, m, data.validation_domains, stage)
               for m, p in zip(mixtures, previous, strict=True) if p is not None}
    outcomes = {m["hash"]: kept_outcome(m["hash"]) for m, p in zip(mixtures, previous, strict=True)
                if p is None}
    # One training per content hash: the gate's replicas of the chosen mixture and of the best
    # proxy share theirs when the search chose the best proxy's own mixture
    todo = list({m["hash"]: (m, seed) for m, seed in zip(mixtures, seeds, strict=True)
                 if m["id"] not in results and outcomes[m["hash"]] is None}.values())
    if todo:
        key = hashlib.sha256("".join(m["hash"] for m, _ in todo).encode()).hexdigest()[:16]
        checkpoints = checkpoint_folder(f"packed-{key}")
        curves: list[tuple[int, list[float]]] = []
        started = now_ms()
        models, train_losses, tokens, seconds = train_packed(
            data, [m["weights"] for m, _ in todo], shape, recipe, [seed for _, seed in todo],
            on_log=lambda step, losses: curves.append((step, losses)), checkpoint_dir=checkpoints)
        seconds /= len(todo)  # each proxy's share
        for i, (m, _) in enumerate(todo):
            outcomes[m["hash"]] = keep_outcome(m["hash"], {
                "val_loss": evaluate(models[i], data, resolved_precision(recipe)),
                "train_loss": train_losses[i],
                "tokens": tokens, "seconds": seconds, "started": started,
                "curve": [(step, losses[i]) for step, losses in curves]})
        shutil.rmtree(checkpoints, ignore_errors=True)
    packed = {m["id"] for m, _ in todo}
    recorded: dict[str, dict] = {}  # content hash -> the run logged for it here
    for m, seed in zip(mixtures, seeds, strict=True):
        if m["id"] in results:
            continue
        if m["hash"] in recorded:  # logged once, reused after
            results[m["id"]] = {**recorded[m["hash"]], "id": m["id"], "reused": True}
            continue
        tags = {CORPUS_TAG: data.fingerprint}
        if m["id"] in packed:
            tags["regmix.packed"] = str(len(todo))
        results[m["id"]] = recorded[m["hash"]] = record_proxy(
            tracking, stage, m, shape, recipe, seed, outcomes[m["hash"]], target, tags)
    return [results[m["id"]] for m in mixtures]


def run_train_proxies(config, task: dict, data_dir: str, tracking: dict, stage: str = "proxy") -> dict:
    """Train a task's mixtures in this process (one pod on a cluster): packed, or in turn.

    A mixture that fails comes back as `{"id", "hash", "weights", "error"}` and the others still
    train; the fan-in decides whether enough of them finished. MLflow out of reach fails the
    task instead (trained results stay kept on disk), so that a retry, not a lost proxy, follows.
    """
    data = TokenData.open(data_dir)
    shape, recipe = config.proxy.model.resolve(), config.proxy.train
    target = config.regression.target_weights(data.domains)
    limit_cpu_threads(config.proxy.cpu_threads)
    mixtures = task["mixtures"]
    # A mixture may carry its own seed (the gate's seed replicas measure the noise).
    seeds = [int(m.get("seed", config.seed)) for m in mixtures]
    if config.proxy.packed and len(mixtures) > 1:
        try:
            results = train_proxies_packed(data, mixtures, shape, recipe, seeds, tracking,
                                           target, stage)
            return {"task": int(task["task"]), "results": results}
        except TrackingUnavailable:
            raise  # fail the task, so the orchestrator retries it: the kept results are reused
        except Exception:  # one bad mixture must not sink its pack: train them one by one
            log.exception("packed training of task %s failed; training its proxies in turn",
                          task["task"])
    results = []
    for m, seed in zip(mixtures, seeds, strict=True):
        try:
            results.append(train_proxy(data, m, shape, recipe, seed, tracking, target, stage))
        except TrackingUnavailable:
            raise  # not the mixture's fault: a retried task logs the kept result
        except Exception as e:  # reported with the results; its task-mates still train
            log.exception("proxy %s failed", m["id"])
            results.append(failed_result(m, f"{type(e).__name__}: {e}"))
    return {"task": int(task["task"]), "results": results}
