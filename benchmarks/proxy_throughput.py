"""Proxy-training throughput: our trainer vs Hugging Face transformers, MFU, memory, packing.

Trains one shape on synthetic tokens (throughput does not depend on the text) with
  regmix             `regmix.train.loop.train_lm`, the pipeline's trainer, end to end;
  hf                 transformers' `LlamaForCausalLM` of the same shape in a plain PyTorch loop
                     (AdamW, cross-entropy on the logits, clipping; bf16 autocast on GPU);
  regmix-packed-G    `train_packed`: G proxies at once as one batched model (tokens/s of all G);
  regmix-compile     with `--compile`: `train_lm` with `torch.compile` (compiled in the warm-up);
  regmix-compile-head  with `--compile`: the same with the output layer and loss traced into
                     the compiled graph too (`head_loss` keeps out of it: see its comment), to
                     check that choice where it was not measured;
  regmix-eager-softmax  on GPU: `train_lm` with the output layer's softmax left uncompiled, to
                     show what compiling it (the default on CUDA) gains;
and reports tokens/s, MFU (model FLOP/s over the peak matmul FLOP/s measured here on the same
device) and peak memory (CUDA: allocated; CPU: the measuring process's peak RSS). Each
measurement runs in a fresh process after an untimed warm-up, so none inherits another's
memory; the best of `--repeats` counts.

    python benchmarks/proxy_throughput.py                     # CPU, local-proxy shape
    python benchmarks/proxy_throughput.py --quick --json      # < 3 minutes on 2 cores
    python benchmarks/proxy_throughput.py --device cuda       # proxy-1m, 50,432 tokens, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

import regmix.train.model
from regmix.config.sections import TrainRecipe
from regmix.config.shapes import SHAPES
from regmix.data.prepare import TokenData
from regmix.train.loop import MixtureBatches, lr_at, train_lm, train_packed
from regmix.train.model import LM


def synthetic_data(folder: Path, vocab: int, domains: int = 4, tokens: int = 1 << 20) -> Path:
    """A prepared-data folder (the `TokenData` layout) of uniformly random tokens."""
    rng = np.random.default_rng(0)
    names = [f"d{i}" for i in range(domains)]
    for split, size in (("train", tokens), ("validation", 8192)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            np.save(folder / split / f"{name}.npy", rng.integers(0, vocab, size, dtype=np.uint32))
    counts = {n: {"train": tokens, "validation": 8192} for n in names}
    (folder / "meta.json").write_text(json.dumps(
        {"domains": names, "tokens": counts, "vocab_size": vocab, "eos_id": 0, "dtype": "uint32",
         "fingerprint": "synthetic"}))
    return folder


def peak_matmul_flops(device: str) -> float:
    """The best FLOP/s of a large square matmul in the training dtype (fp32 CPU, bf16 GPU)."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        for _ in range(10 if device == "cuda" else 2):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / (10 if device == "cuda" else 2))
    return 2 * n**3 / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hf_train(data: TokenData, weights: dict, shape, recipe: TrainRecipe, device: str) -> float:
    """transformers' Llama of the same shape in the plain PyTorch training loop; its seconds."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = -(-data.vocab_size // 64) * 64  # the same padded output layer as ours
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=shape.n_embd, intermediate_size=shape.mlp_hidden,
        num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv_head or shape.n_head, max_position_embeddings=shape.context,
        rms_norm_eps=1e-5, rope_theta=shape.rope_base, tie_word_embeddings=False,
        attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas,
                                  weight_decay=recipe.weight_decay)
    batches = MixtureBatches(data, weights, shape.context, seed=0)
    steps = recipe.tokens // (recipe.batch_size * shape.context)
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, recipe)
        x, y = (t.to(device) for t in batches.next(recipe.batch_size))
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - start


def packs_of(impl: str) -> int:
    """How many proxies a measurement trains at once: G for `regmix-packed-G`, else 1."""
    return int(impl.rsplit("-", 1)[1]) if impl.startswith("regmix-packed") else 1


def trainer(impl: str, data_dir: str, shape_name: str, device: str, batch: int):
    """`run(steps)`: train `impl` for `steps` steps in this process; the steps' seconds.

    Only the training steps count (each trainer's own clock, which stops after a sync): building
    and initialising the models on the host, G times over when packed, is no part of a step.
    """
    if impl == "regmix-eager-softmax":
        regmix.train.model.compiled_loss_and_grad = lambda: regmix.train.model.softmax_loss_and_grad
    if impl == "regmix-compile-head":
        regmix.train.model.head_loss = regmix.train.model.head_loss.__wrapped__  # un-disabled
    data, shape = TokenData.open(data_dir), SHAPES[shape_name]
    weights = {d: 1 / len(data.domains) for d in data.domains}
    packs = packs_of(impl)

    def run(steps: int) -> float:
        recipe = TrainRecipe(tokens=steps * batch * shape.context, batch_size=batch,
                             mixed_precision="bf16" if device == "cuda" else "no",
                             checkpoint_every=0, log_every=10**9,
                             compile=impl.startswith("regmix-compile"))
        if impl == "hf":
            return hf_train(data, weights, shape, recipe, device)
        if not impl.startswith("regmix-packed"):
            return train_lm(data, weights, shape, recipe, seed=0)[3]
        return train_packed(data, [weights] * packs, shape, recipe, seeds=list(range(packs)))[3]

    return run


def measure(impl: str, data_dir: str, shape_name: str, device: str, batch: int, steps: int,
            threads: int | None) -> dict:
    """One measurement in this (fresh) process: an untimed warm-up, then the timed run."""
    if threads:
        torch.set_num_threads(threads)
    run = trainer(impl, data_dir, shape_name, device, batch)
    run(2)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = run(steps)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    tokens = packs_of(impl) * steps * batch * SHAPES[shape_name].context
    return {"tokens_per_s": tokens / seconds, "peak_mem_mb": round(peak / 2**20, 1),
            "seconds": round(seconds, 2)}


def profile(data_dir: str, shape_name: str, device: str, batch: int, steps: int) -> str:
    """Where `train_lm`'s time goes: torch.profiler's top operators over `steps` steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    run = trainer("regmix", data_dir, shape_name, device, batch)
    run(2)  # compiles, and warms the allocator
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profiler(activities=activities) as prof:
        run(steps)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)


