"""A finished evidence run's paired comparisons on some of its seeds: a replication's new ones.

A run whose seeds were raised after looking at its first ones (session 23 in docs/evidence.md)
can be judged on the seeds nobody saw before the decision: the same one-sided paired t bound
as the gate's and the larger size's, on the gate seeds from --gate-from and the larger seeds
from --large-from. Reads the run's gate.json and baselines.json from MLflow.

    python benchmarks/seed_subset.py RUN --gate-from 11 --large-from 10 [--config ...] [--json]
"""

import argparse
import json
import sys
from pathlib import Path

from regmix.config.loading import load_config
from regmix.errors import UserError
from regmix.evidence import against, verdict
from regmix.gate import compare_baselines, replica_seeds_measured
from regmix.pipelines.exits import in_one_line
from regmix.report import load_record
from regmix.tracking.runs import checked_tracking_uri, default_tracking_uri


def from_seed(losses: dict, first: int) -> dict[int, float]:
    return {int(s): v for s, v in losses.items() if int(s) >= first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the pipeline run's label (`regmix runs`, or evidence.py's)")
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" /
                                                 "evidence.yaml"))
    parser.add_argument("--gate-from", type=int, default=1, help="first gate seed to count")
    parser.add_argument("--large-from", type=int, default=0, help="first larger seed to count")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config, [])
    uri = checked_tracking_uri(config.tracking.uri or default_tracking_uri(), existing=True)
    record = load_record(uri, config.name, args.run)
    gate, large = record.artifacts.get("gate.json"), record.artifacts.get("baselines.json")
    if not gate or not large or "losses" not in large.get("chosen", {}):
        raise UserError(f"run {args.run}: no gate.json and baselines.json with per-seed losses "
                          f"in experiment {config.name}; give a finished evidence run's label")
    chosen = from_seed(large["chosen"]["losses"], args.large_from)
    sizes = {
        "gate": compare_baselines(gate["measured"],
                                  replica_seeds_measured(gate["measured"], args.gate_from),
                                  list(gate["baselines"])),
        "larger": {name: against(chosen, from_seed(s["losses"], args.large_from))
                   for name, s in large.items() if name != "chosen"},
    }
    if args.json:
        print(json.dumps(sizes))
        return
    for size, stats in sizes.items():
        first = args.gate_from if size == "gate" else args.large_from
        print(f"{size}, seeds from {first}:")
        for name, s in sorted(stats.items()):
            print(f"  {name:<11} {s['mean']:.4f} ({s['seeds']} seeds)  {verdict(s)}")


if __name__ == "__main__":
    sys.exit(in_one_line(main, "seed_subset"))
