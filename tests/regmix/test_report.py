from pathlib import Path

import mlflow
import pytest

from regmix.report import RunRecord, build_report, outcome_lines
from regmix.tracking.plots import mixtures
from regmix.tracking.runs import PIPELINE_TAG, STAGE_TAG, stage_run


def test_report_reads_the_run_back_from_mlflow(tmp_path, tracking):
    with stage_run(tracking, "regression", "fit"):
        mlflow.log_params({"model": "gp", "proxies": 12})
        mlflow.log_metrics({"cv_spearman": 0.91, "cv_rmse": 0.02, "proxies_left_out": 2})
        for n, rho in ((4, 0.5), (8, 0.8), (12, 0.91)):
            mlflow.log_metric("learning_curve.cv_spearman", rho, step=n)
    with stage_run(tracking, "search", "search"):
        mlflow.log_params({"weight.code": 0.7, "weight.prose": 0.3, "method": "cmaes"})
        mlflow.log_metrics({"predicted_loss": 3.1, "paper_recipe_predicted_loss": 3.2})
        chart = mixtures({"chosen": {"code": 0.7, "prose": 0.3}, "prior": {"code": 0.4, "prose": 0.6}},
                         "Chosen mixture vs the sampling prior", tmp_path / "mixture.png")
        mlflow.log_artifact(str(chart), "plots")  # as the search stage logs it
    with stage_run(tracking, "gate", "gate"):
        mlflow.log_metric("gate.passed", 1.0)
        mlflow.set_tag("gate.reason", "prediction validated")
        mlflow.log_dict({"spearman": 0.9, "spearman_low": 0.7, "spearman_high": 1.0,
                         "predicted": {"chosen": 3.1, "g1": 3.3, "g2": 3.5},
                         "measured": {"chosen": 3.0, "g1": 3.4, "g2": 3.6}}, "gate.json")
    with stage_run(tracking, "evidence", "compare"):
        mlflow.log_dict({"chosen": {"mean": 3.0, "std": 0.01, "seeds": 3},
                         "prior": {"mean": 3.2, "std": 0.02, "seeds": 3, "paired_seeds": 3,
                                   "margin": 0.2, "noise": 0.05, "chosen_wins": True}},
                        "baselines.json")

    html = build_report(tracking["uri"], "regmix-test", "test-run", tmp_path / "report")
    assert (tmp_path / "report" / "mixture.png").read_bytes() == chart.read_bytes()
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "CV Spearman 0.910" in markdown and "**PASSED**" in markdown
    assert "gp on 12 proxies (2 left out as outliers, see `left_out_proxies.json`)" in markdown
    assert "large model on `prior`: 3.2000 +- 0.0200 over 3 seed(s), chosen wins by 0.2000" in markdown
    for png in ("mixture.png", "gate.png", "learning_curve.png", "baselines.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
        assert f"![{png}]({png})" in markdown
    page = html.read_text()
    assert page.count("data:image/png;base64") == 4
    assert "<b>PASSED</b>" in page and "<code>prior</code>" in page
    assert "<table><tr><th>domain</th><th>chosen weight</th></tr>" in page
    assert "<tr><td>code</td><td>0.7000</td></tr>" in page
    logged = mlflow.MlflowClient(tracking["uri"]).list_artifacts(tracking["parent_run_id"], "report")
    assert {a.path for a in logged} == {f"report/{name}" for name in (
        "report.md", "report.html", "mixture.png", "gate.png", "learning_curve.png",
        "baselines.png")}
    # MLflow's Markdown viewer shows images only by absolute address: where `mlflow ui` serves
    in_mlflow = mlflow.MlflowClient(tracking["uri"]).download_artifacts(
        tracking["parent_run_id"], "report/report.md", str(tmp_path / "logged"))
    run_id = tracking["parent_run_id"]
    assert (f"![gate.png](http://127.0.0.1:5000/get-artifact?path=report%2Fgate.png&"
            f"run_uuid={run_id})") in Path(in_mlflow).read_text()


def test_a_failed_run_says_where_it_failed(tmp_path, tracking):
    with stage_run(tracking, "proxy", "m0000"):
        mlflow.log_metric("target_loss", 3.0)
    with pytest.raises(RuntimeError), stage_run(tracking, "proxy", "m0001"):
        raise RuntimeError("CUDA out of memory")
    build_report(tracking["uri"], "regmix-test", "test-run", tmp_path / "a", outcome="FAILED")
    assert "- run **FAILED**: stage runs that failed or did not finish: proxy (m0001)" in (
        tmp_path / "a" / "report.md").read_text()
    run = mlflow.MlflowClient(tracking["uri"]).create_run(  # a pod killed mid-run: RUNNING
        tracking["experiment_id"], run_name="m0002",
        tags={STAGE_TAG: "proxy", PIPELINE_TAG: tracking["pipeline_run"]})
    build_report(tracking["uri"], "regmix-test", "test-run", tmp_path / "k", outcome="FAILED")
    assert "proxy (m0001, m0002)" in (tmp_path / "k" / "report.md").read_text()
    assert run.info.status == "RUNNING"
    build_report(tracking["uri"], "regmix-test", "test-run", tmp_path / "b", outcome="SUCCEEDED")
    assert "**FAILED**" not in (tmp_path / "b" / "report.md").read_text()
    (line,) = outcome_lines(RunRecord("early"), "FAILED")  # before any tracked stage
    assert "no tracked stage failed" in line and "data preparation" in line


def test_a_stage_that_failed_before_its_result_is_named_not_a_crash(tmp_path, tracking):
    with pytest.raises(ValueError), stage_run(tracking, "regression", "fit<1>"):
        mlflow.log_metric("proxies_failed", 9)  # as the fit stage logs before it can refuse
        raise ValueError("only 3 of 12 proxies finished")
    build_report(tracking["uri"], "regmix-test", "test-run", tmp_path / "r", outcome="FAILED")
    assert "- regression: FAILED without a result (MLflow run `fit<1>`)" in (
        tmp_path / "r" / "report.md").read_text()
    assert "<p>regression: FAILED without a result (MLflow run <code>fit&lt;1&gt;</code>)</p>" in (
        tmp_path / "r" / "report.html").read_text()
