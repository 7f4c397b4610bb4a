"""Data preparation: throughput and peak memory as the corpus grows (real text from tinypile).

Writes a corpus of `--domains` domains of `--mb` MB each (tinypile's documents, repeated until
the size is reached), then runs `prepare_data` on it in a fresh process per size and prints
its wall time, tokens per second and peak resident memory. Preparation streams the documents,
so the peak should stay about flat as the corpus grows.

    python benchmarks/data_prep.py [--mb 25,100] [--domains 2] [--json]

With `--long-document-mb N` it instead prepares a corpus whose one domain holds a single N MB
one-line document beside normal ones (Python sources of the standard library, no network):
its peak should grow with a batch of text, not with that document.
"""

import argparse
import json
import platform
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import yaml

from regmix.data.tinypile.builder import build_tinypile

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Run in a child process, so that each size's peak memory is its own.
MEASURE = """
import json, sys, time
from pathlib import Path
from regmix.config.sections import CorpusConfig, TokenizerConfig
from regmix.data.prepare import prepare_data
spec, out = sys.argv[1:3]
started = time.perf_counter()
meta = prepare_data(CorpusConfig(spec=spec, validation_tokens=65536),
                    TokenizerConfig(vocab_size=4096), Path(out))
print(json.dumps({"seconds": time.perf_counter() - started,
                  "tokens": sum(t["train"] + t["validation"] for t in meta["tokens"].values()),
                  # its own peak: ru_maxrss would count the forked parent's memory too
                  "peak_rss_mb": int(Path("/proc/self/status").read_text()
                                     .split("VmHWM:")[1].split()[0]) / 1024}))
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


def write_long_document_corpus(folder: Path, megabytes: int) -> Path:
    """Two domains of the standard library's Python files, one document each, and in the
    first one more document: those files joined to `megabytes` MB, on one JSON line."""
    sources = [p.read_text(errors="replace") for p in sorted(STDLIB.rglob("*.py"))[:2000]]
    long_text, size = [], 0
    while size < megabytes * 1_000_000:
        for text in sources:
            long_text.append(text)
            size += len(text)
    halves = {"code": sources[::2], "more_code": sources[1::2]}
    halves["code"].append("".join(long_text)[: megabytes * 1_000_000])
    for name, texts in halves.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                      for t in texts if t.strip()))
    spec = folder / "corpus.yaml"
    spec.write_text(yaml.safe_dump({"name": "long", "domains": [
        {"name": name, "path": f"{name}.jsonl"} for name in halves]}))
    return spec


def measure(spec: Path, out: str) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE, str(spec), out],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="25,100", help="MB per domain, comma-separated sizes")
    parser.add_argument("--domains", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--long-document-mb", type=int, default=0,
                        help="measure one domain holding a document of this many MB instead")
    args = parser.parse_args()
    if args.long_document_mb:
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(write_long_document_corpus(Path(tmp), args.long_document_mb),
                          f"{tmp}/out")
        print(f"one {args.long_document_mb} MB document beside normal ones: "
              f"{row['tokens'] / 1e6:.1f} M tokens in {row['seconds']:.1f} s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        if args.json:
            print(json.dumps({"machine": platform.processor() or platform.machine(),
                              "long_document_mb": args.long_document_mb, **row}))
        return
    rows = []
    for megabytes in (int(m) for m in args.mb.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            spec = write_corpus(Path(tmp), args.domains, megabytes)
            row = {"mb_per_domain": megabytes, "domains": args.domains,
                   **measure(spec, f"{tmp}/out")}
        row["tokens_per_second"] = row["tokens"] / row["seconds"]
        rows.append(row)
        print(f"{megabytes:5d} MB x {args.domains} domains: {row['tokens'] / 1e6:7.1f} M tokens "
              f"in {row['seconds']:6.1f} s ({row['tokens_per_second'] / 1e6:.2f} M tokens/s), "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
