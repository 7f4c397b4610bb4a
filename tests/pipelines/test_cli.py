"""User mistakes exit with code 2 and one clear line, never a traceback."""

import pytest

from pipelines.cli import main


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("name: x\nbogus: 1\n", "bogus: unknown key"),
        ("- a list\n", "top level must be a mapping"),
        ("name: regmix-x\ncorpus: {spec: nowhere.yaml}\nproxy: {model: {shape: tiny-proxy}, "
         "train: {tokens: 10}}\nlarge: {model: {shape: tiny-large}, train: {tokens: 10}}\n",
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
        "proxy: {model: {shape: tiny-proxy}, train: {tokens: 10}}\n"
        "large: {model: {shape: tiny-large}, train: {tokens: 10}}\n"
        "regression: {target: wikipedia}\n"
    )
    assert main(["run", "--config", str(config)]) == 2
    assert "regression.target: unknown domain(s) ['wikipedia']" in capsys.readouterr().err
