import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import regmix.data.corpus
import regmix.data.prepare
from regmix.config.loading import parse_config
from regmix.config.sections import CorpusConfig, DomainSource, TokenizerConfig
from regmix.data.corpus import load_documents, preflight, read_corpus_spec
from regmix.data.prepare import (
    TokenData,
    data_settings,
    hold_out,
    pack,
    prepare_data,
    run_prepare_data,
    save_chunks,
    train_chunks,
)
from regmix.data.tokenizer import build_tokenizer
from regmix.errors import CorpusError
from tests.conftest import corpus_and_tokenizer, small_corpus, tiny_config_dict


def test_pack_puts_eos_between_documents():
    packed = pack([[5, 6], [7]], eos=0, dtype=np.uint16)
    assert packed.tolist() == [5, 6, 0, 7, 0]
    assert pack([], eos=0, dtype=np.uint16).size == 0  # a batch whose documents are all held out


def encode_ids(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer for the split tests: a document 'a b c' is the ids [a, b, c]."""
    return [[int(t) for t in text.split()] for text in texts]


def test_split_holds_out_whole_documents_exactly():
    docs = [" ".join([str(i)] * 10) for i in range(1, 21)]
    validation, held_out, unused = hold_out("d", docs, encode_ids, 25, seed=0, eos=0,
                                            dtype=np.uint16)
    assert validation.size == 25 and len(held_out) == 3  # 11 tokens (EOS included) a document
    assert unused == 3 * 11 - 25  # the third document's tail
    train = np.concatenate(list(train_chunks(docs, held_out, encode_ids, 0, np.uint16, None)))
    assert {int(t) for t in validation if t}.isdisjoint({int(t) for t in train if t})
    assert train.size == 17 * 11  # every other document, whole, in corpus order
    assert [int(t) for t in train[::11]] == [i for i in range(1, 21) if i - 1 not in held_out]
    again, _, _ = hold_out("d", docs, encode_ids, 25, 0, 0, np.uint16)
    assert again.tolist() == validation.tolist()


def test_training_tokens_stream_in_batches_up_to_the_cap(monkeypatch, tmp_path):
    for module in (regmix.data.corpus, regmix.data.prepare):
        monkeypatch.setattr(module, "DOCUMENTS_PER_BATCH", 3)
    docs = [" ".join([str(i)] * 4) for i in range(1, 11)]
    chunks = list(train_chunks(docs, np.array([1, 5]), encode_ids, 0, np.uint16, None))
    assert [c.size for c in chunks] == [10, 10, 15, 5]  # 5 tokens a document, 2 held out
    capped = list(train_chunks(docs, np.array([1, 5]), encode_ids, 0, np.uint16, 12))
    assert [c.size for c in capped] == [10, 2]  # stops reading once the cap is reached
    digest = hashlib.sha256()
    size = save_chunks(tmp_path / "t.npy", iter(chunks), np.uint16, digest)
    saved = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert size == saved.size == 40 and saved.tolist() == np.concatenate(chunks).tolist()
    assert digest.hexdigest() == hashlib.sha256(np.concatenate(chunks).tobytes()).hexdigest()
    for dtype, values in ((np.uint32, [np.arange(70_000, 70_010, dtype=np.uint32)]), (np.uint16, [])):
        size = save_chunks(tmp_path / "u.npy", iter(values), dtype, hashlib.sha256())
        loaded = np.load(tmp_path / "u.npy", mmap_mode="r")
        assert loaded.dtype == dtype and loaded.size == size == sum(v.size for v in values)


def test_split_rejects_a_domain_smaller_than_its_validation_set():
    with pytest.raises(CorpusError, match="domain 'd'.*lower corpus.validation_tokens"):
        hold_out("d", ["1 2", "3 4"], encode_ids, 100, 0, 0, np.uint16)
    # Lowering validation_tokens cannot split one document: the message says what can
    with pytest.raises(CorpusError, match="domain 'd': one document cannot be split.*split it"):
        hold_out("d", [" ".join(["1"] * 1000)], encode_ids, 10, 0, 0, np.uint16)


def test_a_long_held_out_documents_unused_tail_is_reported(tmp_path, caplog):

    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "a.txt").write_text("word " * 20_000)  # one long document...
    (tmp_path / "big" / "b.txt").write_text("small text " * 200)
    (tmp_path / "other.jsonl").write_text('{"text": "other words here"}\n' * 400)
    corpus = CorpusConfig(domains=[{"name": "big", "path": str(tmp_path / "big")},
                                   {"name": "other", "path": str(tmp_path / "other.jsonl")}],
                          validation_tokens=64)
    with caplog.at_level("WARNING", logger="regmix.data"):  # seed 1 holds out a.txt first
        meta = prepare_data(corpus, TokenizerConfig(vocab_size=300), tmp_path / "out", seed=1)
    assert meta["tokens"]["big"]["train"] < 1000  # ...so only b.txt trains: its tail is lost
    assert "domain 'big':" in caplog.text and "are in neither split" in caplog.text
    assert "domain 'other':" not in caplog.text


def test_prepare_data_stage(tmp_path, corpus_spec):
    out = tmp_path / "data"
    settings = data_settings(parse_config(tiny_config_dict(corpus_spec)))
    meta = run_prepare_data(settings, out)
    assert meta["domains"] == ["code", "changelogs", "licenses"]
    data = TokenData.open(out)
    assert data.vocab_size == 512 and len(meta["fingerprint"]) == 16
    for domain in data.domains:
        assert data.array("validation", domain).size == 1024
        assert data.array("train", domain).size == meta["tokens"][domain]["train"] > 10_000
        assert data.array("train", domain).max() < 512
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == meta


def test_data_preparation_sees_only_the_sections_that_decide_the_data(corpus_spec):
    """KFP caches data preparation by its inputs: other sections must not reach them."""
    config = tiny_config_dict(corpus_spec)
    settings = data_settings(parse_config(config))
    assert set(settings) == {"corpus", "tokenizer", "seed", "cluster"}
    edited = {**config, "gate": {**config.get("gate", {}), "spearman_threshold": 0.1},
              "cluster": {"proxy": {"memory": "8Gi"}}}
    assert data_settings(parse_config(edited)) == settings
    reseeded = {**config, "seed": config.get("seed", 0) + 1}
    assert data_settings(parse_config(reseeded)) != settings
    # The cached result names its arrays by their path on the shared volume.
    on_volume = {**config, "cluster": {"volume": {"claim": "regmix-data"}}}
    other_claim = {**config, "cluster": {"volume": {"claim": "regmix-data-prod"}}}
    other_mount = {**config, "cluster": {"volume": {"claim": "regmix-data", "mount_path": "/mnt"}}}
    keys = {json.dumps(data_settings(parse_config(c)), sort_keys=True)
            for c in (config, on_volume, other_claim, other_mount)}
    assert len(keys) == 4


def test_same_corpus_same_fingerprint(tmp_path, corpus_spec, prepared_data):
    meta = prepare_data(*corpus_and_tokenizer(corpus_spec), tmp_path)
    assert meta["fingerprint"] == prepared_data.fingerprint


def test_user_corpus_formats(tmp_path):
    """txt folders (one file, one document) and parquet load through `datasets`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"line one {i}\nline two\n")
    docs = load_documents(DomainSource(name="t", path="txt"), tmp_path)
    assert sorted(docs) == [f"line one {i}\nline two\n" for i in range(3)]
    pq.write_table(pa.table({"body": ["alpha", "beta"]}), tmp_path / "p.parquet")
    docs = load_documents(DomainSource(name="p", path="p.parquet", text_column="body"), tmp_path)
    assert list(docs) == ["alpha", "beta"] and docs[1] == "beta" and docs[0:1] == ["alpha"]


