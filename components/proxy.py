"""Stage 2, train_proxy: train a small LM on one mixture and measure its loss on every domain.

The trainer is shared with the large run (`components/large.py`): only shape and recipe differ.
A proxy result (the contract the regression reads) is
`{"id", "hash", "weights": {domain: w}, "val_loss": {domain: loss}, "train_loss", "tokens",
"seconds", "run_id", "reused"}`.
"""


import math
import time
from collections.abc import Callable

import numpy as np
import torch
from kfp import dsl
from kfp.dsl import Input

from components import component
from components.config import TrainRecipe
from components.data import TokenData
from components.model import LM
from components.shapes import ModelShape
from components.tracking import HASH_TAG, STAGE_TAG


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
        windows = torch.from_numpy(np.concatenate(rows).astype(np.int64))
        windows = windows[torch.from_numpy(self.rng.permutation(batch_size))]
        return windows[:, :-1], windows[:, 1:]


def lr_at(step: int, total: int, recipe: TrainRecipe) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr`."""
    warmup = max(1, int(recipe.warmup_fraction * total))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = recipe.min_lr_ratio * recipe.lr
    return floor + (recipe.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: LM, recipe: TrainRecipe) -> torch.optim.AdamW:
    # Weight decay on matrices only, as in the paper's (and most LLM) recipes.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": matrices, "weight_decay": recipe.weight_decay},
         {"params": others, "weight_decay": 0.0}],
        lr=recipe.lr, betas=recipe.betas,
    )


def train_lm(
    data: TokenData,
    weights: dict[str, float],
    shape: ModelShape,
    recipe: TrainRecipe,
    seed: int,
    on_log: Callable[[int, float], None] | None = None,
) -> tuple[LM, float, int]:
    """Train an LM on `weights` for `recipe.tokens` tokens; returns (model, last loss, tokens)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(seed)
    accelerator = Accelerator(mixed_precision=recipe.mixed_precision)
    micro = recipe.micro_batch_size or recipe.batch_size
    accumulation = recipe.batch_size // micro
    steps = max(1, recipe.tokens // (recipe.batch_size * shape.context))
    model = LM(shape, data.vocab_size)
    optimizer = make_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = MixtureBatches(data, weights, shape.context, seed)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, recipe)
        total = 0.0
        for _ in range(accumulation):
            x, y = batches.next(micro)
            with accelerator.autocast():
                _, loss = model(x.to(accelerator.device), y.to(accelerator.device))
            accelerator.backward(loss / accumulation)
            total += loss.item() / accumulation
        accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = total
        if on_log and (step % recipe.log_every == 0 or step == steps - 1):
            on_log(step, loss_value)
    return accelerator.unwrap_model(model), loss_value, steps * recipe.batch_size * shape.context


@torch.no_grad()
def evaluate(model: LM, data: TokenData, batch_size: int = 32) -> dict[str, float]:
    """Mean next-token loss on each domain's fixed validation tokens (non-overlapping windows)."""
    model.eval()
    device = next(model.parameters()).device
    context = model.shape.context
    losses = {}
    for domain in data.domains:
        tokens = torch.from_numpy(data.array("validation", domain).astype(np.int64))
        rows = (tokens.numel() - 1) // context
        x = tokens[: rows * context].view(rows, context)
        y = tokens[1 : rows * context + 1].view(rows, context)
        total = 0.0
        for i in range(0, rows, batch_size):
            _, loss = model(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
            total += loss.item() * x[i : i + batch_size].shape[0]
        losses[domain] = total / rows
    model.train()
    return losses


def find_finished(tracking: dict, mixture_hash: str, stage: str = "proxy") -> dict | None:
    """A finished run with this content hash, if any: its result is reused, not retrained."""
    import mlflow

    runs = mlflow.MlflowClient(tracking["uri"]).search_runs(
        [tracking["experiment_id"]],
        filter_string=f"tags.`{HASH_TAG}` = '{mixture_hash}' and tags.`{STAGE_TAG}` = '{stage}' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def train_proxy(
    data: TokenData, mixture: dict, shape: ModelShape, recipe: TrainRecipe, seed: int,
    tracking: dict, target: dict[str, float], stage: str = "proxy",
) -> dict:
    """Train (or reuse) one proxy and log it as one MLflow run; returns the proxy result."""
    import mlflow

    from components.config import target_loss
    from components.tracking import stage_run

    result = {"id": mixture["id"], "hash": mixture["hash"], "weights": mixture["weights"]}
    previous = find_finished(tracking, mixture["hash"], stage)
    if previous is not None:
        metrics = previous.data.metrics
        return {**result, "val_loss": {d: metrics[f"val_loss.{d}"] for d in data.domains},
                "train_loss": metrics["train_loss"], "tokens": int(metrics["tokens"]),
                "seconds": metrics["seconds"], "run_id": previous.info.run_id, "reused": True}
    with stage_run(tracking, stage, f"{stage}-{mixture['id']}", {HASH_TAG: mixture["hash"]}) as run:
        mlflow.log_params({f"weight.{d}": round(w, 6) for d, w in mixture["weights"].items()})
        mlflow.log_params({"shape": str(shape.to_dict()), "tokens_budget": recipe.tokens,
                           "seed": seed, "mixture_id": mixture["id"]})
        started = time.perf_counter()
        model, train_loss, tokens = train_lm(
            data, mixture["weights"], shape, recipe, seed,
            on_log=lambda step, loss: mlflow.log_metric("train_loss", loss, step=step),
        )
        val_loss = evaluate(model, data)
        seconds = time.perf_counter() - started
        mlflow.log_metrics({f"val_loss.{d}": v for d, v in val_loss.items()})
        mlflow.log_metric("target_loss", target_loss(val_loss, target))
        mlflow.log_metrics({"tokens": tokens, "seconds": seconds,
                            "tokens_per_second": tokens / seconds})
    return {**result, "val_loss": val_loss, "train_loss": train_loss, "tokens": tokens,
            "seconds": seconds, "run_id": run.info.run_id, "reused": False}


def train_task(data_dir: str, task: dict, config, stage: str = "proxy") -> dict:
    """Train a task's mixtures one after another in this process (one pod on a cluster)."""
    data, tracking = TokenData.open(data_dir), task["tracking"]
    shape, recipe = config.proxy.model.resolve(), config.proxy.train
    target = config.regression.target_weights(data.domains)
    # A mixture may carry its own seed (the gate's seed replicas measure the noise).
    results = [train_proxy(data, m, shape, recipe, int(m.get("seed", config.seed)), tracking,
                           target, stage) for m in task["mixtures"]]
    return {"task": int(task["task"]), "results": results}


@component
def train_proxy_op(config: dict, task: dict, data: Input[dsl.Dataset], stage: str = "proxy") -> dict:
    """Train one proxy task's mixtures; returns `{task, results: [proxy result, ...]}`."""
    from components.config import parse_config
    from components.proxy import train_task

    return train_task(data.path, task, parse_config(config), stage)
