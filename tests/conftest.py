"""Shared fixtures: a small real-text corpus built from files every machine of ours has."""

import gzip
import json
import sysconfig
from pathlib import Path

import pytest
import yaml

from regmix.config.loading import parse_config
from regmix.data.prepare import TokenData, prepare_data
from regmix.data.tinypile.builder import DEFAULT_DIR
from regmix.tracking.runs import start_pipeline_run

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _write_domain(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))


def small_corpus(root: Path, docs_per_domain: int = 40) -> Path:
    """Three real-text domains (Python code, Debian changelogs, licenses) as jsonl + spec YAML."""
    root.mkdir(parents=True, exist_ok=True)
    code = [p.read_text(errors="replace")[:6000] for p in sorted(STDLIB.glob("*.py"))[:docs_per_domain]]
    changelogs = [gzip.decompress(p.read_bytes()).decode(errors="replace")[:6000]
                  for p in sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz"))[:docs_per_domain]]
    licenses = [p.read_text(errors="replace")[:6000]
                for p in sorted(Path("/usr/share/common-licenses").iterdir()) if p.is_file()]
    licenses += [(STDLIB / "LICENSE.txt").read_text()[i:i + 3000] for i in range(0, 12000, 3000)]
    domains = {"code": code, "changelogs": changelogs, "licenses": licenses}
    for name, texts in domains.items():
        _write_domain(root / f"{name}.jsonl", texts)
    spec = root / "corpus.yaml"
    spec.write_text(yaml.safe_dump({"name": "small", "domains": [
        {"name": n, "path": f"{n}.jsonl"} for n in domains]}))
    return spec


def pytest_collection_modifyitems(items):
    """The end-to-end file first: it takes most of the run, so with two workers (addopts) it
    starts at once and everything else runs beside it rather than after it."""
    items.sort(key=lambda item: item.path.name != "test_e2e.py")


@pytest.fixture(scope="session", autouse=True)
def regmix_cache(tmp_path_factory):
    """Checkpoints and kept results go to a fresh folder per session; the tinypile build (slow,
    from the network) stays shared through a link."""
    cache = tmp_path_factory.mktemp("regmix-cache")
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    (cache / "tinypile").symlink_to(DEFAULT_DIR)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REGMIX_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def corpus_spec(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config_dict(spec: Path, **overrides) -> dict:
    """A config small enough to train proxies in about a second each."""
    config = {
        "name": "regmix-test",
        "seed": 0,
        "corpus": {"spec": str(spec), "validation_tokens": 1024},
        "tokenizer": {"vocab_size": 512, "train_bytes_per_domain": 200_000},
        "mixtures": {"count": 8, "max_epochs": 20},
        "proxy": {"model": {"shape": "tiny-proxy"},
                  "train": {"tokens": 8192, "batch_size": 8, "lr": 0.01}, "per_task": 4},
        "regression": {"folds": 4},
        "search": {"trials": 200, "max_epochs": None, "allow_extrapolation": True},
        "gate": {"proxies": 5},
        "large": {"model": {"shape": "tiny-large"}, "train": {"tokens": 16384, "batch_size": 8}},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def corpus_and_tokenizer(spec: Path):
    """The corpus and tokenizer sections of `tiny_config_dict`, validated."""
    config = parse_config(tiny_config_dict(spec))
    return config.corpus, config.tokenizer


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, corpus_spec):
    """The small corpus, tokenized and packed once for the whole session."""
    out = tmp_path_factory.mktemp("data")
    prepare_data(*corpus_and_tokenizer(corpus_spec), out)
    return TokenData.open(out)


@pytest.fixture
def tracking(tmp_path) -> dict:
    """A real MLflow store (SQLite) in a temp folder, with a parent run to nest under."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return start_pipeline_run(uri, "regmix-test", "test-run", {"test": True})


