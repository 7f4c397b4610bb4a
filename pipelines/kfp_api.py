"""Kubeflow Pipelines from the command line: compile, submit a run, schedule runs, list runs.

Thin plain functions over `kfp.Client` (KFP's v2beta1 REST API). A run gets the whole config as
its `config` parameter, so the compiled package is all a run needs.
"""

import io
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import kfp
from kfp import compiler

from regmix.config.schema import RegMixConfig
from regmix.errors import ConfigError, ServiceError
from regmix.pipelines.pipeline import build_pipeline


def compile_package(config: RegMixConfig, out: Path) -> Path:
    """The pipeline YAML for this config, cluster settings included."""
    compiler.Compiler().compile(build_pipeline(config), str(out))
    return out


class KfpUnavailable(ServiceError):
    """The KFP API could not be reached, or refused the request."""


class NoAnswer(KfpUnavailable):
    """An answer without a field every real KFP answer has: behind a login, a 302 leads to an HTML
    page, which kfp_server_api reads as an object whose every field is None. `answering` adds the
    address to the message."""

    def __init__(self, what: str, where: str = "the KFP API"):
        self.what = what
        super().__init__(
            f"{where} answered without {what}: is it behind a login page (Dex, oauth2-proxy)? "
            "Run from a Kubeflow notebook without --host, or port-forward ml-pipeline-ui "
            "(docs/deploy.md, step 4)")


def required(value: str | None, what: str) -> str:
    """`value`, which a real KFP answer always has; NoAnswer where it is missing."""
    if not value:
        raise NoAnswer(what)
    return value


@contextmanager
def checked_first():
    """Hold what kfp prints as it goes (its 'Experiment details: <link>' lines) and print it
    only if the block ends well: behind a login page the link ends in /None."""
    held = io.StringIO()
    with redirect_stdout(held):
        yield
    sys.stdout.write(held.getvalue())


@contextmanager
def answering(host: str | None):
    """Turn an unreachable or refusing KFP API into one line naming the address and the fix."""
    import kfp_server_api
    from urllib3.exceptions import HTTPError

    where = host or "the address kfp found (in-cluster or kubectl)"
    try:
        yield
    except NoAnswer as e:
        raise NoAnswer(e.what, f"the KFP API at {where}") from None
    except HTTPError as e:  # urllib3's: refused, unresolvable, timed out after retries
        reason = getattr(e, "reason", e)
        raise KfpUnavailable(f"cannot reach the KFP API at {where} ({reason}); check --host and "
                             "that the API is reachable (docs/deploy.md, step 4)") from None
    except kfp_server_api.ApiException as e:
        body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else e.body or ""
        raise KfpUnavailable(f"the KFP API at {where} answered {e.status} {e.reason}: "
                             f"{body.strip()[:300]}") from None


def connect(host: str | None) -> kfp.Client:
    """A client for the KFP API at `host`; without one, kfp finds it: in the cluster (a Kubeflow
    notebook, with its service account's token) or through kubectl's credentials. The user's
    profile namespace (multi-user Kubeflow) goes to each call, not here: kfp.Client's own
    `namespace` is where KFP is installed (kubeflow), from which it builds the in-cluster
    address, so a profile namespace there points the client at a service that does not exist."""
    return kfp.Client(host=host)


def submit(client: kfp.Client, config: RegMixConfig, package: Path, namespace: str | None = None,
           experiment: str | None = None, run_name: str | None = None) -> str:
    """Start one run in the experiment (made if missing, named after the config by default);
    returns the run's id."""
    with checked_first():
        result = client.create_run_from_pipeline_package(
            str(package), run_name=run_name or config.name,
            experiment_name=experiment or config.name, namespace=namespace,
            service_account=config.cluster.service_account,
        )
        return required(result.run_id, "a run id")


def check_cron(expression: str) -> str:
    """KFP's cron (Go's robfig/cron) has 6 fields, seconds first, or a descriptor like @daily."""
    fields = expression.split()
    if expression.startswith("@") or len(fields) == 6:
        return expression
    if len(fields) == 5:
        raise ConfigError(
            f"--cron '{expression}' has 5 fields; KFP's cron has 6, seconds first: "
            f"use '0 {expression}'"
        )
    raise ConfigError(f"--cron '{expression}' has {len(fields)} fields; KFP's cron has 6: "
                      "second minute hour day-of-month month day-of-week, e.g. '0 0 3 * * *'")


def schedule(client: kfp.Client, config: RegMixConfig, package: Path, cron: str,
             namespace: str | None = None, experiment: str | None = None,
             name: str | None = None) -> str:
    """A recurring run on a cron schedule, one run at a time, no backfill; returns its id."""
    with checked_first():
        exp = client.create_experiment(experiment or config.name, namespace=namespace)
        experiment_id = required(exp.experiment_id, "an experiment id")
    recurring = client.create_recurring_run(
        experiment_id, name or f"{config.name}-scheduled",
        cron_expression=check_cron(cron),
        pipeline_package_path=str(package), max_concurrency=1,
        no_catchup=True, service_account=config.cluster.service_account,
    )
    return required(recurring.recurring_run_id, "a recurring run id")


def list_runs(client: kfp.Client, namespace: str | None = None, limit: int = 20) -> list[dict]:
    """The newest runs: id, name, state, creation time."""
    response = client.list_runs(page_size=limit, sort_by="created_at desc", namespace=namespace)
    # A login page's HTML also reads as no runs; KFP's healthz always says whether it is
    # multi-user, so a missing `multi_user` tells the two apart.
    if not response.runs and client.get_kfp_healthz(sleep_duration=1).multi_user is None:
        raise NoAnswer("multi_user in its healthz")
    return [{"id": r.run_id, "name": r.display_name, "state": r.state,
             "created_at": r.created_at.isoformat() if r.created_at else ""}
            for r in response.runs or []]


def ui_url(host: str | None, page: str) -> str:
    """A KFP UI page; in the cluster, relative to the Kubeflow dashboard as kfp's own links are."""
    return f"{(host or '/pipeline').rstrip('/')}/#/{page}"