@pytest.mark.parametrize(
    ("files", "source", "message"),
    [
        ({}, {"name": "a", "path": "missing/*.jsonl"}, "domain 'a': no .jsonl"),
        ({"e.jsonl": '{"text": "  "}\n'}, {"name": "e", "path": "e.jsonl"}, "no non-empty documents"),
        ({"c.jsonl": '{"body": "x"}\n'}, {"name": "c", "path": "c.jsonl"}, "no column 'text'"),
        ({"b.jsonl": "{not json\n"}, {"name": "b", "path": "b.jsonl"}, "domain 'b': could not load"),
        ({"m/a.jsonl": '{"text": "a"}\n', "m/b.jsonl": '{"text": "b", "meta": 1}\n'},
         {"name": "m", "path": "m"}, "could not load json data: .*because column names don't match"),
    ],
)
def test_bad_corpora(tmp_path, files, source, message):

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(CorpusError, match=message):
        load_documents(DomainSource(**source), tmp_path)


def test_what_users_hand_over_loads_as_they_meant_it(tmp_path, caplog):
    """Hidden folders (notebook checkpoints: copies), upper-case suffixes, a byte-order mark,
    records without text, files nothing reads: loaded, skipped or reported, never silently."""
    folder = tmp_path / "web"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "a.JSONL").write_text('{"text": "alpha"}\n{"id": 2}\n{"text": 3}\n')
    (folder / ".ipynb_checkpoints" / "a.jsonl").write_text('{"text": "alpha"}\n')
    (folder / "b.jsonl.gz").write_bytes(b"\x1f\x8b")
    with caplog.at_level("WARNING", logger="regmix.data"):
        docs = load_documents(DomainSource(name="web", path="web"), tmp_path)
    assert list(docs) == ["alpha"]
    assert "domain 'web': skipping 1 file(s)" in caplog.text and "b.jsonl.gz" in caplog.text
    assert "domain 'web': 2 of 3 records have no text in 'text'" in caplog.text
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode())
    assert list(load_documents(DomainSource(name="t", path="bom.txt"), tmp_path)) == ["hello"]


