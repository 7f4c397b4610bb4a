"""Target-only sets: validation tokens measured on every model, never sampled into a mixture."""

import mlflow
import numpy as np
import pytest
import yaml

from regmix.config.loading import parse_config
from regmix.config.sections import CorpusConfig, TokenizerConfig
from regmix.config.shapes import SHAPES
from regmix.data.corpus import domain_roles, preflight, read_corpus_spec
from regmix.data.prepare import TokenData, prepare_data
from regmix.errors import ConfigError
from regmix.mixtures import plan_proxies, token_prior
from regmix.train.loop import evaluate, train_lm
from regmix.train.proxy import run_train_proxies
from tests.conftest import tiny_config_dict


def with_target(spec, **overrides) -> dict:
    """The small corpus with `licenses` as a target-only set, and it as the target."""
    config = tiny_config_dict(spec, regression={"folds": 4, "target": "licenses"}, **overrides)
    config["corpus"]["target_only"] = ["licenses"]
    return config


@pytest.fixture(scope="module")
def target_data(tmp_path_factory, corpus_spec) -> TokenData:
    config = parse_config(with_target(corpus_spec))
    out = tmp_path_factory.mktemp("target-data")
    prepare_data(config.corpus, config.tokenizer, out)
    return TokenData.open(out)


def test_a_target_only_set_is_prepared_as_validation_tokens_only(target_data, prepared_data):
    assert target_data.domains == ["code", "changelogs"]
    assert target_data.targets == ["licenses"]
    assert target_data.validation_domains == ["code", "changelogs", "licenses"]
    assert target_data.meta["tokens"]["licenses"] == {"validation": 1024}
    assert target_data.array("validation", "licenses").size == 1024
    assert not (target_data.arrays / "train" / "licenses.npy").exists()
    # The training domains' prior and token counts leave it out; the data is another data
    assert target_data.train_tokens().shape == (2,)
    assert target_data.fingerprint != prepared_data.fingerprint


def test_no_mixture_weighs_a_target_only_set(target_data, corpus_spec):
    config = parse_config(with_target(corpus_spec, mixtures={"count": 8, "max_epochs": 50}))
    mixtures = [m for task in plan_proxies(config, target_data.meta) for m in task["mixtures"]]
    assert len(mixtures) == 8
    assert all(set(m["weights"]) == {"code", "changelogs"} for m in mixtures)
    assert token_prior(target_data.train_tokens(), 1.0).shape == (2,)


def test_every_model_is_measured_on_it_and_it_can_be_the_target(target_data, corpus_spec, tracking):
    model = train_lm(target_data, {"code": 0.5, "changelogs": 0.5}, SHAPES["tiny-proxy"],
                     parse_config(with_target(corpus_spec)).proxy.train, 0)[0]
    assert set(evaluate(model, target_data)) == {"code", "changelogs", "licenses"}
    config = parse_config(with_target(corpus_spec))
    assert config.regression.target_weights(target_data.domains) == {"licenses": 1.0}
    config.check_domains(target_data.domains, target_data.targets, target_data.meta)
    task = plan_proxies(config, target_data.meta)[0]
    task["mixtures"] = task["mixtures"][:1]
    (result,) = run_train_proxies(config, task, str(target_data.root), tracking)["results"]
    assert set(result["val_loss"]) == {"code", "changelogs", "licenses"}
    # The run logged it like any other domain's loss
    run = mlflow.MlflowClient(tracking["uri"]).get_run(result["run_id"])
    assert run.data.metrics["val_loss.licenses"] == pytest.approx(result["val_loss"]["licenses"])
    assert run.data.metrics["target_loss"] == pytest.approx(result["val_loss"]["licenses"])
    assert "weight.licenses" not in run.data.params


@pytest.mark.parametrize(("section", "value"), [
    ("search", {"max_weight": {"licenses": 0.5}}),
    ("search", {"fixed": {"licenses": 0.1}}),
    ("large", {"model": {"shape": "tiny-large"}, "train": {"tokens": 16384, "batch_size": 8},
               "extra_baselines": {"mine": {"code": 0.5, "licenses": 0.5}}}),
])
def test_a_target_only_set_named_in_a_mixture_or_bound_is_refused(corpus_spec, section, value):
    config = parse_config(with_target(corpus_spec, **{section: value}))
    with pytest.raises(ConfigError, match=r"\['licenses'\] are target-only sets \(role: target\)"):
        config.check_domains(["code", "changelogs"], ["licenses"])


def test_roles_come_from_the_domain_or_the_corpus_and_leave_two_to_train(corpus_spec, tmp_path):
    spec = yaml.safe_load(corpus_spec.read_text())
    spec["domains"][2]["role"] = "target"
    (tmp_path / "corpus.yaml").write_text(yaml.safe_dump(spec))
    for name in ("code.jsonl", "changelogs.jsonl", "licenses.jsonl"):
        (tmp_path / name).symlink_to(corpus_spec.parent / name)
    corpus = CorpusConfig(spec=str(tmp_path / "corpus.yaml"), validation_tokens=64)
    sources = read_corpus_spec(tmp_path / "corpus.yaml")
    assert domain_roles(corpus, sources) == (["code", "changelogs"], ["licenses"])
    assert preflight(corpus, TokenizerConfig()) == (["code", "changelogs"], ["licenses"])
    with pytest.raises(ConfigError, match=r"at least 2 training domains, found 1 .* `role: train`"):
        corpus.model_copy(update={"target_only": ["code"]}).roles(
            [s.name for s in sources], ["licenses"])
    with pytest.raises(ConfigError, match=r"corpus.target_only: unknown domain\(s\) \['wiki'\]"):
        corpus.model_copy(update={"target_only": ["wiki"]}).roles([s.name for s in sources])


def test_the_target_may_name_a_target_only_set_but_only_a_known_one(corpus_spec):
    config = parse_config(with_target(corpus_spec))
    config.check_domains(["code", "changelogs"], ["licenses"])
    with pytest.raises(ConfigError, match=r"regression.target: unknown domain\(s\) \['licenses'\]"):
        config.check_domains(["code", "changelogs"])
    assert np.isclose(sum(config.regression.target_weights(["code", "changelogs"]).values()), 1)
