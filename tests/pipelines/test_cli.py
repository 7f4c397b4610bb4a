"""User mistakes exit with code 2 and one clear line, never a traceback."""

from pathlib import Path

import pytest
import yaml

from regmix.pipelines.cli import experiment_page, main


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("name: x\nbogus: 1\n", "bogus: unknown key"),
        ("- a list\n", "top level must be a mapping"),
        ("name: regmix-x\ncorpus: {spec: nowhere.yaml}\nproxy: {model: {shape: tiny-proxy}, "
         "train: {tokens: 65536}}\nlarge: {model: {shape: tiny-large}, train: {tokens: 65536}}\n",
         "corpus spec not found"),
    ],
)
def test_bad_configs_exit_2_with_a_message(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_domain_in_config_is_caught_before_any_work(tmp_path, capsys, corpus_spec):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: regmix-x\ncorpus: {{spec: {corpus_spec}}}\n"
        "proxy: {model: {shape: tiny-proxy}, train: {tokens: 65536}}\n"
        "large: {model: {shape: tiny-large}, train: {tokens: 65536}}\n"
        "regression: {target: wikipedia}\n"
    )
    assert main(["run", "--config", str(config)]) == 2
    assert "regression.target: unknown domain(s) ['wikipedia']" in capsys.readouterr().err


def pile_config_with(tmp_path, change: dict) -> Path:
    """configs/pile.yaml with some sections' keys changed, written to a file."""
    config = yaml.safe_load(Path("configs/pile.yaml").read_text())
    for section, values in change.items():
        config[section].update(values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cluster": {"mlflow_secret": None}}, "cluster.mlflow_secret: the pods need one shared MLflow"),
        ({"regression": {"target": "pilecc"}}, "regression.target: unknown domain(s) ['pilecc']"),
    ],
)
def test_submit_checks_what_it_can_before_contacting_the_cluster(tmp_path, capsys, change, message):
    path = pile_config_with(tmp_path, change)
    # No KFP server at this address: the check must come first
    assert main(["submit", "--host", "http://127.0.0.1:9", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_compile_checks_domain_names_the_config_lists(tmp_path, capsys):
    path = pile_config_with(tmp_path, {"regression": {"target": "pilecc"}})
    assert main(["compile", "--config", str(path), "--out", str(tmp_path / "p.yaml")]) == 2
    assert "regression.target: unknown domain(s) ['pilecc']" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_compile_checks_domain_names_on_tinypile(tmp_path, capsys):
    config = yaml.safe_load(Path("configs/local.yaml").read_text())
    config["search"] = {"max_weight": {"wikipeda": 0.5}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compile", "--config", str(path), "--out", str(tmp_path / "p.yaml")]) == 2
    assert "search: max_weight names unknown domains ['wikipeda']" in capsys.readouterr().err


def test_compile_carries_the_configs_mlflow_and_warns_what_a_cluster_lacks(tmp_path, capsys):
    path = pile_config_with(tmp_path, {"cluster": {"mlflow_secret": None},
                                       "tracking": {"uri": "http://mlflow.example:5000"}})
    assert main(["compile", "--config", str(path), "--out", str(tmp_path / "p.yaml")]) == 0
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))  # then the platform spec
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    # A run started from the KFP UI with this YAML logs to the config's MLflow
    assert parameters["tracking_uri"]["defaultValue"] == "http://mlflow.example:5000"
    assert "warning" not in capsys.readouterr().err

    # No shared MLflow, and retries (pile.yaml retries twice) without a volume
    path = pile_config_with(tmp_path, {"cluster": {"mlflow_secret": None, "volume": None}})
    assert main(["compile", "--config", str(path), "--out", str(tmp_path / "p.yaml")]) == 0
    err = capsys.readouterr().err
    assert "warning: cluster.mlflow_secret: the pods need one shared MLflow" in err
    assert "warning: cluster.retries: without cluster.volume" in err


@pytest.mark.parametrize(("uri", "ui", "page"), [
    ("sqlite:///x.db", None, "mlflow ui --backend-store-uri sqlite:///x.db --port 5000, then "
                             "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"),
    ("http://h:5000/", None, "http://h:5000/#/experiments/3?workflowType=machine_learning"),
    ("sqlite:///x.db", "https://ui.example/",
     "https://ui.example/#/experiments/3?workflowType=machine_learning"),
])
def test_the_summary_says_where_the_experiment_opens(monkeypatch, uri, ui, page):
    if ui:
        monkeypatch.setenv("REGMIX_MLFLOW_UI", ui)
    else:
        monkeypatch.delenv("REGMIX_MLFLOW_UI", raising=False)
    assert experiment_page(uri, "3") == page