def test_a_file_rewritten_with_its_old_time_is_read_again(tmp_path):
    """`datasets` caches local files by path and time: cp -p or rsync -a keep the time."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(4)))
    stamp = path.stat().st_mtime_ns
    assert len(load_documents(DomainSource(name="d", path="d.jsonl"), tmp_path)) == 4
    path.write_text('{"text": "only one"}\n')
    os.utime(path, ns=(stamp, stamp))
    assert list(load_documents(DomainSource(name="d", path="d.jsonl"), tmp_path)) == ["only one"]


def test_an_edit_of_the_same_size_and_time_changes_the_fingerprint(tmp_path):
    """Fault drill: a domain's text replaced by other text of identical size, its mtime restored
    (touch -r, cp -p): the data is prepared again from the new text, under a new fingerprint."""
    spec = small_corpus(tmp_path / "corpus", docs_per_domain=12)
    first = prepare_data(*corpus_and_tokenizer(spec), tmp_path / "a")
    path = tmp_path / "corpus" / "licenses.jsonl"
    stat, text = path.stat(), path.read_text()
    vowels = str.maketrans("aeiou", "eioua")  # same size, other text
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"].translate(vowels)}) + "\n"
                            for line in text.splitlines()))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    second = prepare_data(*corpus_and_tokenizer(spec), tmp_path / "b")
    assert second["fingerprint"] != first["fingerprint"]


def test_a_truncated_datasets_cache_is_removed_and_read_again(tmp_path, monkeypatch, caplog):
    """Fault drill: an Arrow file of the `datasets` cache cut short (a full disk, a killed copy)
    is reported, removed, and the domain's files read again."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50)))
    source = DomainSource(name="d", path="d.jsonl")
    first = list(load_documents(source, tmp_path))
    arrows = sorted((tmp_path / "hf").rglob("*.arrow"))
    assert arrows
    for arrow in arrows:
        os.truncate(arrow, arrow.stat().st_size // 2)
    assert list(load_documents(source, tmp_path)) == first
    assert "domain 'd': the datasets cache" in caplog.text and "removed" in caplog.text


def test_bytes_that_are_not_utf8_past_the_checked_head_name_the_domain_and_file(tmp_path):
    """Fault drill: the checks before the pipeline read a file's first MB; a bad byte after it
    is a one-line corpus error naming the domain, file and byte, not a UnicodeDecodeError."""
    path = tmp_path / "d.jsonl"
    good = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(5000))
    path.write_bytes(good.encode() + b'{"text": "bad \xff byte"}\n')
    assert len(good) > regmix.data.corpus.PREFLIGHT_BYTES
    with pytest.raises(CorpusError, match=f"domain 'd': {path} is not UTF-8 text "
                                          f"\\(byte {len(good) + 14}\\)"):
        load_documents(DomainSource(name="d", path=str(path)), tmp_path)