def report(best: dict[str, dict], rounds: list[dict[str, float]], packs: list[int], shape: str,
           vocab: int, batch: int, device_name: str, flops_per_token: float, peak: float,
           as_json: bool) -> None:
    """The best of each implementation: a table (or JSON lines) and the ratios that matter."""
    rows = [{"impl": impl, "shape": shape, "vocab": vocab, "device": device_name,
             "tokens_per_s": round(r["tokens_per_s"]), "mfu": round(r["tokens_per_s"] *
             flops_per_token / peak, 4), "peak_mem_mb": r["peak_mem_mb"]}
            for impl, r in best.items()]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{shape} (vocab {vocab}, batch {batch}) on {device_name}; peak matmul "
          f"{peak / 1e9:.0f} GFLOP/s; {flops_per_token / 1e6:.2f} MFLOP per token")
    print(f"{'impl':<20} {'tokens/s':>10} {'MFU':>7} {'peak MB':>9}")
    for row in rows:
        print(f"{row['impl']:<20} {row['tokens_per_s']:>10} {row['mfu']:>7.1%} "
              f"{row['peak_mem_mb']:>9}")
    if "regmix" not in best:
        return
    ours = best["regmix"]["tokens_per_s"]
    if "hf" in best:
        # On a shared (virtual) machine the speed of both drifts with the neighbours' load; the
        # ratio within a round, whose runs are adjacent in time, shows how much is noise.
        paired = sorted(r["regmix"] / r["hf"] for r in rounds if {"regmix", "hf"} <= r.keys())
        print(f"regmix / hf: {ours / best['hf']['tokens_per_s']:.2f}x (best of each); within a "
              f"round: median {paired[len(paired) // 2]:.2f}x, range {paired[0]:.2f}-{paired[-1]:.2f}x")
    ratios = {f"packed G={g} / unpacked": best.get(f"regmix-packed-{g}") for g in packs}
    ratios["compiled / eager"] = best.get("regmix-compile")
    ratios["compiled, head traced too / eager"] = best.get("regmix-compile-head")
    for label, result in ratios.items():
        if result:
            print(f"{label}: {result['tokens_per_s'] / ours:.2f}x")
    if "regmix-eager-softmax" in best:
        print(f"compiled softmax / eager: {ours / best['regmix-eager-softmax']['tokens_per_s']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--shape", help="a name from regmix/config/shapes.py (default: local-proxy on "
                   "CPU, proxy-1m on GPU)")
    p.add_argument("--vocab", type=int, help="default: 2048 on CPU, 50432 (the paper's) on GPU")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 40; quick 8)")
    p.add_argument("--packs", default="1,4,16", help="G values for packed training")
    p.add_argument("--repeats", type=int, help="best of this many (default 3; quick 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also measure regmix with torch.compile")
    p.add_argument("--quick", action="store_true", help="fewer steps; under 3 minutes on 2 cores")
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    p.add_argument("--profile", action="store_true",
                   help="also print where regmix's step time goes (torch.profiler's top operators)")
    args = p.parse_args()
    gpu = args.device == "cuda"
    shape = args.shape or ("proxy-1m" if gpu else "local-proxy")
    vocab = args.vocab or (50432 if gpu else 2048)
    steps = args.steps or (8 if args.quick else 40)
    repeats = args.repeats or (2 if args.quick else 3)
    packs = [int(g) for g in args.packs.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = peak_matmul_flops(args.device)
    flops_per_token = LM(SHAPES[shape], vocab).flops_per_token()
    device_name = torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}"
    impls = ["regmix", "hf"] + [f"regmix-packed-{g}" for g in packs]
    impls += ["regmix-compile", "regmix-compile-head"] if args.compile else []
    impls += ["regmix-eager-softmax"] if gpu else []
    with tempfile.TemporaryDirectory() as folder:
        data_dir = str(synthetic_data(Path(folder), vocab))
        best: dict[str, dict] = {}
        rounds: list[dict[str, float]] = []  # tokens/s per implementation, one dict per round
        # Fresh process per measurement (a pool of its own, so that a crash cannot break the
        # next); rounds interleave implementations so that a burst of load on a shared machine
        # does not favour one of them.
        for _ in range(repeats):
            rounds.append({})
            for impl in impls:
                # Packed runs do G times the work per step; fewer steps keep them short.
                n = max(2, steps // g) if (g := packs_of(impl)) > 1 else steps
                try:
                    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                        result = pool.submit(measure, impl, data_dir, shape, args.device,
                                             args.batch, n, args.threads).result()
                except Exception as error:  # out of memory, say: the other measurements stand
                    print(f"{impl}: failed: {type(error).__name__}: {error}"[:300], file=sys.stderr)
                    continue
                rounds[-1][impl] = result["tokens_per_s"]
                # as it goes, so that a run cut short still tells what it measured
                print(f"{impl}: {result['tokens_per_s']:.0f} tokens/s, {result['peak_mem_mb']} MB",
                      file=sys.stderr, flush=True)
                if impl not in best or result["tokens_per_s"] > best[impl]["tokens_per_s"]:
                    best[impl] = result
        # The numbers first: the profile is the part a time limit cuts short.
        report(best, rounds, packs, shape, vocab, args.batch, device_name, flops_per_token, peak,
               args.json)
        if args.profile:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                print(pool.submit(profile, data_dir, shape, args.device, args.batch,
                                  min(steps, 10)).result(), file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
