import pytest
import yaml

from regmix.config.loading import load_config, parse_config
from regmix.errors import ConfigError
from tests.conftest import tiny_config_dict

SHAPE = {"n_layer": 1, "n_embd": 32, "n_head": 2, "mlp_hidden": 64, "context": 64}


def test_shipped_configs_load():
    for name in ("local", "tiny"):
        config = load_config(f"configs/{name}.yaml")
        assert config.mixtures.count >= 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"proxy": {"epochs": 3}}, "proxy.epochs: unknown key"),
        ({"seed": "zero"}, "seed: Input should be a valid integer"),
        ({"mixtures": {"count": 1}}, "mixtures.count"),
        ({"mixtures": {"strength_min": 9}}, "strength_min must be <= strength_max"),
        ({"proxy": {"model": {"shape": "proxy-9b"}}}, "unknown shape 'proxy-9b'"),
        ({"proxy": {"model": {"shape": {**SHAPE, "n_layer": 0}}}},
         "proxy.model.shape: model shape: n_layer must be positive"),
        ({"proxy": {"model": {"shape": {**SHAPE, "layers": 2}}}},
         "proxy.model.shape.layers: unknown key"),
        ({"proxy": {"model": {"shape": {**SHAPE, "n_head": 3}}}}, "n_embd .32. must divide by n_head .3."),
        ({"corpus": {"tinypile": "tiny"}}, "give exactly one of `tinypile`"),
        ({"proxy": {"train": {"tokens": 100, "batch_size": 8, "micro_batch_size": 3}}},
         "multiple of micro_batch_size"),
        ({"gate": {"spearman_threshold": 1.5}}, "gate.spearman_threshold"),
        ({"name": "Has Spaces"}, "name: 'Has Spaces': use lowercase letters, digits and '-'"),
        ({"name": False}, "name: YAML read this as the boolean false; quote it"),
        ({"proxy": {"train": {"tokens": "2e5", "batch_size": 8}}},
         "proxy.train.tokens: YAML read '2e5' as text, not a number; write it in digits: 200000"),
        ({"cluster": {"proxy": {"memory": "32GB"}}},
         "cluster.proxy.memory: '32GB': use a Kubernetes memory quantity, such as 64Gi"),
        # /dev/shm counts against the GPU pod's memory limit (64Gi > 32Gi, 40G > 32Gi = 34.4G)
        ({"cluster": {"shm_size": "64Gi", "proxy": {"gpus": 1, "memory": "32Gi"}}},
         "cluster.shm_size .64Gi. must be below cluster.proxy.memory .32Gi.: /dev/shm is "
         "memory-backed .* lower cluster.shm_size or raise cluster.proxy.memory"),
        ({"cluster": {"shm_size": "40G", "large": {"gpus": 8, "memory": "32Gi"}}},
         "cluster.shm_size .40G. must be below cluster.large.memory .32Gi."),
        # Search bounds no mixture meets fail when the config loads (compile and submit too),
        # not after the data is prepared
        ({"search": {"max_epochs": float("inf")}}, "search.max_epochs: Input should be a finite number"),
        ({"search": {"min_weight": {"code": float("nan")}}}, "search.min_weight.code: Input should be a"),
        ({"search": {"max_weight": {"code": 1.5}}}, "search.max_weight.code: Input should be less than"),
        ({"search": {"fixed": {"code": 0.7, "licenses": 0.6}}}, "search: minimum and fixed weights sum to"),
        ({"search": {"min_weight": {"code": 0.5}, "max_weight": {"code": 0.4}}},
         "search: domain 'code': minimum weight 0.5 above its maximum 0.4"),
        ({"large": {"extra_baselines": {"uniform": {"code": 1.0}}}},
         r"large.extra_baselines: \['uniform'\] name built-in mixtures"),
        ({"regression": {"model": "per-domain", "target": "code"}},
         "regression: model 'per-domain' fits a target over several domains"),
        ({"regression": {"model": "per-domain", "target": {"code": 1.0}}},
         "set regression.target to mean or to weights over domains"),
        ({"regression": {"per_domain_max_seconds": -1}}, "regression.per_domain_max_seconds"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"mixtures": {"count": 2}}, "mixtures.count: Input should be greater than or equal to 3"),
        ({"proxy": {"train": {"tokens": 100, "batch_size": 8}}},
         "proxy.train.tokens .100. is less than one step.s batch_size x context = 512 tokens"),
    ],
)
def test_bad_values_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("`", "`")):
        parse_config(tiny_config_dict(tmp_path / "c.yaml", **overrides))


