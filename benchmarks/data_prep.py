"""Data preparation: throughput and peak memory as the corpus grows (real text from tinypile).

Writes a corpus of `--domains` domains of `--mb` MB each (tinypile's documents, repeated until
the size is reached), then runs `prepare_data` on it in a fresh process per size and prints
its wall time, tokens per second and peak resident memory. Preparation streams the documents,
so the peak should stay about flat as the corpus grows.

    python benchmarks/data_prep.py [--mb 25,100] [--domains 2] [--json]
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from regmix.data.tinypile.builder import build_tinypile

# Run in a child process, so that each size's peak memory is its own.
MEASURE = """
import json, resource, sys, time
from pathlib import Path
from regmix.config.sections import CorpusConfig, TokenizerConfig
from regmix.data.prepare import prepare_data
spec, out = sys.argv[1:3]
started = time.perf_counter()
meta = prepare_data(CorpusConfig(spec=spec, validation_tokens=65536),
                    TokenizerConfig(vocab_size=4096), Path(out))
print(json.dumps({"seconds": time.perf_counter() - started,
                  "tokens": sum(t["train"] + t["validation"] for t in meta["tokens"].values()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_corpus(folder: Path, domains: int, megabytes: int) -> Path:
    """`domains` JSON-lines files of about `megabytes` MB each, cycling tinypile's documents."""
    source = build_tinypile(tiny=False).parent
    files = sorted(source.glob("*.jsonl"))[:domains]
    entries = []
    for i, path in enumerate(files):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        target, written = megabytes * 1_000_000, 0
        with (folder / path.name).open("w") as out:
            while written < target:
                for line in lines:
                    out.write(line + "\n")
                    written += len(line) + 1
                    if written >= target:
                        break
        entries.append({"name": f"d{i}", "path": path.name})
    spec = folder / "corpus.yaml"
    spec.write_text(yaml.safe_dump({"name": "bench", "domains": entries}))
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="25,100", help="MB per domain, comma-separated sizes")
    parser.add_argument("--domains", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for megabytes in (int(m) for m in args.mb.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            spec = write_corpus(Path(tmp), args.domains, megabytes)
            run = subprocess.run([sys.executable, "-c", MEASURE, str(spec), f"{tmp}/out"],
                                 capture_output=True, text=True, check=True)
            row = {"mb_per_domain": megabytes, "domains": args.domains,
                   **json.loads(run.stdout.splitlines()[-1])}
        row["tokens_per_second"] = row["tokens"] / row["seconds"]
        rows.append(row)
        print(f"{megabytes:5d} MB x {args.domains} domains: {row['tokens'] / 1e6:7.1f} M tokens "
              f"in {row['seconds']:6.1f} s ({row['tokens_per_second'] / 1e6:.2f} M tokens/s), "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
