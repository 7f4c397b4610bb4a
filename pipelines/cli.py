"""The `regmix` command line.

User mistakes (bad config, corpus or CSV) exit with code 2 and one message naming the field and
the fix; they never surface as a traceback.
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from regmix.config.loading import load_config
from regmix.config.schema import RegMixConfig
from regmix.data.corpus import domain_roles, preflight
from regmix.data.tinypile.builder import build_tinypile
from regmix.data.tinypile.sources import DOMAINS as TINYPILE_DOMAINS
from regmix.errors import ConfigError
from regmix.files import write_text
from regmix.pipelines import byo, kfp_api, mlflow_server
from regmix.pipelines.exits import in_one_line
from regmix.pipelines.image import build_image, local_image
from regmix.pipelines.interrupt import Interrupted
from regmix.pipelines.kfp_api import compile_package
from regmix.pipelines.local import PipelineFailed, run_local
from regmix.report import build_report
from regmix.tracking.outcome import comparison
from regmix.tracking.runs import (
    LOCAL_UI,
    checked_tracking_uri,
    default_tracking_uri,
    served_ui,
)


def checked_config(path: str) -> RegMixConfig:
    """Load a config and check it against its corpus's domains before any work starts."""
    config = load_config(path)
    config.check_domains(*preflight(config.corpus, config.tokenizer))
    return config


def with_listed_domains_checked(config: RegMixConfig) -> RegMixConfig:
    """Check the config's domain names where the config alone tells the corpus's domains: listed
    inline, or tinypile's fixed set (a corpus spec is read only where the data is prepared)."""
    corpus = config.corpus
    if corpus.domains is not None:
        config.check_domains(*domain_roles(corpus, corpus.domains))
    elif corpus.tinypile is not None:
        config.check_domains(*corpus.roles([d.name for d in TINYPILE_DOMAINS]))
    return config


def cluster_config(path: str, cache_data: bool = True) -> RegMixConfig:
    """Load a config for a cluster run and check what can be checked from here: domain names
    when the corpus lists them, and an MLflow every pod shares. `cache_data=False` (--no-cache)
    overrides `cluster.cache_data`. (kfp.Client's own enable_caching would not reach the data
    preparation: it sets only the outermost DAG's tasks, and ours runs inside the exit handler.)"""
    config = with_listed_domains_checked(load_config(path))
    if not cache_data:
        cluster = config.cluster.model_copy(update={"cache_data": False})
        config = config.model_copy(update={"cluster": cluster})
    if problem := shared_mlflow_missing(config):
        raise ConfigError(problem)
    if problem := retries_without_volume(config):
        print(f"warning: {problem}", file=sys.stderr)
    return config


def shared_mlflow_missing(config: RegMixConfig) -> str | None:
    """Why the pods would not share one MLflow, if they would not: each pod's own SQLite would
    scatter the runs, and the stages after the proxies would find none."""
    uri = config.tracking.uri
    if not config.cluster.mlflow_secret and (uri is None or uri.startswith(("sqlite:", "file:"))):
        return ("cluster.mlflow_secret: the pods need one shared MLflow server; name a Secret "
                "holding MLFLOW_TRACKING_URI (k8s/ makes regmix-mlflow-client) or set "
                "tracking.uri to an http(s) server")
    return None


def retries_without_volume(config: RegMixConfig) -> str | None:
    """Why a retried task would start over, if it would: kept results and checkpoints live on
    the pod's own disk unless a volume holds them."""
    if config.cluster.retries and config.cluster.volume is None:
        return ("cluster.retries: without cluster.volume a retried pod starts on an empty disk: "
                "it retrains from scratch and loses proxies MLflow did not yet take; set "
                "cluster.volume (docs/deploy.md)")
    return None