def test_shm_size_is_checked_only_against_the_memory_of_gpu_pods(tmp_path):
    # a CPU pod gets no /dev/shm; a GPU pod's limit one byte above 16Gi leaves room
    cluster = {"shm_size": "16Gi", "cpu": {"memory": "8Gi"},
               "proxy": {"gpus": 1, "memory": str(16 * 2**30 + 1)}}
    config = parse_config(tiny_config_dict(tmp_path / "c.yaml", cluster=cluster))
    assert config.cluster.proxy.memory == "17179869185"
    with pytest.raises(ConfigError, match="cluster.shm_size .16Gi. must be below cluster.proxy"):
        parse_config(tiny_config_dict(tmp_path / "c.yaml", cluster={
            **cluster, "proxy": {"gpus": 1, "memory": str(16 * 2**30)}}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"regression": {"target": "klingon"}}, r"regression.target: unknown domain\(s\) \['klingon'\]"),
        ({"regression": {"target": {"code": 0.5, "licenses": 0.2}}}, "sum to 1"),
        ({"search": {"max_weight": {"nope": 0.5}}}, r"search: max_weight names unknown domains \['nope'\]"),
        ({"search": {"max_weight": {"code": 0.3, "changelogs": 0.3, "licenses": 0.3}}},
         "search: maximum weights .* sum to 0.9 < 1"),
        # Only the settings given are named as the cause
        ({"search": {"fixed": {"code": 0.3, "changelogs": 0.3, "licenses": 0.3}}},
         r"search: maximum weights \(fixed\) sum to 0.9 < 1: no mixture fits; raise the fixed weights"),
    ],
)
def test_domain_checks(tmp_path, overrides, message):
    config = parse_config(tiny_config_dict(tmp_path / "c.yaml", **overrides))
    with pytest.raises(ConfigError, match=message):
        config.check_domains(["code", "changelogs", "licenses"])


def test_weights_as_mlflow_shows_them_are_a_mixture(tmp_path):
    """Weights copied from MLflow's params (6 decimals) miss 1 by rounding: accepted; a real
    miss names its sum in enough digits to see it."""
    domains = ["code", "changelogs", "licenses"]
    rounded = {"code": 0.333334, "changelogs": 0.333334, "licenses": 0.333333}
    parse_config(tiny_config_dict(tmp_path / "c.yaml", large={
        "extra_baselines": {"mine": rounded}})).check_domains(domains)
    off = parse_config(tiny_config_dict(tmp_path / "c.yaml", large={
        "extra_baselines": {"mine": {**rounded, "licenses": 0.334333}}}))
    with pytest.raises(ConfigError, match=r"large.extra_baselines.mine: .* sum to 1.001001\)"):
        off.check_domains(domains)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_target_weights():
    config = parse_config(tiny_config_dict("x.yaml"))
    assert config.regression.target_weights(["a", "b"]) == {"a": 0.5, "b": 0.5}


def test_overrides_set_one_setting_and_reject_malformed_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict("corpus.yaml")))
    config = load_config(path, ["regression.target=code", "active_learning.rounds=2",
                                "large.baselines=[prior, uniform]"])
    assert config.regression.target == "code" and config.active_learning.rounds == 2
    assert config.large.baselines == ["prior", "uniform"]
    with pytest.raises(ConfigError, match="write it as section.key=value"):
        load_config(path, ["regression.target"])
    with pytest.raises(ConfigError, match="'seed' is not a config section"):
        load_config(path, ["seed.value=1"])
    with pytest.raises(ConfigError, match="active_learning.rounds"):
        load_config(path, ["active_learning.rounds=-1"])


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    config = tiny_config_dict("unused.yaml", tokenizer={"kind": "file", "path": "tok.json"})
    config["corpus"] = {"domains": [{"name": "a", "path": "data/a.jsonl"},
                                    {"name": "b", "path": "/abs/b/*.jsonl"},
                                    {"name": "c", "hf_path": "org/set"}]}
    (tmp_path / "cfg" / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    loaded = load_config("cfg/c.yaml")
    assert [d.path for d in loaded.corpus.domains] == ["cfg/data/a.jsonl", "/abs/b/*.jsonl", None]
    assert loaded.tokenizer.path == "cfg/tok.json"
    # `~` as a shell would expand it, in the spec's and the tokenizer's paths too
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config["corpus"] = {"spec": "~/corpus.yaml"}
    config["tokenizer"]["path"] = "~/tok.json"
    (tmp_path / "cfg" / "c.yaml").write_text(yaml.safe_dump(config))
    loaded = load_config("cfg/c.yaml")
    assert loaded.corpus.spec == str(tmp_path / "home" / "corpus.yaml")
    assert loaded.tokenizer.path == str(tmp_path / "home" / "tok.json")


def test_a_message_naming_its_field_is_not_prefixed_twice(tmp_path):
    corpus = {"spec": None, "domains": [{"name": "a", "path": "a.txt"}]}
    with pytest.raises(ConfigError) as raised:
        parse_config(tiny_config_dict(tmp_path / "c.yaml", corpus=corpus))
    assert "\n  corpus.domains: a mixture needs at least 2 domains" in str(raised.value)
