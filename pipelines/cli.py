"""The `regmix` command line.

User mistakes (bad config, corpus or CSV) exit with code 2 and one message naming the field and
the fix; they never surface as a traceback.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from components.config import ConfigError, RegMixConfig, load_config
from components.data import CorpusError

USER_ERRORS = (ConfigError, CorpusError)


def checked_config(path: str) -> RegMixConfig:
    """Load a config and check it against its corpus's domains before any work starts."""
    from components.data import resolve_domains

    config = load_config(path)
    domains, _ = resolve_domains(config.corpus)
    config.check_domains([d.name for d in domains])
    return config


def cmd_run(args) -> int:
    from pipelines.local import PipelineFailed, run_local

    config = checked_config(args.config)
    try:
        summary = run_local(config, args.tracking_uri)
    except PipelineFailed as e:
        print(f"regmix: {e}", file=sys.stderr)
        return 1
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    mixture = "\n".join(f"    {d:<20} {w:.4f}" for d, w in
                        sorted(s["chosen_mixture"].items(), key=lambda kv: -kv[1]))
    gate = "PASSED" if s["gate_passed"] else "FAILED"
    large = ("" if s["large_target_loss"] is None
             else f"\n  large model target loss: {s['large_target_loss']:.4f}")
    mlflow = s["mlflow"]
    return (
        f"RegMix run {s['pipeline_run']} finished in {s['wall_seconds']:.0f} s\n"
        f"  chosen mixture (predicted target loss {s['predicted_loss']:.4f}):\n{mixture}\n"
        f"  regression CV Spearman: {s['cv_spearman']:.3f}\n"
        f"  gate Spearman on fresh proxies: {s['gate_spearman']:.3f} -> {gate} "
        f"({s['gate_reason']}){large}\n"
        f"  proxies trained: {s['proxies_trained']}, reused: {s['proxies_reused']}\n"
        f"  MLflow: {mlflow['tracking_uri']} experiment '{mlflow['experiment']}' "
        f"(id {mlflow['experiment_id']}), parent run {mlflow['parent_run_id']}\n"
        f"  see it: mlflow ui --backend-store-uri {mlflow['tracking_uri']}"
    )


def cmd_compile(args) -> int:
    from kfp import compiler

    from pipelines.pipeline import build_pipeline

    config = load_config(args.config)
    compiler.Compiler().compile(build_pipeline(config), str(args.out))
    print(f"wrote {args.out}")
    return 0


def cmd_corpus_build(args) -> int:
    from components.tinypile import build_tinypile

    spec = build_tinypile(Path(args.out) if args.out else None, tiny=args.tiny, force=args.force)
    manifest = json.loads((spec.parent / "manifest.json").read_text())
    for d in manifest["domains"]:
        print(f"  {d['name']:<20} {d['bytes'] / 1e6:6.2f} MB  {d['license']}")
    print(f"corpus spec: {spec}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regmix", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline locally through kfp.local")
    run.add_argument("--config", required=True, help="a run config YAML (see configs/)")
    run.add_argument("--summary-json", help="also write the run summary to this JSON file")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                     "or sqlite:///mlruns/mlflow.db)")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compile", help="compile the pipeline to KFP YAML")
    comp.add_argument("--config", required=True)
    comp.add_argument("--out", required=True, type=Path)
    comp.set_defaults(func=cmd_compile)

    corpus = sub.add_parser("corpus", help="corpus tools").add_subparsers(dest="action",
                                                                          required=True)
    build = corpus.add_parser("build", help="build the tinypile demo corpus (cached)")
    build.add_argument("--tiny", action="store_true", help="about 1 MB per domain")
    build.add_argument("--out", help="output folder (default: ~/.cache/regmix/tinypile)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=cmd_corpus_build)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"regmix: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
