"""The training loop every LM here runs through (proxies, packs of proxies, larger runs),
with `accelerate`."""

import ctypes
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from regmix.config.sections import TrainRecipe
from regmix.config.shapes import ModelShape
from regmix.data.prepare import TokenData
from regmix.files import damage, write_checksums
from regmix.train.model import LM, missing_compiler
from regmix.train.packed import PackedLM

log = logging.getLogger("regmix.train")


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
    """Write the training state to `folder/step-N` atomically, then drop older checkpoints.
    One that cannot be written (a full disk) is skipped: it only saves a retry some time."""
    from accelerate.utils import gather_object
    from safetensors import SafetensorError

    final = folder / f"step-{step:09d}"
    partial = folder / f".{final.name}.partial"
    problem = None
    try:
        accelerator.save_state(str(partial))  # every rank: FSDP gathers, each rank its RNG
    except (OSError, SafetensorError) as e:
        problem = e
    problem = next((e for e in gather_object([problem]) if e is not None), None)  # all ranks
    if accelerator.is_main_process and problem is None:
        try:
            write_checksums(partial)  # a checkpoint damaged later is found before it is loaded
            os.replace(partial, final)  # a checkpoint folder exists whole or not at all
            for old in folder.iterdir():
                if old != final:
                    shutil.rmtree(old)
        except OSError as e:
            problem = e
    if accelerator.is_main_process and problem is not None:
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("checkpoint %s not written (%s); training goes on without it", final, problem)
    accelerator.wait_for_everyone()


def latest_checkpoint(accelerator, folder: Path | None) -> Path | None:
    """The newest whole checkpoint in `folder`; a damaged one (a truncated file, a disk that
    filled) is reported, removed, and training starts from the previous one or the start."""
    found = sorted(folder.glob("step-*")) if folder is not None and folder.is_dir() else []
    for checkpoint in reversed(found):
        if (problem := damage(checkpoint)) is None:
            return checkpoint
        log.warning("checkpoint %s is damaged (%s); removed, training without it",
                    checkpoint, problem)
        accelerator.wait_for_everyone()  # every rank has read it before it goes
        if accelerator.is_main_process:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


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
    if (checkpoint := latest_checkpoint(accelerator, checkpoint_dir)) is not None:
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
    for domain in data.validation_domains:
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


def limit_cpu_threads(threads: int | None) -> None:
    """Cap torch's CPU threads for this process (config `cpu_threads`; None leaves torch's)."""
    if threads:
        torch.set_num_threads(threads)
