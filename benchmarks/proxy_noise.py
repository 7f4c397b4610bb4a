"""Proxy seed noise against the spread between mixtures, from a finished run in MLflow.

The gate retrains the chosen, best-proxy and baseline mixtures on the same fresh seeds: their
per-mixture standard deviation over seeds is the proxies' seed noise. The training proxies'
target losses spread over the mixtures. If the noise is a large share of the spread, the
regression learns seed luck, not mixtures.

    python benchmarks/proxy_noise.py [--tracking-uri URI] [--experiment regmix-local] [--run LABEL]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np

from regmix.tracking.runs import default_tracking_uri, latest_run, runs_by_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="regmix-local")
    parser.add_argument("--run", default=None, help="pipeline run label (default: the latest)")
    args = parser.parse_args()
    client = mlflow.MlflowClient(args.tracking_uri or default_tracking_uri())
    experiment = client.get_experiment_by_name(args.experiment)
    label = args.run or latest_run(client.search_runs(
        [experiment.experiment_id], "tags.`regmix.stage` = 'pipeline'")).data.tags[
        "regmix.pipeline_run"]
    by_stage = runs_by_stage(client, experiment.experiment_id, label)
    # Reused proxies log no run in this pipeline run: read every proxy of the experiment
    proxies = client.search_runs([experiment.experiment_id], "tags.`regmix.stage` = 'proxy'",
                                 max_results=10_000)
    between = np.std([r.data.metrics["target_loss"] for r in proxies
                      if "target_loss" in r.data.metrics], ddof=1)
    gate = latest_run(by_stage.get("gate"))
    decision = json.loads(Path(client.download_artifacts(gate.info.run_id, "gate.json")).read_text())
    replicas = defaultdict(list)
    for name, loss in decision["measured"].items():
        if "@seed" in name:
            replicas[name.split("@")[0]].append(loss)
    noise = {name: float(np.std(losses, ddof=1)) for name, losses in replicas.items()}
    print(f"run {label}: {len(proxies)} training proxies")
    print(f"  spread between mixtures (std of target loss): {between:.4f}")
    for name, sd in sorted(noise.items()):
        print(f"  seed noise of {name:<10} (std over {len(replicas[name])} seeds): {sd:.4f} "
              f"= {sd / between:.1%} of the spread")


if __name__ == "__main__":
    main()
