"""The live view's state: fan-outs found in the compiled pipeline, counts from task outputs,
the best proxy, plain lines off a terminal. (The view of a real run: tests/pipelines/test_e2e.py.)"""

import io
import json
from pathlib import Path

from rich.console import Console

from regmix.config.loading import load_config
from regmix.pipelines.pipeline import build_pipeline
from regmix.pipelines.progress import RunView, fan_outs

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def test_each_fan_out_is_found_with_the_plan_it_iterates_over():
    found = fan_outs(build_pipeline(load_config(TINY)).pipeline_spec)
    plans = {train: plan for train, (_, plan) in found.items()}
    assert plans == {"train-proxy-op": "sample-mixtures-op", "train-proxy-op-2": "propose-proxies-op",
                     "train-proxy-op-3": "plan-gate-op", "train-target-op": "plan-large-op",
                     "train-target-op-2": "plan-rank-check-op"}


def write_output(path: Path, output) -> None:
    path.mkdir(parents=True)
    (path / "executor_output.json").write_text(json.dumps({"parameterValues": {"Output": output}}))


def result(mixture_id: str, loss: float | None, reused: bool = False) -> dict:
    weights = {"a": 0.5, "b": 0.5}
    if loss is None:
        return {"id": mixture_id, "weights": weights, "error": "diverged"}
    return {"id": mixture_id, "weights": weights, "val_loss": {"a": loss, "b": loss + 1},
            "reused": reused}


def test_a_fan_out_counts_finished_failed_and_reused_mixtures_and_the_best_proxy(tmp_path):
    run = tmp_path / "regmix-tiny-2026"
    write_output(run / "sample-mixtures-op", [{"task": 0, "mixtures": [{}, {}]},
                                              {"task": 1, "mixtures": [{}, {}]}])
    view = RunView(tmp_path, {"train-proxy-op": ("for-loop-2", "sample-mixtures-op")}, "mean")
    view.on_line(f'    "outputFile": "{run}/data-settings-op/executor_output.json"')
    view.on_line("10:55:59.377 - INFO - Executing task \x1b[96m'train-proxy-op'\x1b[0m")
    write_output(run / "for-loop-2-iteration-0" / "train-proxy-op",
                 {"task": 0, "results": [result("m0", 3.0), result("m1", None)]})
    view.poll()
    stage = view.stages["train-proxy-op"]
    assert (stage.total, stage.done, stage.errors, stage.ended) == (4, 2, 1, None)
    assert stage.eta(stage.started + 10) == 10  # 10 s for 2: 10 s more for the other 2
    write_output(run / "for-loop-2-iteration-1" / "train-proxy-op",
                 {"task": 1, "results": [result("m2", 2.0, reused=True), result("m3", 4.0)]})
    view.on_line("Task 'train-proxy-op' finished with status SUCCESS")
    view.poll()
    assert stage.done == 4 and stage.reused == 1 and stage.ended is not None
    assert view.best == ("m2", 2.5)  # the mean of the target's domains
    printed: set[str] = set()
    (line,) = view.finished_lines(printed)
    assert line.startswith("proxies ") and "4/4 done, 1 failed, 1 reused" in line
    assert "best proxy m2 (target loss 2.5000)" in line
    assert view.finished_lines(printed) == []  # once each


def test_a_stage_that_fails_is_marked_in_the_view(tmp_path):
    view = RunView(tmp_path, {}, "mean")
    view.on_line("Executing task 'fit-regression-op'")
    view.on_line("Task 'fit-regression-op' finished with status FAILURE")
    out = io.StringIO()
    Console(file=out, width=100).print(view.render())
    assert "✗ fit-regression" in out.getvalue()
    (line,) = view.finished_lines(set())
    assert line.startswith("fit-regression") and "FAILED" in line
