"""The run report: plots and the numbers behind the decision, read back from MLflow.

Written as Markdown (PNG files beside it) and as one self-contained HTML file (images inline),
logged to the pipeline's parent run under `report/`, and shown in the KFP UI by the exit step.
"""

import base64
import html
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow

from regmix.errors import UserError
from regmix.evidence import verdict
from regmix.files import write_text
from regmix.tracking.outcome import run_outcome, tell_parent
from regmix.tracking.plots import save
from regmix.tracking.runs import (
    PIPELINE_TAG,
    PROXY_STAGES,
    default_tracking_uri,
    finish_pipeline_run,
    latest_run,
    runs_by_stage,
    ui_address,
)


@dataclass
class RunRecord:
    """Everything one pipeline run logged, by stage."""

    label: str
    runs: dict[str, list] = field(default_factory=dict)
    artifacts: dict[str, dict] = field(default_factory=dict)

    def latest(self, stage: str):
        return latest_run(self.runs.get(stage))


def load_record(tracking_uri: str, experiment: str, label: str) -> RunRecord:
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"no MLflow experiment '{experiment}' at {tracking_uri}; give the "
                        "experiment the run logged to (its config's name)")
    record = RunRecord(label, runs_by_stage(client, found.experiment_id, label))
    if not record.runs:
        raise UserError(f"no runs tagged {PIPELINE_TAG}={label} in experiment '{experiment}'; "
                        "give the label a run's summary printed (or find it in `mlflow ui`)")
    with tempfile.TemporaryDirectory() as tmp:
        for stage, name in (("gate", "gate.json"),
                            ("evidence", "baselines.json"), ("evidence", "rank_invariance.json")):
            for run in record.runs.get(stage, []):
                try:
                    path = client.download_artifacts(run.info.run_id, name, tmp)
                except Exception:  # noqa: BLE001 - an artifact this run did not log
                    continue
                record.artifacts[name] = json.loads(Path(path).read_text())
    return record


def weights_of(run) -> dict[str, float]:
    return {k.removeprefix("weight."): float(v) for k, v in run.data.params.items()
            if k.startswith("weight.")}


def copy_search_plot(record: RunRecord, tracking_uri: str, path: Path) -> bool:
    """The search stage's chosen-vs-prior chart, as it logged it (not drawn a second time)."""
    search = record.latest("search")
    if search is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            logged = mlflow.MlflowClient(tracking_uri).download_artifacts(
                search.info.run_id, f"plots/{path.name}", tmp)
        except Exception:  # noqa: BLE001 - a search run that failed before its plots
            return False
        shutil.copyfile(logged, path)
    return True


def plot_gate(record: RunRecord, path: Path) -> bool:
    gate = record.artifacts.get("gate.json")
    if gate is None:
        return False
    # The points the rank check scored (older records: every one but the seed replicas)
    ids = gate.get("fresh") or [i for i in gate["predicted"]
                                if i in gate["measured"] and "@seed" not in i]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter([gate["predicted"][i] for i in ids], [gate["measured"][i] for i in ids])
    if "chosen" in ids:
        ax.annotate("chosen", (gate["predicted"]["chosen"], gate["measured"]["chosen"]))
    ax.set_xlabel("predicted target loss")
    ax.set_ylabel("measured target loss")
    ax.set_title(f"Gate: Spearman {gate['spearman']:.3f} "
                 f"[{gate['spearman_low']:.2f}, {gate['spearman_high']:.2f}]")
    save(fig, path)
    return True


def plot_learning_curve(record: RunRecord, path: Path, tracking_uri: str) -> bool:
    fit = record.latest("regression")
    if fit is None:
        return False
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(
        fit.info.run_id, "learning_curve.cv_spearman")
    if not history:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot([m.step for m in history], [m.value for m in history], marker="o")
    ax.set_xlabel("training proxies")
    ax.set_ylabel("CV Spearman")
    ax.set_title("Regression learning curve")
    save(fig, path)
    return True


