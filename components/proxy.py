"""Stage 2, train_proxy: train a small LM on one mixture and measure its loss on every domain.

The trainer is shared with the large run (`components/large.py`): only shape and recipe differ.
`accelerate` places it on the device, runs bf16 autocast there, and under `torchrun` or
`accelerate launch` (configs/accelerate/) spreads it over GPUs: DDP, or FSDP by
`TrainRecipe.distributed` or the accelerate config. A task's proxies can instead be trained
packed, as one batched model (`components/packed.py`).
A proxy result (the contract the regression reads) is
`{"id", "hash", "weights": {domain: w}, "val_loss": {domain: loss}, "train_loss", "tokens",
"seconds", "run_id", "reused"}`.
"""


import ctypes
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from kfp import dsl
from kfp.dsl import Input

from components import component
from components.config import TrainRecipe
from components.data import TokenData
from components.files import cache_root, write_text
from components.model import LM, missing_compiler
from components.packed import PackedLM
from components.shapes import ModelShape
from components.tracking import CORPUS_TAG, HASH_TAG, TrackingUnavailable, retried

DIVERGED_TAG = "regmix.diverged"

log = logging.getLogger("regmix.proxy")


class MixtureBatches:
    """Random windows drawn from each domain's packed tokens in proportion to the weights.

    Vectorised: one multinomial draw of domains per batch, one fancy-index gather per domain;
    no per-token Python. Seeded numpy on the host, so CPU and GPU see identical batches.
    """

    def __init__(self, data: TokenData, weights: dict[str, float], context: int, seed: int):
        self.domains = [d for d in data.domains if weights.get(d, 0.0) > 0]
        self.arrays = [data.array("train", d) for d in self.domains]
        p = np.array([weights[d] for d in self.domains], dtype=np.float64)
        self.p = p / p.sum()
        self.context = context
        self.rng = np.random.default_rng(seed)
        short = [d for d, a in zip(self.domains, self.arrays, strict=True) if a.size <= context + 1]
        if short:
            raise ValueError(f"domains {short} have fewer train tokens than one context window")

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.rng.multinomial(batch_size, self.p)
        offsets = np.arange(self.context + 1)
        rows = []
        for array, n in zip(self.arrays, counts, strict=True):
            if n:
                starts = self.rng.integers(0, array.size - self.context - 1, size=n)
                rows.append(array[starts[:, None] + offsets])
        windows = np.concatenate(rows)[self.rng.permutation(batch_size)]
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


