"""Gathering proxy results from MLflow: 1000 proxies x 17 domains (target: under 30 s).

Logs N proxy runs (weights as params, per-domain losses as metrics, the pipeline's names) into
a fresh SQLite store, then times `regmix.tracking.runs.proxy_runs`, which the regression stage
and `regmix export` use. Prints one line of numbers (and JSON with --json).

    python benchmarks/mlflow_gather.py [--proxies 1000] [--domains 17] [--json]
"""

import argparse
import json
import platform
import tempfile
import time

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag

from regmix.tracking.runs import HASH_TAG, STAGE_TAG, experiment_id, proxy_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--domains", type=int, default=17)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    domains = [f"domain_{i:02d}" for i in range(args.domains)]
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        exp = experiment_id(uri, "gather-bench")
        client = mlflow.MlflowClient(uri)
        started = time.perf_counter()
        for i, weights in enumerate(rng.dirichlet(np.full(args.domains, 0.5), args.proxies)):
            run = client.create_run(exp, run_name=f"proxy-m{i:04d}",
                                    tags={STAGE_TAG: "proxy", HASH_TAG: f"{i:016x}"})
            now = int(time.time() * 1000)
            client.log_batch(
                run.info.run_id,
                params=[Param(f"weight.{d}", str(round(w, 6))) for d, w in
                        zip(domains, weights, strict=True)] + [Param("mixture_id", f"m{i:04d}")],
                metrics=[Metric(f"val_loss.{d}", float(rng.normal(4, 0.3)), now, 0)
                         for d in domains],
                tags=[RunTag("mlflow.runName", f"proxy-m{i:04d}")],
            )
            client.set_terminated(run.info.run_id)
        logged = time.perf_counter() - started
        started = time.perf_counter()
        results = proxy_runs(uri, "gather-bench")
        gathered = time.perf_counter() - started
    assert len(results) == args.proxies and len(results[0]["val_loss"]) == args.domains
    record = {"proxies": args.proxies, "domains": args.domains, "gather_s": round(gathered, 2),
              "log_s": round(logged, 1), "machine": f"{platform.machine()}, "
              f"{__import__('os').cpu_count()} CPUs", "target_s": 30}
    print(json.dumps(record) if args.json else
          f"gathered {args.proxies} proxies x {args.domains} domains from MLflow (SQLite) in "
          f"{gathered:.2f} s (target < 30 s); logging them took {logged:.1f} s "
          f"[{record['machine']}]")


if __name__ == "__main__":
    main()
