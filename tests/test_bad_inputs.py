"""Every user mistake stops with exit code 2 and one message naming the field or file and the
fix; never a traceback, and no started pipeline unless only data preparation can tell. One
table, through the real CLI."""

import time

import mlflow
import pytest
import yaml

from regmix.config.loading import read_yaml
from regmix.config.sections import TokenizerConfig
from regmix.data.tokenizer import build_tokenizer, eos_id
from regmix.errors import ConfigError
from regmix.pipelines.cli import main


def config_text(spec, **changes) -> str:
    config = {
        "name": "regmix-bad",
        "corpus": {"spec": str(spec), "validation_tokens": 512},
        "proxy": {"model": {"shape": "tiny-proxy"}, "train": {"tokens": 65536}},
        "large": {"model": {"shape": "tiny-large"}, "train": {"tokens": 65536}},
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return yaml.safe_dump(config)


CONFIG_CASES = [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"proxy__epochs": 3}, "proxy.epochs: unknown key"),
    ({"seed": "zero"}, "seed: Input should be a valid integer"),
    ({"seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
    ({"regression__target": {"code": 0.5, "licenses": 0.4}}, "sum to 1 (they sum to 0.9)"),
    ({"regression__target": "wikipedia"}, "regression.target: unknown domain(s) ['wikipedia']"),
    ({"gate__spearman_threshold": 2}, "gate.spearman_threshold"),
    ({"mixtures__count": 1}, "mixtures.count"),
    ({"proxy__model__shape": "proxy-9b"}, "unknown shape 'proxy-9b'"),
    ({"corpus__tinypile": "tiny"}, "give exactly one of `tinypile`"),
    ({"proxy__train__lr": -1}, "proxy.train.lr"),
    ({"search__fixed": {"code": 0.6, "licenses": 0.6}}, "search: minimum and fixed weights sum to 1.2 > 1"),
    ({"search__max_weight": {"code": 1.5}}, "search.max_weight.code: Input should be less than or equal"),
    ({"search__min_weight": {"klingon": 0.1}}, "search: min_weight names unknown domains ['klingon']"),
    ({"search__min_weight": {"code": 0.5}, "search__max_weight": {"code": 0.2}},
     "search: domain 'code': minimum weight 0.5 above its maximum 0.2"),
    ({"large__extra_baselines": {"mine": {"code": 0.7}}}, "large.extra_baselines.mine"),
    ({"large__extra_baselines": {"mine": {"code": 1.5, "licenses": -0.5}}},
     "large.extra_baselines.mine: negative weight(s) for ['licenses']"),
    ({"tokenizer__kind": "file"}, "tokenizer.kind 'file' needs `path`"),
    ({"tokenizer__kind": "file", "tokenizer__path": "/nope/tokenizer.json"},
     "tokenizer.path: no file at '/nope/tokenizer.json'"),
    ({"tokenizer__kind": "file", "tokenizer__path": __file__},
     f"tokenizer.path: '{__file__}' is not a tokenizers JSON file"),
    ({"proxy__model__shape": {"n_layer": 1, "n_embd": 32, "n_head": 2, "mlp_hidden": 64}},
     "proxy.model.shape.context: required; add it"),
    ({"rank_check__mixtures": 4}, "rank_check with mixtures > 0 needs `model` and `train`"),
    ({"rank_check__mixtures": 2, "rank_check__model": {"shape": "tiny-large"},
      "rank_check__train": {"tokens": 1000}}, "a rank correlation needs at least 3"),
    ({"gate__proxies": 1}, "gate.proxies"),
    ({"name": "Bad Name"}, "name: 'Bad Name': use lowercase letters"),
    ({"corpus__spec": None, "corpus__domains": [{"name": "a", "path": "a.txt"}]},
     "corpus.domains: a mixture needs at least 2 domains, found 1"),
    ({"proxy__train__micro_batch_size": 3}, "multiple of micro_batch_size"),
    ({"proxy__train__betas": [0.9, 1.5]}, "proxy.train.betas.1: Input should be less than 1"),
    ({"proxy__model__shape": {"n_layer": 1, "n_embd": 30, "n_head": 2, "mlp_hidden": 64,
                              "context": 64}}, "the head size n_embd / n_head (15) must be even"),
    ({"corpus__validation_tokens": 32},
     "corpus.validation_tokens (32) must exceed proxy.model's context (64)"),
    ({"large__extra_baselines": {"mine (50%)": {"code": 1.0}}},
     "large.extra_baselines.mine (50%).[key]: 'mine (50%)': use letters, digits, '_', '.' and '-'"),
]


@pytest.mark.parametrize(("changes", "message"), CONFIG_CASES)
def test_bad_config(tmp_path, capsys, corpus_spec, changes, message):
    config = tmp_path / "c.yaml"
    config.write_text(config_text(corpus_spec, **changes))
    assert_user_error(capsys, ["run", "--config", str(config)], message)


def corpus_case(tmp_path, files: dict[str, bytes], path: str) -> str:
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    spec = tmp_path / "corpus.yaml"
    spec.write_text(yaml.safe_dump({"domains": [{"name": "a", "path": path},
                                                {"name": "b", "path": "b.jsonl"}]}))
    (tmp_path / "b.jsonl").write_text('{"text": "%s"}\n' % ("word " * 400))
    return config_text(spec)


CORPUS_CASES = [
    ({}, "missing/*.jsonl", "domain 'a': no .jsonl/.json/.txt/.parquet files"),
    ({"a.txt": b"\xff\xfe bad bytes " * 100}, "a.txt", "is not UTF-8 text"),
    ({"a.jsonl": b'{"text": "tiny"}\n'}, "a.jsonl", "cannot hold a 512-token validation split"),
    ({"a.jsonl": b"", "a.txt": b"x"}, "a.*", "mixes file kinds"),
    ({"a.jsonl": b'{"content": "x"}\n' * 200}, "a.jsonl",
     "a.jsonl has no 'text' field (it has ['content']); set the domain's `text_column`"),
    ({"a.jsonl": b"plain text, not JSON\n" * 200}, "a.jsonl", "the first record is not JSON"),
    ({"a.parquet": b"not parquet" * 200}, "a.parquet", "a.parquet is not a Parquet file"),
]


@pytest.mark.parametrize(("files", "path", "message"), CORPUS_CASES)
def test_bad_corpus(tmp_path, capsys, files, path, message):
    config = tmp_path / "c.yaml"
    config.write_text(corpus_case(tmp_path, files, path))
    assert_user_error(capsys, ["run", "--config", str(config)], message)


def test_missing_and_malformed_config_files(tmp_path, capsys):
    assert_user_error(capsys, ["run", "--config", str(tmp_path / "no.yaml")], "config file not found")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    assert_user_error(capsys, ["run", "--config", str(tmp_path / "bad.yaml")], "not valid YAML")
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert_user_error(capsys, ["run", "--config", str(tmp_path / "list.yaml")],
                      "top level must be a mapping")
    (tmp_path / "twice.yaml").write_text("name: x\nsearch: {method: paper}\nsearch: {}\n")
    assert_user_error(capsys, ["run", "--config", str(tmp_path / "twice.yaml")],
                      "twice.yaml, line 3, column 1: not valid YAML: duplicate key 'search'")
    (tmp_path / "merged.yaml").write_text("base: &b {lr: 0.1}\nother: {<<: *b, lr: 0.2}\n")

    assert read_yaml(tmp_path / "merged.yaml", ConfigError)["other"] == {"lr": 0.2}  # merge keys
    (tmp_path / "latin1.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert_user_error(capsys, ["run", "--config", str(tmp_path / "latin1.yaml")],
                      "latin1.yaml: not UTF-8 text (byte 9); save it as UTF-8")


def mixtures_csv(rows: list[str], header="index,a,b,c") -> str:
    return "\n".join([header, *rows]) + "\n"


GOOD_ROWS = [f"{i},0.{i},0.{9 - i},0.1" for i in range(1, 9)]
GOOD_LOSSES = mixtures_csv([f"{i},{3 + i / 10}" for i in range(1, 9)], "index,loss")

CSV_CASES = [
    (mixtures_csv(GOOD_ROWS, "a,b,c"), GOOD_LOSSES, "no 'index' column"),
    (mixtures_csv(GOOD_ROWS[:-1] + ["8,nan,0.9,0.1"]), GOOD_LOSSES, "'nan' is not finite"),
    (mixtures_csv(GOOD_ROWS[:-1] + ["8,inf,0.9,0.1"]), GOOD_LOSSES, "'inf' is not finite"),
    (mixtures_csv(GOOD_ROWS[:-1] + ["8,-0.1,1.0,0.1"]), GOOD_LOSSES, "negative weight -0.1"),
    # An overflowed loss or weight is finite but fits nothing (CV RMSE nan): the row is named
    (mixtures_csv(GOOD_ROWS), GOOD_LOSSES.replace("\n8,3.8", "\n8,1e308"),
     "l.csv, line 9, column 'loss': '1e308' is beyond ±1e+06, not a loss or weight"),
    (mixtures_csv(GOOD_ROWS[:-1] + ["8,1e308,0.9,0.1"]), GOOD_LOSSES,
     "m.csv, line 9, column 'a': '1e308' is beyond ±1e+06"),
    (mixtures_csv(GOOD_ROWS[:-1] + ["8,0.5,0.9,0.1"]), GOOD_LOSSES, "weights sum to 1.5, not 1 ("),
    (GOOD_LOSSES, GOOD_LOSSES, "(is this the losses file? check --mixtures and --losses)"),
    (mixtures_csv(GOOD_ROWS), mixtures_csv([f"{i},3.5" for i in range(1, 9)], "index,loss"),
     "--target 'loss': the target is the same (3.5) on every row"),
    (mixtures_csv(GOOD_ROWS), mixtures_csv([f"{i},{3.5 + i * 1e-13}" for i in range(1, 9)],
                                           "index,loss"),
     "--target 'loss': the target is the same (3.5) on every row (to 1e-09 of its size)"),
    (mixtures_csv(GOOD_ROWS[:-1] + ["9,0.1,0.8,0.1"]), GOOD_LOSSES, "the 'index' columns differ"),
    (mixtures_csv(GOOD_ROWS[:3]), mixtures_csv(["1,3", "2,3", "3,3"], "index,loss"),
     "3 rows for 3 domains"),
    (mixtures_csv(GOOD_ROWS[:-1] + ["8,abc,0.9,0.1"]), GOOD_LOSSES, "'abc' is not a number"),
    (mixtures_csv(GOOD_ROWS + ["8,0.1,0.8,0.1"]), GOOD_LOSSES, "duplicate index 8"),
    (mixtures_csv(GOOD_ROWS[:-1] + ["8,0.1,0.9"]), GOOD_LOSSES, "3 cells but the header has 4"),
    ("", GOOD_LOSSES, "the file is empty"),
    (mixtures_csv(GOOD_ROWS), mixtures_csv([f"{i},{3 + i / 10}" for i in range(1, 9)],
                                           "index,other"),
     "--target 'loss': unknown target column(s) ['loss']"),
    (mixtures_csv([row.replace(",", ";") for row in GOOD_ROWS], "index;a;b;c"), GOOD_LOSSES,
     "the header is one column separated by ';'; save the file with commas between columns"),
    (mixtures_csv([f"{i},{i}0,{9 - i}0,10" for i in range(1, 9)]), GOOD_LOSSES,
     "weights sum to 100, not 1 (percentages? divide every weight by 100)"),
]


@pytest.mark.parametrize(("mixtures", "losses", "message"), CSV_CASES)
def test_bad_csv(tmp_path, capsys, mixtures, losses, message):
    (tmp_path / "m.csv").write_text(mixtures)
    (tmp_path / "l.csv").write_text(losses)
    args = ["fit", "--mixtures", str(tmp_path / "m.csv"), "--losses", str(tmp_path / "l.csv"),
            "--target", "loss", "--out", str(tmp_path / "model")]
    assert_user_error(capsys, args, message)


def test_bad_cli_values(tmp_path, capsys):
    assert_user_error(capsys, ["fit", "--mixtures", str(tmp_path / "none.csv"), "--losses",
                               str(tmp_path / "gone.csv"), "--target", "x", "--out",
                               str(tmp_path)], "file not found")
    assert_user_error(capsys, ["predict", "--model", str(tmp_path), "--mixtures", "m.csv",
                               "--out", "p.csv"], "no targets.json")
    (tmp_path / "targets.json").write_text('{"loss": "gone"}')
    assert_user_error(capsys, ["predict", "--model", str(tmp_path), "--mixtures", "m.csv",
                               "--out", "p.csv"], "unreadable model folder (FileNotFoundError")
    (tmp_path / "m.csv").write_bytes("index,caf\u00e9\n1,1\n".encode("latin-1"))
    (tmp_path / "l.csv").write_text(GOOD_LOSSES)
    assert_user_error(capsys, ["fit", "--mixtures", str(tmp_path / "m.csv"), "--losses",
                               str(tmp_path / "l.csv"), "--target", "x", "--out",
                               str(tmp_path / "out")], "m.csv: not UTF-8 text (byte 9)")
    (tmp_path / "m.csv").write_text(mixtures_csv(GOOD_ROWS))
    assert_user_error(capsys, ["fit", "--mixtures", str(tmp_path / "m.csv"), "--losses",
                               str(tmp_path / "l.csv"), "--target", "x=nan", "--out",
                               str(tmp_path / "out")], "needs a name and a finite weight")
    assert_user_error(capsys, ["fit", "--mixtures", str(tmp_path / "m.csv"), "--losses",
                               str(tmp_path / "m.csv"), "--target", "a", "--out",
                               str(tmp_path / "out")], "--mixtures and --losses are both")
    assert_user_error(capsys, ["fit", "--mixtures", str(tmp_path / "m.csv"), "--losses",
                               str(tmp_path / "l.csv"), "--target", "loss", "--model",
                               "per-domain", "--out", str(tmp_path / "out")],
                      "--target 'loss': model 'per-domain' needs a target over several loss")


def test_services_out_of_reach_are_one_line(tmp_path, capsys, corpus_spec):
    assert_user_error(capsys, ["report", "x", "--experiment", "e", "--tracking-uri", str(tmp_path)],
                      f"tracking URI '{tmp_path}': The filesystem tracking backend")
    assert_user_error(capsys, ["export", "--experiment", "x", "--tracking-uri", "bogus://x",
                               "--mixtures", "m.csv", "--losses", "l.csv"],
                      "tracking URI 'bogus://x'")
    assert_user_error(capsys, ["report", "x", "--experiment", "e", "--tracking-uri", f"sqlite:///{tmp_path}/typo.db"],
                      "typo.db': no MLflow store there")
    assert not (tmp_path / "typo.db").exists()  # not made, empty, by the check
    store = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(store).create_experiment("e")
    assert_user_error(capsys, ["report", "nope", "--experiment", "e", "--tracking-uri", store],
                      "no runs tagged regmix.pipeline_run=nope in experiment 'e'; give the label")
    assert_user_error(capsys, ["report", "nope", "--experiment", "f", "--tracking-uri", store],
                      "no MLflow experiment 'f' at")
    # Fault drill: a tracking server that does not answer is named before the pipeline starts
    (tmp_path / "c.yaml").write_text(config_text(corpus_spec))
    started = time.monotonic()
    assert main(["run", "--config", str(tmp_path / "c.yaml"), "--tracking-uri",
                 "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("regmix: error: the MLflow server at http://127.0.0.1:9 does not answer")
    assert err.count("\n") == 1 and time.monotonic() - started < 30, err
    assert main(["runs", "--host", "http://127.0.0.1:9"]) == 1  # nothing listens on port 9
    err = capsys.readouterr().err
    assert "regmix: error: cannot reach the KFP API at http://127.0.0.1:9" in err, err
    assert "Traceback" not in err


def assert_user_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and err.count("\n") <= 3, err


def test_a_tokenizer_without_a_known_end_of_text_token(tmp_path, capsys, corpus_spec):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"[UNK]": 0, "[SEP]": 1, "word": 2}, unk_token="[UNK]")).save(str(path))
    config = tmp_path / "c.yaml"
    config.write_text(config_text(corpus_spec, tokenizer__kind="file", tokenizer__path=str(path)))
    assert_user_error(capsys, ["run", "--config", str(config)], "set tokenizer.eos_token")
    config.write_text(config_text(corpus_spec, tokenizer__kind="file", tokenizer__path=str(path),
                                  tokenizer__eos_token="<eos>"))
    assert_user_error(capsys, ["run", "--config", str(config)],
                      "tokenizer.eos_token: the tokenizer has no token '<eos>'")
    named = TokenizerConfig(kind="file", path=str(path), eos_token="[SEP]")
    assert eos_id(build_tokenizer(named, {}), named.eos_token) == 1