def lr_at(step: int, total: int, recipe: TrainRecipe) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr`."""
    warmup = max(1, int(recipe.warmup_fraction * total))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = recipe.min_lr_ratio * recipe.lr
    return floor + (recipe.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, recipe: TrainRecipe) -> torch.optim.AdamW:
    # Weight decay on every parameter, as the paper's (TinyLlama) trainer does. The fused kernel
    # updates all parameters in one pass, on CPU as on GPU.
    return torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas,
                             weight_decay=recipe.weight_decay, fused=True)


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse rather than return it to the OS.

    A step frees and reallocates the same large blocks (logits, activations); by default glibc
    maps each one fresh from the OS and faults it in zero-filled, page by page. On the local CPU
    shape that was a sixth of the training step and almost half of the evaluation.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def resolved_precision(recipe: TrainRecipe) -> str:
    """The recipe's mixed precision, `auto` resolved: bf16 where the GPU has it, else none."""
    if recipe.mixed_precision != "auto":
        return recipe.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(recipe: TrainRecipe):
    """An `Accelerator` with this recipe's precision, however many came before in this process.

    `AcceleratorState` is a process-wide singleton that refuses a second, different precision;
    only it is reset here, never the distributed state (the process group) beneath it.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    precision = resolved_precision(recipe)
    fsdp = None
    if recipe.distributed == "fsdp":  # takes effect only with several processes
        from accelerate.utils import FullyShardedDataParallelPlugin

        # A shard unit per transformer block; checkpoints stay sharded (each rank writes its
        # own part), the final model is gathered whole.
        fsdp = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"],
            state_dict_type="SHARDED_STATE_DICT", use_orig_params=True)
    return Accelerator(mixed_precision=precision, fsdp_plugin=fsdp,
                       dynamo_backend="inductor" if recipe.compile else "no")


class Progress:
    """What a checkpoint holds beside model and optimizer: the step, the samplers, the curve,
    and the seconds trained so far (a resumed run's throughput counts every try)."""

    def __init__(self, batches: list[MixtureBatches]):
        self.step = 0
        self.batches = batches
        self.logged: list[tuple[int, list[float]]] = []  # (step, one train loss per model)
        self.seconds = 0.0

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch per model, stacked: (models, batch_size, context) inputs and targets."""
        x, y = zip(*(b.next(batch_size) for b in self.batches), strict=True)
        return torch.stack(x), torch.stack(y)

    def state_dict(self) -> dict:
        return {"step": self.step, "logged": self.logged, "seconds": self.seconds,
                "rngs": [b.rng.bit_generator.state for b in self.batches]}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.logged = state["step"], [tuple(item) for item in state["logged"]]
        self.seconds = state.get("seconds", 0.0)  # checkpoints from before it was kept: 0
        for b, rng in zip(self.batches, state["rngs"], strict=True):
            b.rng.bit_generator.state = rng


def save_checkpoint(accelerator, folder: Path, step: int) -> None:
    """Write the training state to `folder/step-N` atomically, then drop older checkpoints."""
    final = folder / f"step-{step:09d}"
    partial = folder / f".{final.name}.partial"
    accelerator.save_state(str(partial))  # every rank: FSDP gathers, each rank writes its RNG
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial, final)  # a checkpoint folder exists whole or not at all
        for old in folder.iterdir():
            if old != final:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def latest_checkpoint(folder: Path | None) -> Path | None:
    found = sorted(folder.glob("step-*")) if folder is not None and folder.is_dir() else []
    return found[-1] if found else None


def train_lm(
    data: TokenData,
    weights: dict[str, float],
    shape: ModelShape,
    recipe: TrainRecipe,
    seed: int,
    on_log: Callable[[int, float], None] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> tuple[LM, float, int, float]:
    """Train an LM on `weights` for `recipe.tokens` tokens; returns (model, last loss, tokens,
    seconds trained, over every try of a resumed run).

    With `checkpoint_dir`, the state is saved there every `recipe.checkpoint_every` steps and a
    run finding a checkpoint there resumes from it, ending as the uninterrupted run would.
    """
    from accelerate.utils import set_seed

    set_seed(seed)
    model = LM(shape, data.vocab_size)
    log = None if on_log is None else lambda step, losses: on_log(step, losses[0])
    model, losses, tokens, seconds = run_training(
        model, [MixtureBatches(data, weights, shape.context, seed)], recipe, log, checkpoint_dir)
    return model, losses[0], tokens, seconds


def train_packed(
    data: TokenData,
    mixtures: list[dict[str, float]],
    shape: ModelShape,
    recipe: TrainRecipe,
    seeds: list[int],
    on_log: Callable[[int, list[float]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> tuple[list[LM], list[float], int, float]:
    """`train_lm` for several (mixture, seed) pairs at once, packed into one batched model.

    Each model is initialised and fed exactly as `train_lm` would alone, so each ends as it
    would have alone, up to float rounding. Returns (models, last losses, tokens per model,
    seconds trained in all).
    """
    from accelerate.utils import set_seed

    models = []
    for seed in seeds:
        set_seed(seed)
        models.append(LM(shape, data.vocab_size))
    batches = [MixtureBatches(data, w, shape.context, seed)
               for w, seed in zip(mixtures, seeds, strict=True)]
    packed, losses, tokens, seconds = run_training(
        PackedLM(models), batches, recipe, on_log, checkpoint_dir)
    return packed.unpack(), losses, tokens, seconds


def run_training(model: LM | PackedLM, batches: list[MixtureBatches], recipe: TrainRecipe,
                 on_log: Callable[[int, list[float]], None] | None,
                 checkpoint_dir: str | Path | None) -> tuple:
    """The training loop of `train_lm` (one model) and `train_packed` (one per sampler)."""
    from accelerate.utils import DistributedType

    keep_freed_memory()
    accelerator = make_accelerator(recipe)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and isinstance(model, PackedLM):
        raise ValueError("packed proxies train on one device; run them without FSDP")
    context = batches[0].context
    steps = max(1, recipe.tokens // (recipe.batch_size * context))
    ranks, rank = accelerator.num_processes, accelerator.process_index
    if recipe.batch_size % ranks:
        raise ValueError(f"batch_size ({recipe.batch_size}) must divide by the {ranks} processes")
    per_rank = recipe.batch_size // ranks
    micro = min(recipe.micro_batch_size or per_rank, per_rank)
    packed = isinstance(model, PackedLM)
    if recipe.compile and (compiler := missing_compiler(accelerator.device)):
        raise ValueError(f"train.compile is true, but torch.compile on {accelerator.device.type} "
                         f"needs a compiler this machine lacks ({compiler}): install it (the "
                         "project's image, docker/Dockerfile, has gcc and g++) or set compile: false")
    model = accelerator.prepare(model)
    optimizer = accelerator.prepare(make_optimizer(model.parameters(), recipe))
    progress = Progress(batches)
    accelerator.register_for_checkpointing(progress)
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if (checkpoint := latest_checkpoint(checkpoint_dir)) is not None:
        accelerator.load_state(str(checkpoint))
    if on_log:
        for step, losses in progress.logged:  # the curve so far, for a resumed run's log
            on_log(step, losses)
    started, earlier_tries = time.perf_counter(), progress.seconds

    def losses_of(x, y):  # (models, B, T) -> (models,) losses
        return model(x, y) if packed else model(x[0], y[0])[None]

    share = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(progress.step, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, recipe)
        # Every rank draws the whole batch and keeps its share: the data seen is the same
        # whatever the number of GPUs.
        x, y = (to_device(t[:, share], accelerator.device) for t in progress.next(recipe.batch_size))
        losses = torch.zeros(len(batches), device=accelerator.device)
        for start in range(0, per_rank, micro):
            rows = slice(start, start + micro)
            share_of_step = x[:, rows].shape[1] / per_rank  # a rank's last chunk may be short
            syncs = start + micro >= per_rank  # gradients are all-reduced once per step
            with nullcontext() if syncs else accelerator.no_sync(model):
                # (prepare made the model's forward run under the recipe's autocast)
                micro_losses = losses_of(x[:, rows], y[:, rows])
                accelerator.backward(micro_losses.sum() * share_of_step)
            losses += micro_losses.detach() * share_of_step
        if packed:
            # Under fp16 the gradients carry the loss scale; accelerate's own clip unscales
            # them first, this one must too (the scaler's step then does not unscale again).
            accelerator.unscale_gradients()
            accelerator.unwrap_model(model).clip_grad_norms_(recipe.grad_clip)
        else:
            accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step = step + 1
        if step % recipe.log_every == 0 or step == steps - 1:
            values = accelerator.reduce(losses, reduction="mean").tolist()
            progress.logged.append((step, values))
            if on_log:
                on_log(step, values)
        if checkpoint_dir is not None and recipe.checkpoint_every and (
                progress.step % recipe.checkpoint_every == 0 and progress.step < steps):
            progress.seconds = earlier_tries + time.perf_counter() - started
            save_checkpoint(accelerator, checkpoint_dir, progress.step)
    tokens = steps * recipe.batch_size * context
    seconds = earlier_tries + time.perf_counter() - started
    if sharded:  # gather the whole model onto the main process; the other ranks are done
        # (compiled, FSDP's full state dict keeps torch.compile's `_orig_mod.` prefix)
        state = {name.removeprefix("_orig_mod."): value
                 for name, value in accelerator.get_state_dict(model).items()}
        inner = accelerator.unwrap_model(model)
        model = None
        if accelerator.is_main_process:
            model = LM(inner.shape, inner.vocab_size).to(accelerator.device)
            model.load_state_dict(state)
        return model, progress.logged[-1][1], tokens, seconds
    # The plain LM, not torch.compile's wrapper (whose state dict names carry `_orig_mod.`)
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False, keep_torch_compile=False)
    return unwrapped, progress.logged[-1][1], tokens, seconds


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From pinned memory the copy is asynchronous: the host samples the next batch meanwhile.
    if device.type != "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


@torch.inference_mode()
def evaluate(model: LM, data: TokenData, precision: str = "no",
             batch_size: int = 64) -> dict[str, float]:
    """Mean next-token loss on each domain's fixed validation tokens (non-overlapping windows).

    On a GPU under the autocast the model trained in (`precision`: bf16, fp16 or no; float32
    softmax either way); on CPU in float32.
    """
    model.eval()
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    context = model.shape.context
    losses = {}
    for domain in data.domains:
        tokens = torch.from_numpy(data.array("validation", domain).astype(np.int64)).to(device)
        rows = (tokens.numel() - 1) // context
        x = tokens[: rows * context].view(rows, context)
        y = tokens[1 : rows * context + 1].view(rows, context)
        with torch.autocast(device.type, dtype, enabled=device.type == "cuda" and dtype is not None):
            total = sum(model(x[i : i + batch_size], y[i : i + batch_size]) * len(x[i : i + batch_size])
                        for i in range(0, rows, batch_size))
        losses[domain] = float(total) / rows  # one device sync per domain
    model.train()
    return losses


def checkpoint_folder(key: str) -> Path:
    """Keyed by content hash, so a re-run of a killed task finds and resumes its checkpoints."""
    return cache_root() / "checkpoints" / key


def kept_result_path(mixture_hash: str) -> Path:
    """Where a trained proxy's outcome waits until MLflow has it: a finished proxy is never lost
    to an MLflow outage, and the next attempt logs it instead of training it again."""
    return cache_root() / "results" / f"{mixture_hash}.json"


def keep_outcome(mixture_hash: str, outcome: dict) -> dict:
    write_text(kept_result_path(mixture_hash), json.dumps(outcome))
    return outcome


def kept_outcome(mixture_hash: str) -> dict | None:
    path = kept_result_path(mixture_hash)
    return json.loads(path.read_text()) if path.exists() else None


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

    from components.config import target_loss

    now = int(time.time() * 1000)
    inputs = {f"weight.{d}": round(w, 6) for d, w in mixture["weights"].items()}
    inputs |= {"shape": str(shape.to_dict()), "tokens_budget": recipe.tokens, "seed": seed,
               "recipe": json.dumps(recipe.identity(), sort_keys=True),
               "mixture_id": mixture["id"]}
    params = [Param(k, str(v)) for k, v in inputs.items()]
    val_loss, seconds = outcome["val_loss"], outcome["seconds"]
    metrics = {**{f"val_loss.{d}": v for d, v in val_loss.items()},
               "target_loss": target_loss(val_loss, target),
               "tokens": outcome["tokens"], "seconds": seconds,
               "tokens_per_second": outcome["tokens"] / seconds}
    # The curve's last point is the final train loss (the last step is always logged).
    curve = [Metric("train_loss", loss, now, step) for step, loss in outcome["curve"]]
    client, run_id = mlflow.MlflowClient(), run.info.run_id
    # MLflow takes at most 100 params and 1000 metrics per batch.
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    every = curve + [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(every), 1000):
        client.log_batch(run_id, metrics=every[i:i + 1000])


def record_proxy(tracking: dict, stage: str, mixture: dict, shape: ModelShape, recipe: TrainRecipe,
                 seed: int, outcome: dict, target: dict[str, float], tags: dict | None = None) -> dict:
    """One MLflow run for one trained proxy; then its kept copy goes. Returns the proxy result."""
    from components.tracking import stage_run

    diverged = bool(diverged_domains(outcome["val_loss"])) or not math.isfinite(
        outcome["train_loss"])
    tags = {HASH_TAG: mixture["hash"], **(tags or {}), **({DIVERGED_TAG: "true"} if diverged else {})}
    kept = kept_result_path(mixture["hash"])
    try:
        with stage_run(tracking, stage, f"{stage}-{mixture['id']}", tags) as run:
            log_proxy_run(run, mixture, shape, recipe, seed, outcome, target)
            if diverged:  # ends the run FAILED, with what it measured logged
                raise Diverged(diverged_message(outcome["val_loss"], stage, run.info.run_id))
    except TrackingUnavailable as e:
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
        return reused_result(previous, mixture, data.domains, stage)
    outcome = kept_outcome(mixture["hash"])
    if outcome is None:
        checkpoints = checkpoint_folder(mixture["hash"])
        curve = []
        model, train_loss, tokens, seconds = train_lm(
            data, mixture["weights"], shape, recipe, seed,
            on_log=lambda step, loss: curve.append((step, loss)), checkpoint_dir=checkpoints)
        if main:
            outcome = keep_outcome(mixture["hash"], {
                "val_loss": evaluate(model, data, resolved_precision(recipe)),
                "train_loss": train_loss, "tokens": tokens, "seconds": seconds, "curve": curve})
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
    results = {m["id"]: reused_result(p, m, data.domains, stage)
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
        models, train_losses, tokens, seconds = train_packed(
            data, [m["weights"] for m, _ in todo], shape, recipe, [seed for _, seed in todo],
            on_log=lambda step, losses: curves.append((step, losses)), checkpoint_dir=checkpoints)
        seconds /= len(todo)  # each proxy's share
        for i, (m, _) in enumerate(todo):
            outcomes[m["hash"]] = keep_outcome(m["hash"], {
                "val_loss": evaluate(models[i], data, resolved_precision(recipe)),
                "train_loss": train_losses[i],
                "tokens": tokens, "seconds": seconds,
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


def limit_cpu_threads(threads: int | None) -> None:
    """Cap torch's CPU threads for this process (config `cpu_threads`; None leaves torch's)."""
    if threads:
        torch.set_num_threads(threads)


def train_task(data_dir: str, task: dict, config, stage: str = "proxy") -> dict:
    """Train a task's mixtures in this process (one pod on a cluster): packed, or in turn.

    A mixture that fails comes back as `{"id", "hash", "weights", "error"}` and the others still
    train; the fan-in decides whether enough of them finished. MLflow out of reach fails the
    task instead (trained results stay kept on disk), so that a retry, not a lost proxy, follows.
    """
    data, tracking = TokenData.open(data_dir), task["tracking"]
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


@component
def train_proxy_op(config: dict, task: dict, data: Input[dsl.Dataset], stage: str = "proxy") -> dict:
    """Train one proxy task's mixtures; returns `{task, results: [proxy result, ...]}`."""
    from components.config import parse_config
    from components.proxy import train_task

    return train_task(data.path, task, parse_config(config), stage)