def plot_baselines(record: RunRecord, path: Path) -> bool:
    """The chosen mixture's margin over each baseline (baseline - chosen target loss, > 0: the
    chosen mixture is better) with its paired noise bound, at proxy size (the gate) and at the
    larger size: differences from zero, so no axis offset hides how small they are."""
    panels = {size: {n: s for n, s in stats.items() if n != "chosen"}
              for size, stats in (("proxy size (gate)", (record.artifacts.get("gate.json") or {})
                                   .get("baselines", {})),
                                  ("larger size", record.artifacts.get("baselines.json") or {}))}
    panels = {size: stats for size, stats in panels.items() if stats}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, (size, stats) in zip(axes[0], panels.items(), strict=True):
        names = sorted(stats)
        margins = [stats[n]["margin"] for n in names]
        noise = [stats[n].get("noise") or 0.0 for n in names]
        colors = ["tab:green" if stats[n].get("chosen_wins") else "tab:gray" for n in names]
        ax.barh(names, margins, xerr=noise, color=colors, capsize=4, height=0.4)
        ax.axvline(0, color="black", linewidth=0.8)
        # Zero in the middle and room around one bar: a lone bar would otherwise fill the axes
        reach = max(abs(m) + n for m, n in zip(margins, noise, strict=True)) * 1.4 or 1.0
        ax.set_xlim(-reach, reach)
        ax.set_ylim(-0.75, len(names) - 0.25)
        for y, n in enumerate(names):
            bound = "" if stats[n].get("noise") is not None else " (one seed: no noise bound)"
            ax.annotate(f"{stats[n]['mean']:.4f} vs chosen{bound}", (0, y),
                        textcoords="offset points", xytext=(4, 10), fontsize=7)
        ax.set_xlabel("baseline - chosen target loss (> 0: chosen better)")
        ax.set_title(f"{size}: margin, paired noise bound")
    fig.tight_layout()
    save(fig, path)
    return True


def outcome_lines(record: RunRecord, outcome: str | None) -> list[str]:
    """How the run ended, when it failed: which stage runs failed, or that none was reached."""
    # KFP's outcome (SUCCEEDED, FAILED, CANCELLED) or MLflow's (FINISHED, FAILED, RUNNING...)
    parent = record.latest("pipeline")
    ended = outcome if outcome is not None else parent.info.status if parent else None
    if outcome is None and ended in ("RUNNING", "SCHEDULED"):  # read back while not closed
        return [f"- run **incomplete**: MLflow has it {ended}, so it is still going, or its "
                "process died without closing it (the next run of this pipeline on this host "
                "marks a dead one KILLED); what follows is what it logged so far"]
    if ended in (None, "SUCCEEDED", "FINISHED", "RUNNING", "SCHEDULED"):
        return []
    # A killed pod (out of memory, preempted) leaves its run RUNNING: it did not finish either
    unfinished = {stage: sorted(r.info.run_name for r in runs if r.info.status != "FINISHED")
                  for stage, runs in record.runs.items() if stage != "pipeline"}
    named = [f"{stage} ({', '.join(names[:5])})" for stage, names in unfinished.items() if names]
    where = ("stage runs that failed or did not finish: " + "; ".join(named) if named else
             "no tracked stage failed: it stopped in a stage that logs no MLflow run (data "
             "preparation, mixture sampling or planning); its task log says why")
    return [f"- run **{ended}**: {where}"]


def summary_lines(record: RunRecord, outcome: str | None = None) -> list[str]:
    lines = [f"# RegMix run `{record.label}`", "", *outcome_lines(record, outcome)]
    fit, search, gate = record.latest("regression"), record.latest("search"), record.latest("gate")
    proxies = sum(len(record.runs.get(stage, [])) for stage in PROXY_STAGES)
    lines.append(f"- proxies trained in this run: {proxies}")
    # A stage that failed may have opened its run without logging its result: say so instead.
    results = {"regression": (fit, "cv_spearman"), "search": (search, "predicted_loss"),
               "gate": (gate, "gate.passed")}
    for stage, (run, metric) in results.items():
        if run is not None and metric not in run.data.metrics:
            lines.append(f"- {stage}: {run.info.status} without a result (MLflow run "
                         f"`{run.info.run_name}`)")
    fit, search, gate = (run if run is not None and metric in run.data.metrics else None
                         for run, metric in results.values())
    if fit:
        m = fit.data.metrics
        left_out = (f" ({m['proxies_left_out']:.0f} left out as outliers, see "
                    "`left_out_proxies.json`)" if m.get("proxies_left_out") else "")
        lines.append(f"- regression: {fit.data.params.get('model')} on "
                     f"{fit.data.params.get('proxies')} proxies{left_out}, CV Spearman "
                     f"{m['cv_spearman']:.3f}, CV RMSE {m['cv_rmse']:.4f}")
    if search:
        m = search.data.metrics
        lines.append(f"- search ({search.data.params.get('method')}): predicted target loss "
                     f"{m['predicted_loss']:.4f} (paper's recipe: "
                     f"{m.get('paper_recipe_predicted_loss', float('nan')):.4f})")
    if gate:
        decision = "PASSED" if gate.data.metrics["gate.passed"] else "FAILED"
        lines.append(f"- gate: **{decision}**: {gate.data.tags.get('gate.reason', '')}")
    for name, s in sorted(((record.artifacts.get("gate.json") or {}).get("baselines") or {}).items()):
        lines.append(f"- gate proxies on `{name}`: {s['mean']:.4f} over {s['seeds']} seed(s), "
                     f"{verdict(s)}")
    for name, s in sorted((record.artifacts.get("baselines.json") or {}).items()):
        against = "" if name == "chosen" else f", {verdict(s)}"
        lines.append(f"- large model on `{name}`: {s['mean']:.4f} +- {s['std']:.4f} over "
                     f"{s['seeds']} seed(s){against}")
    rank = record.artifacts.get("rank_invariance.json")
    if rank:
        lines.append(f"- rank invariance (proxy vs larger model, {rank['mixtures']} mixtures): "
                     f"Spearman {rank['spearman']:.3f}")
    if search:
        chosen = weights_of(search)
        lines += ["", "| domain | chosen weight |", "| --- | --- |"]
        lines += [f"| {d} | {w:.4f} |" for d, w in sorted(chosen.items(), key=lambda kv: -kv[1])]
    return lines


