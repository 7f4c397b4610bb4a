"""The compiled KFP pipeline: the fan-out over mixtures, the fan-in, the gate condition."""

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