def test_a_file_in_two_domains_is_refused(tmp_path):

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.jsonl").write_text('{"text": "some web text"}\n' * 2000)
    domains = [{"name": "all", "path": str(tmp_path)}, {"name": "web", "path": str(tmp_path / "web")}]
    with pytest.raises(CorpusError, match="domains 'all' and 'web' both hold .*a.jsonl"):
        preflight(CorpusConfig(domains=domains, validation_tokens=16), TokenizerConfig())


def test_bad_spec(tmp_path):

    spec = tmp_path / "c.yaml"
    spec.write_text("domains:\n  - {name: a, path: a.jsonl}\n  - {name: a, path: b.jsonl}\n")
    with pytest.raises(CorpusError, match=r"duplicate domain name\(s\) \['a'\]"):
        read_corpus_spec(spec)
    with pytest.raises(CorpusError, match="corpus spec not found"):
        read_corpus_spec(tmp_path / "nope.yaml")


def test_corpus_spec_errors_name_the_entry_and_line(tmp_path):

    spec = tmp_path / "spec.yaml"
    spec.write_text("domains:\n  - {name: a, path: a.txt, bogus: 1}\n  - {name: b}\n")
    with pytest.raises(CorpusError) as error:
        read_corpus_spec(spec)
    assert "0.bogus: unknown key" in str(error.value)
    assert "1: domain 'b': give exactly one of `path` or `hf_path`" in str(error.value)
    spec.write_text("domains:\n  - {name: a, path: a.txt}\ndomains: []\n")
    with pytest.raises(CorpusError, match="line 3, column 1: not valid YAML: duplicate key"):
        read_corpus_spec(spec)


def test_on_a_cluster_the_arrays_live_once_on_the_shared_volume(tmp_path, corpus_spec,
                                                                 prepared_data):
    corpus, tokenizer = corpus_and_tokenizer(corpus_spec)
    volume = tmp_path / "volume" / "tokens"
    meta = prepare_data(corpus, tokenizer, tmp_path / "artifact", shared_root=volume)
    # The artifact every proxy pod would download is the meta and tokenizer only
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == ["meta.json",
                                                                          "tokenizer.json"]
    assert meta["fingerprint"] == prepared_data.fingerprint  # the same data as unshared
    assert meta["arrays"].startswith(str(volume.resolve() / meta["fingerprint"]))
    data = TokenData.open(tmp_path / "artifact")
    for domain in data.domains:
        assert np.array_equal(data.array("train", domain), prepared_data.array("train", domain))
    # A second preparation of the same data keeps the arrays there and leaves no staging behind
    again = prepare_data(corpus, tokenizer, tmp_path / "again", shared_root=volume)
    assert again == meta and [str(p) for p in volume.iterdir()] == [meta["arrays"]]
    # The same files under other domain names are the same tokens, but other file names
    renamed = tmp_path / "renamed.yaml"
    spec = yaml.safe_load(corpus_spec.read_text())
    for domain in spec["domains"]:
        domain["path"] = str(corpus_spec.parent / domain["path"])
    spec["domains"][0]["name"] = "python"  # was "code"
    renamed.write_text(yaml.safe_dump(spec))
    moved = prepare_data(corpus.model_copy(update={"spec": str(renamed)}), tokenizer,
                         tmp_path / "renamed", shared_root=volume)
    assert moved["fingerprint"] == meta["fingerprint"] and moved["arrays"] != meta["arrays"]
    assert TokenData.open(tmp_path / "renamed").array("train", "python").size > 0
    shutil.rmtree(volume)
    with pytest.raises(CorpusError, match="token arrays at .* are gone"):
        TokenData.open(tmp_path / "artifact")