def cmd_run(args) -> int:

    config = checked_config(args.config)
    if args.runner:
        config = config.model_copy(update={"runner": args.runner})
    try:
        summary = run_local(config, args.tracking_uri, image=args.image, verbose=args.verbose)
    except PipelineFailed as e:
        print(f"regmix: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"regmix: {e}", file=sys.stderr)
        return e.exit_code
    if args.summary_json:
        write_text(args.summary_json, json.dumps(summary, indent=2))
    print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    mixture = "\n".join(f"    {d:<20} {w:.4f}" for d, w in
                        sorted(s["chosen_mixture"].items(), key=lambda kv: -kv[1]))
    gate = "PASSED" if s["gate_passed"] else "FAILED"
    large = ("" if s["large_target_loss"] is None
             else f"\n  large model target loss: {s['large_target_loss']:.4f}")
    against = "".join(
        f"\n    {name:<12} {b['mean']:.4f}  {comparison(b)}" for name, b in s["gate_baselines"].items())
    if against:
        against = "\n  gate: chosen vs baselines at proxy size (target loss, paired seeds):" + against
    evidence = "".join(
        f"\n    {name:<12} {b['mean']:.4f}  {comparison(b)}" for name, b in s["evidence"].items())
    if evidence:
        evidence = (f"\n  larger size: chosen {s['large_target_loss']:.4f} vs baselines (target "
                    f"loss, paired seeds):{evidence}")
    mlflow = s["mlflow"]
    return (
        f"RegMix run {s['pipeline_run']} finished in {s['wall_seconds']:.0f} s\n"
        f"  chosen mixture (predicted target loss {s['predicted_loss']:.4f}):\n{mixture}\n"
        f"  regression CV Spearman: {s['cv_spearman']:.3f}\n"
        f"  gate Spearman on fresh proxies: {s['gate_spearman']:.3f} -> {gate} "
        f"({s['gate_reason']}){against}{large}{evidence}\n"
        f"  proxies trained: {s['proxies_trained']}, reused: {s['proxies_reused']} "
        f"(trained per stage: {', '.join(f'{k} {v}' for k, v in s['trained'].items())})\n"
        f"  MLflow: {mlflow['tracking_uri']} experiment '{mlflow['experiment']}' "
        f"(id {mlflow['experiment_id']}), parent run {mlflow['parent_run_id']}\n"
        f"  see it: {experiment_page(mlflow['tracking_uri'], mlflow['experiment_id'])}"
    )


def experiment_page(tracking_uri: str, experiment_id: str) -> str:
    """How to open the experiment on its runs table: MLflow 3's UI opens on its GenAI overview
    unless the address asks for the machine-learning view."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if served := served_ui(tracking_uri):
        return f"{served}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000, then {LOCAL_UI}/{page}"


def cmd_report(args) -> int:

    uri = checked_tracking_uri(args.tracking_uri or default_tracking_uri(), existing=True)
    html = build_report(uri, args.experiment, args.run, Path(args.out or f"report-{args.run}"))
    print(f"wrote {html} and {html.with_name('report.md')} (also logged to MLflow)")
    return 0


def cmd_compile(args) -> int:

    config = with_listed_domains_checked(load_config(args.config))
    compile_package(config, args.out)
    print(f"wrote {args.out}")
    # Fine for reading the YAML, not for a cluster
    for problem in (shared_mlflow_missing(config), retries_without_volume(config)):
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
    return 0


def cmd_submit(args) -> int:

    config = cluster_config(args.config, cache_data=not args.no_cache)
    with tempfile.TemporaryDirectory() as tmp, kfp_api.answering(args.host):
        package = kfp_api.compile_package(config, Path(tmp) / "pipeline.yaml")
        client = kfp_api.connect(args.host)
        run_id = kfp_api.submit(client, config, package, args.namespace, args.experiment,
                                args.run_name)
    print(f"run {run_id}: {kfp_api.ui_url(args.host, f'runs/details/{run_id}')}")
    return 0


def cmd_schedule(args) -> int:

    kfp_api.check_cron(args.cron)  # before any work: a 5-field crontab line is a common slip
    config = cluster_config(args.config, cache_data=not args.no_cache)
    with tempfile.TemporaryDirectory() as tmp, kfp_api.answering(args.host):
        package = kfp_api.compile_package(config, Path(tmp) / "pipeline.yaml")
        client = kfp_api.connect(args.host)
        recurring_id = kfp_api.schedule(client, config, package, args.cron, args.namespace,
                                        args.experiment, args.name)
    print(f"recurring run {recurring_id} ({args.cron}): "
          f"{kfp_api.ui_url(args.host, f'recurringrun/details/{recurring_id}')}")
    return 0


def cmd_runs(args) -> int:

    with kfp_api.answering(args.host):
        client = kfp_api.connect(args.host)
        runs = kfp_api.list_runs(client, args.namespace, args.limit)
    for r in runs:
        print(f"{r['created_at']:<26} {r['state'] or '':<10} {r['id']}  {r['name']}")
    return 0


def cmd_corpus_build(args) -> int:

    spec = build_tinypile(Path(args.out) if args.out else None, tiny=args.tiny, force=args.force)
    manifest = json.loads((spec.parent / "manifest.json").read_text())
    for d in manifest["domains"]:
        print(f"  {d['name']:<20} {d['bytes'] / 1e6:6.2f} MB  {d['license']}")
    print(f"corpus spec: {spec}")
    return 0


def cmd_image_build(args) -> int:
    print(build_image(gpu=args.gpu, tag=args.tag, base=args.base, torch_wheels=args.torch_wheels))
    return 0


def cmd_mlflow_up(args) -> int:
    uri = mlflow_server.up(args.folder, args.port, args.postgres_port)
    print(f"MLflow on PostgreSQL, logs and artifacts in {args.folder}; stop it with "
          "`regmix mlflow down`")
    print(uri)
    return 0


def cmd_mlflow_down(args) -> int:
    stopped = mlflow_server.down(args.folder)
    print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing running from {args.folder}")
    return 0


def pipeline_file(text: str) -> Path:
    """An argparse type: where `compile` writes; KFP names the format by the suffix."""
    path = byo.output_file(text)
    if path.suffix not in (".yaml", ".yml"):
        raise argparse.ArgumentTypeError(f"'{text}': give a .yaml file")
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regmix", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    byo.add_commands(sub)

    run = byo.add_command(sub, "run", "run the whole pipeline locally through kfp.local")
    run.add_argument("--config", required=True, help="a run config YAML (see configs/)")
    run.add_argument("--summary-json", type=byo.output_file,
                     help="also write the run summary to this JSON file")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's "
                     "tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    run.add_argument("--runner", choices=["subprocess", "docker"],
                     help="run the stages as subprocesses here, or in the project's image "
                     "against an MLflow server (default: the config's runner, else subprocess)")
    run.add_argument("--image", help=f"the image for --runner docker (default: {local_image()}, "
                     "as `regmix image build` tags it)")
    # SUPPRESS: left out, it keeps the global `regmix -v run` rather than resetting it
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="stream the stages' full log instead of the progress view")
    run.set_defaults(func=cmd_run)

    report = byo.add_command(sub, "report", "write a run's report (HTML, Markdown, plots)")
    report.add_argument("run", help="the pipeline run label (printed by `regmix run`)")
    report.add_argument("--experiment", required=True,
                        help="the MLflow experiment: the config's `name`")
    report.add_argument("--tracking-uri", help=f"MLflow tracking URI ({byo.DEFAULT_TRACKING_HELP})")
    report.add_argument("--out", help="output folder (default: report-RUN)")
    report.set_defaults(func=cmd_report)

    comp = byo.add_command(sub, "compile", "compile the pipeline to KFP YAML (cluster settings "
                           "from the config's `cluster` section)")
    comp.add_argument("--config", required=True, help="a run config YAML (see configs/)")
    comp.add_argument("--out", required=True, type=pipeline_file,
                      help="the pipeline YAML to write (upload it in the KFP UI)")
    comp.set_defaults(func=cmd_compile)

    def kfp_parser(name: str, help: str, config: bool = True) -> argparse.ArgumentParser:
        cmd = byo.add_command(sub, name, help)
        cmd.add_argument("--host", help="the KFP UI/API address, e.g. http://localhost:8080 "
                         "(default: found in the cluster, or through your kubectl access)")
        cmd.add_argument("--namespace", help="your profile namespace (multi-user Kubeflow only)")
        if config:
            cmd.add_argument("--config", required=True, help="a run config YAML (see configs/)")
            cmd.add_argument("--experiment", help="KFP experiment (default: the config's name)")
            cmd.add_argument("--no-cache", action="store_true",
                             help="prepare the data again rather than reuse KFP's cached "
                             "preparation (the only cached task), e.g. after its token arrays "
                             "were deleted from the volume")
        return cmd

    submit = kfp_parser("submit", "compile and start one run on Kubeflow Pipelines")
    submit.add_argument("--run-name", help="the run's name (default: the config's name)")
    submit.set_defaults(func=cmd_submit)

    schedule = kfp_parser("schedule", "compile and create a recurring run (KFP cron: 6 fields, "
                          "seconds first)")
    schedule.add_argument(
        "--cron", required=True,
        help="KFP's cron has 6 fields, SECONDS FIRST: second minute hour day-of-month month "
        "day-of-week, e.g. '0 0 3 * * *' for 03:00 every day (or @daily, @every 6h); a 5-field "
        "crontab line is rejected",
    )
    schedule.add_argument("--name", help="the recurring run's name (default: <config name>-scheduled)")
    schedule.set_defaults(func=cmd_schedule)

    runs = kfp_parser("runs", "list the newest runs", config=False)
    runs.add_argument("--limit", type=byo.at_least(1), default=20, help="how many (default 20)")
    runs.set_defaults(func=cmd_runs)

    corpus = byo.add_command(sub, "corpus", "corpus tools").add_subparsers(dest="action",
                                                                           required=True)
    build = byo.add_command(corpus, "build", "build the tinypile demo corpus (cached)")
    build.add_argument("--tiny", action="store_true", help="17 MB in all, 0.2-3 MB a domain")
    build.add_argument("--out", help="output folder (default: ~/.cache/regmix/tinypile)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=cmd_corpus_build)

    image = byo.add_command(sub, "image", "the project's container image").add_subparsers(
        dest="action", required=True)
    build_image_cmd = byo.add_command(image, "build", "build docker/Dockerfile's image (a "
                                      "Debian-built base where no registry is reachable)")
    build_image_cmd.add_argument("--gpu", action="store_true",
                                 help="the CUDA image (torch from PyPI) instead of the CPU one")
    build_image_cmd.add_argument("--tag", help="the image reference (default: "
                                 f"{local_image()}, or {local_image(gpu=True)} with --gpu)")
    build_image_cmd.add_argument("--base", help="a Python 3.11 base image (default: "
                                 "python:3.11-slim-bookworm, else one made from Debian)")
    build_image_cmd.add_argument("--torch-wheels", type=Path,
                                 help="a folder holding the pinned torch wheel, for machines "
                                 "that cannot reach the torch index")
    build_image_cmd.set_defaults(func=cmd_image_build)

    server = byo.add_command(sub, "mlflow", "an MLflow tracking server on PostgreSQL here")
    server_actions = server.add_subparsers(dest="action", required=True)
    server_up = byo.add_command(server_actions, "up", "start it (prints its tracking URI last)")
    server_up.add_argument("--port", type=byo.at_least(1), default=5000)
    server_up.add_argument("--postgres-port", type=byo.at_least(1), default=5433)
    server_down = byo.add_command(server_actions, "down", "stop it")
    for cmd in (server_up, server_down):
        cmd.add_argument("--folder", type=Path, default=mlflow_server.DEFAULT_FOLDER,
                         help="the database, artifacts and logs (default: %(default)s)")
    server_up.set_defaults(func=cmd_mlflow_up)
    server_down.set_defaults(func=cmd_mlflow_down)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # force: a second call in one process (a notebook, a test) logs to today's stderr, not to
    # the stream the first call found, which may be closed since
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    return in_one_line(lambda: args.func(args), "regmix")


if __name__ == "__main__":
    sys.exit(main())