def inline_html(text: str) -> str:
    """One line of the summary's markdown (escaped): **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_to_html(lines: list[str]) -> str:
    """The summary's few markdown forms (heading, list items, one table) as HTML."""
    parts = []
    for line in lines:
        if line.startswith("# "):
            parts.append(f"<h1>{inline_html(line[2:])}</h1>")
        elif line.startswith("- "):
            parts.append(f"<p>{inline_html(line[2:])}</p>")
        elif line.startswith("|") and "---" not in line:
            cells = [inline_html(cell.strip()) for cell in line.strip("|").split("|")]
            tag = "th" if not parts or not parts[-1].startswith("<tr>") else "td"
            parts.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
    body = "\n".join(parts)
    return re.sub(r"((?:<tr>.*</tr>\n?)+)", r"<table>\1</table>", body)


def markdown(lines: list[str], images: list[str], link: Callable[[str], str]) -> str:
    return "\n".join(lines + [""] + [f"![{name}]({link(name)})" for name in images]) + "\n"


def build_report(tracking_uri: str, experiment: str, label: str, out_dir: Path,
                 outcome: str | None = None) -> Path:
    """Write report.md, report.html and PNGs to `out_dir`; returns the HTML path. `outcome` is
    how the run ended (KFP's SUCCEEDED, FAILED, CANCELLED) when MLflow does not know yet."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = load_record(tracking_uri, experiment, label)
    plots = {
        "mixture.png": copy_search_plot(record, tracking_uri, out_dir / "mixture.png"),
        "gate.png": plot_gate(record, out_dir / "gate.png"),
        "learning_curve.png": plot_learning_curve(record, out_dir / "learning_curve.png",
                                                  tracking_uri),
        "baselines.png": plot_baselines(record, out_dir / "baselines.png"),
    }
    drawn = [name for name, made in plots.items() if made]
    lines = summary_lines(record, outcome)
    write_text(out_dir / "report.md", markdown(lines, drawn, lambda name: name))
    images = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode((out_dir / n).read_bytes()).decode()}"'
        f' alt="{n}">' for n in drawn)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>RegMix "
            f"{html.escape(label)}</title></head><body>{markdown_to_html(lines)}{images}</body>"
            "</html>")
    write_text(out_dir / "report.html", page)
    parent = record.latest("pipeline")
    if parent is not None:
        client, run_id = mlflow.MlflowClient(tracking_uri), parent.info.run_id
        # MLflow's Markdown viewer shows an image with a relative (or data:) address as text:
        # the logged report.md links each by absolute address through the UI's get-artifact
        # route, in place of the file's relative links
        for path in sorted(out_dir.iterdir()):
            if path.name != "report.md":
                client.log_artifact(run_id, str(path), "report")
        ui = ui_address(tracking_uri)
        client.log_text(run_id, markdown(lines, drawn, lambda name: (
            f"{ui}/get-artifact?path=report%2F{name}&run_uuid={run_id}")), "report/report.md")
        tell_parent(client, parent, run_outcome(record.runs), "\n".join(lines))
    return out_dir / "report.html"


def run_finish_tracking(experiment: str, tracking_uri: str, label: str, state: str,
                        report: Path, summary: Path) -> None:
    """The exit step: write the run report (HTML to `report`, Markdown to `summary`) and
    close the parent run with the pipeline's final `state`."""
    uri = tracking_uri or default_tracking_uri()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            page = build_report(uri, experiment, label, Path(tmp), outcome=state)
            shutil.copy(page, report)
            shutil.copy(page.with_name("report.md"), summary)
    except Exception:  # a report problem must not hide how the run itself ended
        logging.getLogger("regmix.report").exception("could not write the run report")
    finish_pipeline_run(uri, experiment, label, state)