def test_damaged_arrays_on_the_shared_volume_are_refused_then_prepared_again(
        tmp_path, corpus_spec, caplog):
    """Fault drill: a token array on the shared volume cut short is not read as data: opening
    it names the file, and the next preparation replaces it instead of keeping it."""
    corpus, tokenizer = corpus_and_tokenizer(corpus_spec)
    volume = tmp_path / "volume"
    meta = prepare_data(corpus, tokenizer, tmp_path / "artifact", shared_root=volume)
    array = TokenData.open(tmp_path / "artifact").arrays / "train" / "code.npy"
    whole = array.read_bytes()
    os.truncate(array, len(whole) // 2)
    with pytest.raises(CorpusError, match=f"arrays at .* are damaged \\({array} has"):
        TokenData.open(tmp_path / "artifact")
    assert prepare_data(corpus, tokenizer, tmp_path / "again", shared_root=volume) == meta
    assert f"the prepared token arrays at {array.parent.parent} are damaged" in caplog.text
    assert TokenData.open(tmp_path / "artifact").array("train", "code").tobytes() in whole


def test_a_long_document_is_encoded_in_pieces_to_the_same_tokens(corpus_spec):
    """A document far longer than a piece (one line of several MB, say) is tokenized a piece
    at a time, cut where the byte-level pre-tokenizer cuts: the same ids as in one go."""
    corpus, tokenizer_config = corpus_and_tokenizer(corpus_spec)
    documents = {"code": load_documents(DomainSource(name="code", path="code.jsonl"),
                                        corpus_spec.parent)}
    tokenizer = build_tokenizer(tokenizer_config, documents)
    long = "".join(documents["code"]) * 2  # code: runs of spaces, newlines and tabs
    assert len(regmix.data.prepare.pieces(long)) >= 3
    (whole,) = [e.ids for e in tokenizer.encode_batch([long], add_special_tokens=False)]
    short, pieced = regmix.data.prepare.encoder(tokenizer)(["a short one", long])
    assert pieced.tolist() == whole
    assert short.tolist() == tokenizer.encode("a short one", add_special_tokens=False).ids
    spaceless = "y" * (2 * regmix.data.prepare.PIECE_CHARS + 5)  # cut where it must be
    assert [len(p) for p in regmix.data.prepare.pieces(spaceless)] == [
        regmix.data.prepare.PIECE_CHARS] * 2 + [5]


# The small corpus plus one 5 MB document on one line, prepared in a fresh process
PREPARE_LONG_LINE = """
import json, sys
from pathlib import Path
from tests.conftest import corpus_and_tokenizer, small_corpus
from regmix.data.prepare import prepare_data
root = Path(sys.argv[1])
spec = small_corpus(root / "corpus", docs_per_domain=12)
code = root / "corpus" / "code.jsonl"
text = code.read_text()
body = "".join(json.loads(line)["text"] for line in text.splitlines())
code.write_text(text + json.dumps({"text": (body * 1000)[:5_000_000]}) + "\\n")
prepare_data(*corpus_and_tokenizer(spec), root / "out")
# This process's own peak (ru_maxrss would count the forked test process's memory too)
status = Path("/proc/self/status").read_text()
print(int(status.split("VmHWM:")[1].split()[0]) // 1024)
"""


def test_a_long_one_line_document_does_not_blow_up_memory(tmp_path):
    """Fault drill: data preparation's peak memory follows a batch of text, not the longest
    document: one 5 MB line peaked at about 1.2 GB (the tokenizer's working memory, ~200x the
    text) and peaks at about 0.4 GB in pieces (`benchmarks/data_prep.py --long-document-mb`)."""
    prepared = subprocess.run([sys.executable, "-c", PREPARE_LONG_LINE, str(tmp_path)],
                              capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).parents[2],
                              env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    peak_mb = int(prepared.stdout.split()[-1])
    assert peak_mb < 700, prepared.stderr[-2000:]


def test_a_document_quoting_the_end_of_text_token_stays_one_document(tmp_path):

    quoted = 'print(tokenizer.decode(ids)) # ends with <|endoftext|> then more code'
    (tmp_path / "code.jsonl").write_text("".join(
        json.dumps({"text": f"{quoted} {i}"}) + "\n" for i in range(300)))
    (tmp_path / "prose.jsonl").write_text('{"text": "plain words of prose"}\n' * 300)
    corpus = CorpusConfig(domains=[{"name": "code", "path": str(tmp_path / "code.jsonl")},
                                   {"name": "prose", "path": str(tmp_path / "prose.jsonl")}],
                          validation_tokens=64)
    meta = prepare_data(corpus, TokenizerConfig(vocab_size=300), tmp_path / "out")
    data = TokenData.open(tmp_path / "out")
    train = data.array("train", "code")
    # One separator per training document (a few are held out), none inside one: read as the
    # separator, the quoted token would double the count
    assert 290 <= int((train == meta["eos_id"]).sum()) < 300
