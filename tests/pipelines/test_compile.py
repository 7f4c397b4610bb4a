"""The compiled KFP pipeline: the fan-out over mixtures, the fan-in, the gate condition."""

import json
from pathlib import Path

import pytest
import yaml

from regmix.pipelines.cli import main


def test_compile_writes_a_pipeline_with_loop_collect_and_gate(tmp_path, capsys):
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--config", "configs/local.yaml", "--out", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))  # then the platform spec (the pods' uid)
    assert spec["pipelineInfo"]["name"] == "regmix-local"
    text = out.read_text()
    for stage in ("prepare-data-op", "sample-mixtures-op", "train-proxy-op",
                  "fit-regression-op", "search-mixture-op", "validate-prediction-op",
                  "train-target-op", "compare-baselines-op", "finish-tracking-op"):
        assert stage in text
    assert "parameterIterator" in text  # dsl.ParallelFor over the mixture tasks
    assert "iteratorPolicy" in text and "parallelismLimit: 8" in text
    assert "pipelinechannel--validate-prediction-op-Output'] == true" in " ".join(text.split())  # dsl.If
    assert "exitTask" in text or "ALL_UPSTREAM_TASKS_COMPLETED" in text
    defaults = spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert defaults["mixtures"]["count"] == 40


def task_graph(path) -> dict:
    """The compiled pipeline's structure, without the ops' source: every task (its component,
    dependencies, input names, trigger and iterator), every component's inputs and outputs,
    and the platform spec (pods, volumes, secrets)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    spec, tasks = docs[0], {}

    def walk(name: str, component: dict) -> None:
        for task_name, task in component.get("dag", {}).get("tasks", {}).items():
            ref = task.get("componentRef", {}).get("name")
            inputs = task.get("inputs", {})
            tasks[f"{name}/{task_name}"] = [
                ref, sorted(task.get("dependentTasks", [])), sorted(inputs.get("parameters", {})),
                sorted(inputs.get("artifacts", {})), task.get("triggerPolicy"),
                task.get("parameterIterator") or task.get("artifactIterator")]
            if "dag" in spec["components"].get(ref, {}):
                walk(f"{name}/{task_name}", spec["components"][ref])

    walk("root", spec["root"])
    components = {k: [v.get("inputDefinitions"), v.get("outputDefinitions")]
                  for k, v in spec["components"].items()}
    return {"tasks": tasks, "components": components, "platform": docs[1:] or None}


@pytest.mark.parametrize("config", ["local", "tiny", "pile"])
def test_compiled_structure_is_unchanged(tmp_path, config):
    """The pipeline's structure as compiled before the three-layer restructuring (saved in
    compiled_graph.json): a refactor of the code must not change what KFP runs."""
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--config", f"configs/{config}.yaml", "--out", str(out)]) == 0
    expected = json.loads((Path(__file__).parent / "compiled_graph.json").read_text())[config]
    assert json.loads(json.dumps(task_graph(out))) == expected
