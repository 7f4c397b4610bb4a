"""The evidence in one command: run configs/evidence.yaml and print the numbers.

Gate Spearman on fresh proxies (with its bootstrap interval), the chosen mixture against the
natural (token prior), uniform and best-proxy mixtures at proxy size in the gate and at the
larger size, over paired seeds, and the rank-invariance Spearman proxy -> ~12x larger model.
Long (about an hour on 2 cores from nothing, estimated from docs/evidence.md's runs; 1973 s
with the runs of its 5 and 3 seeds reused): run it on a quiet machine.

    python benchmarks/evidence.py [--config configs/evidence.yaml] [--json]
    python benchmarks/evidence.py --set regression.target=mean --set rank_check.mixtures=0

`--set section.key=value` (a YAML value) changes one setting; the experiment stays the same,
so proxies and larger-model runs already in it are reused by content hash.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from regmix.config.loading import load_config
from regmix.evidence import verdict
from regmix.pipelines.exits import in_one_line
from regmix.pipelines.local import run_local
from regmix.report import load_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" /
                                                 "evidence.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. regression.target=mean")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    summary = run_local(config)
    uri = summary["mlflow"]["tracking_uri"]
    record = load_record(uri, config.name, summary["pipeline_run"])
    gate = record.artifacts.get("gate.json", {})
    evidence = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "wall_seconds": summary["wall_seconds"],
        "cv_spearman": summary["cv_spearman"],
        "gate_spearman": gate.get("spearman"),
        "gate_interval": [gate.get("spearman_low"), gate.get("spearman_high")],
        "gate_passed": summary["gate_passed"], "gate_reason": summary["gate_reason"],
        "gate_baselines": summary["gate_baselines"], "evidence": summary["evidence"],
        "large": record.artifacts.get("baselines.json"),
        "rank_invariance": (record.artifacts.get("rank_invariance.json") or {}).get("spearman"),
        "pipeline_run": summary["pipeline_run"],
        "overrides": args.set,
    }
    if args.json:
        print(json.dumps(evidence))
        return
    print(f"evidence run {evidence['pipeline_run']} ({evidence['machine']}, "
          f"{evidence['wall_seconds']:.0f} s)")
    print(f"  regression CV Spearman {evidence['cv_spearman']:.3f}")
    print(f"  gate Spearman {evidence['gate_spearman']:.3f} interval "
          f"{evidence['gate_interval']} -> {'passed' if evidence['gate_passed'] else 'failed'}: "
          f"{evidence['gate_reason']}")
    for name, s in sorted(gate.get("baselines", {}).items()):
        print(f"  gate proxies on {name:<11} {s['mean']:.4f} ({s['seeds']} seeds)  {verdict(s)}")
    for name, s in sorted((evidence["large"] or {}).items(), key=lambda kv: kv[1]["mean"]):
        against = "" if name == "chosen" else f"  {verdict(s)}"
        print(f"  large on {name:<11} {s['mean']:.4f} +- {s['std']:.4f} ({s['seeds']} seeds)"
              f"{against}")
    if evidence["rank_invariance"] is not None:
        print(f"  rank invariance proxy -> larger: Spearman {evidence['rank_invariance']:.3f}")


if __name__ == "__main__":
    sys.exit(in_one_line(main, "evidence"))
