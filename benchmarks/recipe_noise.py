"""Seed noise against the spread between mixtures, per training recipe, on fresh mixtures.

Draws `--mixtures` mixtures from a config's sampler (a fixed draw, not the run's proxies, so a
recipe is judged on nothing a report compares), trains each with every `--recipe` on `--seeds`
seeds, and prints per recipe: the mixtures' mean target loss, the seed noise (the mean over
mixtures of the std over seeds), the spread between mixtures (the std of their means) and their
ratio, and seconds per run. A recipe whose noise is a large share of the spread makes the
regression learn seed luck and the gate's bound wide (issue #28, item 6).

    python benchmarks/recipe_noise.py                        # configs/evidence.yaml's proxy
    python benchmarks/recipe_noise.py --recipe 'b16={"tokens": 200000, "batch_size": 16, "lr": 0.01}' \
        --recipe 'b4={"tokens": 200000, "batch_size": 4, "lr": 0.005}'
    python benchmarks/recipe_noise.py --shape local-large --mixtures 2 --seeds 3 \
        --recipe 'b8={"tokens": 600000, "batch_size": 8, "lr": 0.005}'
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from regmix.config.loading import format_validation_error, load_config
from regmix.config.sections import TrainRecipe, target_loss
from regmix.config.shapes import SHAPES, ModelShape
from regmix.data.prepare import TokenData, data_settings, run_prepare_data
from regmix.mixtures import draw_mixtures
from regmix.pipelines.exits import in_one_line

DRAW_SEED = 20261207  # the mixtures' draw: fixed, and apart from every pipeline seed
FIRST_SEED = 101  # training seeds: apart from the pipeline's 0, 1, 2, ...


def train_one(data_dir: str, shape: ModelShape, recipe: TrainRecipe, weights: dict, seed: int,
              target: dict) -> tuple[float, float]:
    """One run in a worker process (one thread, as a pipeline task): its target loss, seconds."""
    import torch

    from regmix.train.loop import evaluate, train_lm

    torch.set_num_threads(1)
    data = TokenData.open(data_dir)
    started = time.perf_counter()
    model, *_ = train_lm(data, weights, shape, recipe, seed)
    return target_loss(evaluate(model, data), target), time.perf_counter() - started


def parsed_recipe(parser: argparse.ArgumentParser, name: str, text: str) -> TrainRecipe:
    """A `--recipe` checked here, not in a worker's traceback."""
    try:
        return TrainRecipe(**json.loads(text))
    except ValidationError as e:
        parser.error(format_validation_error(e, f"--recipe {name}"))
    except (ValueError, TypeError) as e:
        parser.error(f"--recipe {name}: not a JSON object ({e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" /
                                                 "evidence.yaml"))
    parser.add_argument("--shape", default=None, help="model shape (default: the proxy's)")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=JSON",
                        help="a recipe to measure (default: the config's proxy recipe)")
    parser.add_argument("--mixtures", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.mixtures, args.seeds) < 2:
        parser.error("--mixtures and --seeds must be at least 2 (a spread needs two)")
    config = load_config(args.config, [])
    shape = SHAPES[args.shape] if args.shape else config.proxy.model.resolve()
    recipes = {"config": config.proxy.train}
    if args.recipe:
        recipes = {name: parsed_recipe(parser, name, text)
                   for name, _, text in (r.partition("=") for r in args.recipe)}
    with tempfile.TemporaryDirectory() as folder:
        meta = run_prepare_data(data_settings(config), Path(folder))
        target = config.regression.target_weights(meta["domains"])
        draws = draw_mixtures(config, meta, args.mixtures, np.random.default_rng(DRAW_SEED))
        mixtures = [dict(zip(meta["domains"], map(float, row), strict=True)) for row in draws]
        seeds = range(FIRST_SEED, FIRST_SEED + args.seeds)
        with ProcessPoolExecutor(args.workers) as pool:
            runs = [pool.submit(train_one, folder, shape, recipe, mixture, seed, target)
                    for recipe in recipes.values() for mixture in mixtures for seed in seeds]
            # (recipe, mixture, seed, [target loss, seconds])
            measured = np.array([run.result() for run in runs]).reshape(
                len(recipes), len(mixtures), len(seeds), 2)
    results = {}
    for (name, recipe), (losses, seconds) in zip(recipes.items(), np.moveaxis(measured, -1, 1),
                                                 strict=True):
        noise, spread = float(losses.std(axis=1, ddof=1).mean()), float(losses.mean(axis=1).std(ddof=1))
        results[name] = {"recipe": recipe.model_dump(exclude_defaults=True),
                         "means": losses.mean(axis=1).round(4).tolist(),
                         "seed_noise": noise, "spread": spread, "ratio": noise / spread,
                         "seconds_per_run": float(seconds.mean())}
    if args.json:
        print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                          "shape": shape.to_dict(), "results": results}))
        return
    print(f"{args.shape or config.proxy.model.shape}, {len(mixtures)} mixtures x {args.seeds} "
          f"seeds ({platform.machine()}, {os.cpu_count()} CPUs)")
    for name, r in results.items():
        print(f"  {name:<12} target loss {r['means']}  seed noise {r['seed_noise']:.4f}  spread "
              f"{r['spread']:.4f}  ratio {r['ratio']:.2f}  {r['seconds_per_run']:.1f} s/run")


if __name__ == "__main__":
    sys.exit(in_one_line(main, "recipe_noise"))