# Only data preparation can tell: 2000 bytes pass the checks before the pipeline (a token is
# at least a byte), but the tokenizer makes far fewer than 512 tokens of them; a byte that is
# not UTF-8 after the first MB, which those checks read.
STAGE_CASES = [
    (b'{"text": "%s"}\n' % (b"ab" * 100) * 10, "lower corpus.validation_tokens"),
    (b'{"text": "%s"}\n' % (b"word " * 200) * 1200 + b'{"text": "\xff"}\n',
     "a.jsonl is not UTF-8 text (byte 1215610)"),
]


@pytest.mark.parametrize(("documents", "message"), STAGE_CASES)
def test_an_error_only_data_preparation_sees_still_ends_in_one_line(tmp_path, capsys,
                                                                     monkeypatch, documents,
                                                                     message):
    config = tmp_path / "c.yaml"
    config.write_text(corpus_case(tmp_path, {"a.jsonl": documents}, "a.jsonl"))
    monkeypatch.chdir(tmp_path)  # the pipeline root, mlruns/
    # Fault drill: the run's tasks leave no temporary folders (each KFP task's `mktemp -d`)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    assert main(["run", "--config", str(config), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err
    assert "regmix: error: domain 'a':" in err and message in err, err
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_stage_that_fails_states_its_root_cause_on_the_last_line(tmp_path, capsys,
                                                                  monkeypatch):
    """Fault drill: the cache is a file, not a folder. The stage fails with an OSError; the
    run's last line states it, not only the failed task's name."""
    config = tmp_path / "c.yaml"
    documents = b'{"text": "%s"}\n' % (b"word " * 200) * 400
    config.write_text(corpus_case(tmp_path, {"a.jsonl": documents}, "a.jsonl"))
    (tmp_path / "b.jsonl").write_bytes(documents)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("REGMIX_CACHE", str(tmp_path / "not-a-folder"))
    assert main(["run", "--config", str(config), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # Every proxy failed alike: the cause once, with how many it hit, and no colour codes
    assert "m0000 and 31 more: NotADirectoryError: [Errno 20] Not a directory:" in last, last
    assert "not-a-folder/locks" in last and "its log:" in last and "\x1b" not in last
    assert len(last) < 1000
