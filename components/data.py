"""Stage 0, prepare_data: corpus -> tokenizer -> packed per-domain token arrays.

Output folder (the contract every later stage reads through `TokenData`):
  tokenizer.json          the tokenizer used
  train/<domain>.npy      token ids of the domain's training documents, EOS between documents
  validation/<domain>.npy exactly `validation_tokens` ids from held-out documents
  meta.json               domains, token counts (the sampling prior), vocab, fingerprint
"""


import glob
import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kfp import dsl
from kfp.dsl import Output
from pydantic import TypeAdapter, ValidationError

from components import component
from components.config import (
    CorpusConfig,
    DomainSource,
    TokenizerConfig,
    check_unique,
    format_validation_error,
    read_yaml,
)
from components.files import removing, replacing

log = logging.getLogger("regmix.data")

EOS = "<|endoftext|>"
# Where a cluster's data preparation puts the token arrays: a folder on the volume every pod
# mounts (pipelines/cluster.py sets it), so no pod downloads them as a KFP artifact
SHARED_TOKENS_ENV = "REGMIX_SHARED_TOKENS"
# Documents tokenized (and read from disk) at a time: a few MB of text, on all cores.
DOCUMENTS_PER_BATCH = 1024
UNUSED_WARNING = 0.1  # warn when a domain's held-out tail, in neither split, is this much of it
PREFLIGHT_BYTES = 1 << 20  # read from the start of each file by the checks before any work
LOADERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


class CorpusError(ValueError):
    """A user-facing corpus problem; the message names the domain or file and the fix."""


# ---------------------------------------------------------------- corpus spec and documents
def resolve_domains(corpus: CorpusConfig) -> tuple[list[DomainSource], Path]:
    """The corpus's domains and the folder their relative paths are relative to."""
    if corpus.domains is not None:
        return list(corpus.domains), Path.cwd()
    if corpus.tinypile is not None:
        from components.tinypile import build_tinypile

        spec_path = build_tinypile(tiny=corpus.tinypile == "tiny")
    else:
        spec_path = Path(corpus.spec)
    return read_corpus_spec(spec_path), spec_path.parent


def read_corpus_spec(path: Path) -> list[DomainSource]:
    if not path.is_file():
        raise CorpusError(f"corpus spec not found: {path}; give a YAML with a `domains` list")
    data = read_yaml(path, CorpusError) or {}
    if not isinstance(data, dict) or not isinstance(data.get("domains"), list):
        raise CorpusError(f"{path}: needs a top-level `domains:` list of {{name, path}} entries")
    try:
        domains = TypeAdapter(list[DomainSource]).validate_python(data["domains"])
    except ValidationError as e:  # its locations start with the entry's index
        raise CorpusError(format_validation_error(e, f"{path}: domains")) from None
    try:
        check_unique([d.name for d in domains], f"{path}: domains")
    except ValueError as e:
        raise CorpusError(str(e)) from None
    if len(domains) < 2:
        raise CorpusError(f"{path}: a mixture needs at least 2 domains, found {len(domains)}")
    return domains


def suffix(name: str) -> str:
    """A data file's suffix as LOADERS knows it: `.JSONL` is `.jsonl`."""
    return Path(name).suffix.lower()


def domain_files(source: DomainSource, base: Path) -> list[str]:
    """Expand a domain's `path` (file, folder or glob) into its supported data files."""
    pattern = Path(source.path).expanduser()
    pattern = pattern if pattern.is_absolute() else base / pattern
    if pattern.is_dir():
        # Not inside hidden folders (.git, .ipynb_checkpoints: copies of the same documents)
        candidates = [str(p) for p in pattern.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(pattern).parts)]
    else:
        candidates = glob.glob(str(pattern), recursive=True)
    files = sorted(f for f in candidates if suffix(f) in LOADERS)
    skipped = sorted(set(candidates) - set(files))
    if skipped:  # e.g. compressed shards: say so rather than train on part of the domain
        log.warning("domain '%s': skipping %d file(s) that are not .jsonl/.json/.txt/.parquet, "
                    "e.g. %s", source.name, len(skipped), skipped[0])
    if not files:
        raise CorpusError(
            f"domain '{source.name}': no .jsonl/.json/.txt/.parquet files at '{pattern}'; "
            "fix the path or glob"
        )
    kinds = {LOADERS[suffix(f)] for f in files}
    if len(kinds) > 1:
        raise CorpusError(f"domain '{source.name}': mixes file kinds {sorted(kinds)}; use one")
    return files


def files_by_domain(sources: list[DomainSource], base: Path) -> dict[str, list[str]]:
    """Each file-backed domain's files (`domain_files`), none in two domains: its documents
    would sit in one's validation split and the other's training data, and each domain's loss
    would measure the other."""
    files = {s.name: domain_files(s, base) for s in sources if s.path}
    owner: dict[str, str] = {}
    for domain, names in files.items():
        for name in names:
            other = owner.setdefault(os.path.realpath(name), domain)
            if other != domain:
                raise CorpusError(f"domains '{other}' and '{domain}' both hold {name}; give "
                                  "each file to one domain (narrow a folder or glob)")
    return files


def load_documents(source: DomainSource, base: Path, files: list[str] | None = None) -> "Documents":
    """A domain's documents, loaded through Hugging Face `datasets` (from `files`, if its
    `domain_files` were already resolved)."""
    import datasets

    datasets.disable_progress_bars()
    if source.hf_path:
        kind, column = "hf", source.text_column
        args = dict(path=source.hf_path, name=source.hf_name, split=source.hf_split)
    else:
        files = files or domain_files(source, base)
        kind = LOADERS[suffix(files[0])]
        # A .txt file is one document (column "text"), not one document per line.
        column = "text" if kind == "text" else source.text_column
        # `datasets` keys its cache of local files on their paths and modification times: a
        # file rewritten and copied back with its old time (cp -p, rsync -a, tar) would load
        # the old documents. Their sizes key it too.
        stats = [(f, (st := os.stat(f)).st_size, st.st_mtime_ns) for f in files]
        signature = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
        args = dict(path=kind, data_files=files, split="train",
                    cache_dir=str(Path(datasets.config.HF_DATASETS_CACHE) / "regmix" / signature))
        if kind == "text":
            args["sample_by"] = "document"
    try:
        ds = datasets.load_dataset(**args)
    except Exception as e:  # datasets raises many types; the user needs the domain and cause
        # "An error occurred while generating the dataset" says nothing: the cause says what
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise CorpusError(" ".join(
            f"domain '{source.name}': could not load {kind} data: {type(e).__name__}: {e}{cause}"
            .split())) from None
    if column not in ds.column_names:
        raise CorpusError(
            f"domain '{source.name}': no column '{column}' (columns: {ds.column_names}); "
            "set `text_column`"
        )
    docs = Documents(ds.select_columns([column]).filter(
        lambda texts: [isinstance(t, str) and bool(t.strip()) for t in texts],
        input_columns=column, batched=True))
    if not len(docs):
        raise CorpusError(f"domain '{source.name}': no non-empty documents in column '{column}' "
                          f"(its type: {ds.features[column]}); add text or drop it")
    if len(docs) < len(ds):
        log.warning("domain '%s': %d of %d records have no text in '%s' (missing, empty or not "
                    "a string) and are skipped", source.name, len(ds) - len(docs), len(ds), column)
    return docs


class Documents(Sequence[str]):
    """A domain's non-empty documents, read in batches from the Arrow files `datasets` keeps on
    disk: a domain larger than memory streams through data preparation."""

    def __init__(self, table):  # a datasets.Dataset of one text column
        self.table, self.column = table, table.column_names[0]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        # A byte-order mark (spreadsheet and Windows editors write one) is not text
        if isinstance(i, slice):
            return [text.removeprefix("\ufeff") for text in self.table[i][self.column]]
        return self.table[int(i)][self.column].removeprefix("\ufeff")

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), DOCUMENTS_PER_BATCH):
            yield from self[start : start + DOCUMENTS_PER_BATCH]


def preflight(corpus: CorpusConfig, tokenizer: TokenizerConfig) -> list[str]:
    """Cheap checks before any work: files exist, are readable UTF-8 and big enough; the
    tokenizer can be loaded. Returns the domain names. Problems raise CorpusError."""
    sources, base = resolve_domains(corpus)
    by_name = {s.name: s for s in sources}
    for domain, files in files_by_domain(sources, base).items():
        source = by_name[domain]
        size = 0
        for name in files:
            try:
                with open(name, "rb") as handle:
                    head = handle.read(PREFLIGHT_BYTES)
                size += os.path.getsize(name)
            except OSError as e:
                raise CorpusError(
                    f"domain '{source.name}': cannot read {name}: {e.strerror}") from None
            if suffix(name) != ".parquet":
                try:
                    head.decode("utf-8")
                except UnicodeDecodeError as e:
                    if e.start < len(head) - 4:  # not just a character cut at the 1 MB mark
                        raise CorpusError(
                            f"domain '{source.name}': {name} is not UTF-8 text (byte "
                            f"{e.start}); convert it, e.g. iconv -t UTF-8"
                        ) from None
            check_text_column(source, name, head)
        # A token is at least one byte: fewer bytes than validation tokens can never split.
        if size <= corpus.validation_tokens:
            raise CorpusError(
                f"domain '{source.name}': {size} bytes cannot hold a "
                f"{corpus.validation_tokens}-token validation split plus training data; add "
                "text or lower corpus.validation_tokens"
            )
    if tokenizer.kind != "bpe":
        eos_id(build_tokenizer(tokenizer, {}), tokenizer.eos_token)
    return [s.name for s in sources]


def check_text_column(source: DomainSource, name: str, head: bytes) -> None:
    """The file's first record has the domain's text column (JSON lines and Parquet; a .json
    file holding one array is left to the loader)."""
    kind = suffix(name)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(name).names
        except Exception as e:  # pyarrow's errors vary with the damage
            raise CorpusError(f"domain '{source.name}': {name} is not a Parquet file ({e})") from None
    elif kind in (".jsonl", ".json"):
        lines = head.split(b"\n")
        if len(head) == PREFLIGHT_BYTES:  # the last line may be cut at the read's end
            lines = lines[:-1]
        line = next((ln for ln in lines if ln.strip()), None)
        if line is None:
            return
        try:
            record = json.loads(line)
        except ValueError:
            if kind == ".json":
                return
            raise CorpusError(f"domain '{source.name}': {name}: the first record is not JSON; "
                              "give one JSON object per line") from None
        if not isinstance(record, dict):
            return
        columns = list(record)
    else:
        return
    if source.text_column not in columns:
        raise CorpusError(f"domain '{source.name}': {name} has no '{source.text_column}' field "
                          f"(it has {columns[:10]}); set the domain's `text_column`")


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(config: TokenizerConfig, documents: dict[str, Sequence[str]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if config.kind == "file":
        if not Path(config.path).is_file():
            raise CorpusError(f"tokenizer.path: no file at '{config.path}'; give a tokenizer.json")
        try:
            return Tokenizer.from_file(config.path)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise CorpusError(f"tokenizer.path: '{config.path}' is not a tokenizers JSON file "
                              f"({str(e)[:200]}); save one with Tokenizer.save") from None
    if config.kind == "hf":
        try:
            return Tokenizer.from_pretrained(config.name)
        except Exception as e:
            raise CorpusError(
                f"tokenizer.name: could not load '{config.name}' from the Hugging Face hub "
                f"({type(e).__name__}); offline, download its tokenizer.json and use "
                "kind: file with path"
            ) from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # An equal byte sample per domain, so big domains do not own the vocabulary.
    tokenizer.train_from_iterator(
        (doc for docs in documents.values()
         for doc in take_bytes(docs, config.train_bytes_per_domain)),
        trainer,
    )
    return tokenizer


def take_bytes(docs: Iterable[str], limit: int) -> list[str]:
    taken, size = [], 0
    for doc in docs:
        if size >= limit:
            break
        taken.append(doc[: limit - size])
        size += len(taken[-1])
    return taken


# End-of-text tokens looked for, in order, when tokenizer.eos_token is not set.
EOS_NAMES = (EOS, "<|end_of_text|>", "</s>", "<eos>")


def eos_id(tokenizer, name: str | None = None) -> int:
    """The id of the token put between documents: `name`, or the first of EOS_NAMES."""
    if name is not None:
        if (token := tokenizer.token_to_id(name)) is None:
            raise CorpusError(f"tokenizer.eos_token: the tokenizer has no token '{name}'")
        return token
    for candidate in EOS_NAMES:
        if (token := tokenizer.token_to_id(candidate)) is not None:
            return token
    raise CorpusError(f"tokenizer: it has none of the end-of-text tokens {list(EOS_NAMES)}; set "
                      "tokenizer.eos_token to the one it uses")


# ---------------------------------------------------------------- packing
def pack(token_lists: list[list[int]], eos: int, dtype) -> np.ndarray:
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    packed = np.full(int(lengths.sum()), eos, dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    for start, tokens in zip(starts, token_lists, strict=True):
        packed[start : start + len(tokens)] = tokens
    return packed


def hold_out(
    name: str, docs: Sequence[str], encode, validation_tokens: int, seed: int, eos: int, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole documents (a fixed, seeded choice) until `validation_tokens` are covered.

    Returns the validation tokens, the held-out documents' indices and how many tokens of the
    last one, cut at `validation_tokens`, are in neither split. `encode` maps a list of texts to
    their token id lists.
    """
    if len(docs) == 1:
        raise CorpusError(f"domain '{name}': one document cannot be split into validation and "
                          "training text (whole documents are held out); split it into several "
                          "documents (files, or JSON lines)")
    order = np.random.default_rng(seed).permutation(len(docs))
    held_out: list[list[int]] = []
    covered = 0
    while len(held_out) < len(order) and covered < validation_tokens:
        (tokens,) = encode([docs[order[len(held_out)]]])
        held_out.append(tokens)
        covered += len(tokens) + 1
    if covered < validation_tokens or len(held_out) == len(order):
        raise CorpusError(
            f"domain '{name}': {covered} tokens in {len(order)} documents is too small for "
            f"a {validation_tokens}-token validation split plus training data; add text or "
            "lower corpus.validation_tokens"
        )
    # The last held-out document is cut at `validation_tokens`: its tail is in neither split
    return (pack(held_out, eos, dtype)[:validation_tokens], order[: len(held_out)],
            covered - validation_tokens)


def train_chunks(
    docs: Sequence[str], held_out: np.ndarray, encode, eos: int, dtype, limit: int | None
) -> Iterator[np.ndarray]:
    """The other documents' tokens in corpus order, packed a batch at a time, `limit` in all."""
    skip = np.zeros(len(docs), dtype=bool)
    skip[held_out] = True
    left = limit if limit is not None else np.iinfo(np.int64).max
    for start in range(0, len(docs), DOCUMENTS_PER_BATCH):
        texts = docs[start : start + DOCUMENTS_PER_BATCH]
        kept = [text for text, held in zip(texts, skip[start : start + len(texts)], strict=True)
                if not held]
        chunk = pack(encode(kept), eos, dtype)[:left]
        left -= chunk.size
        yield chunk
        if left <= 0:
            return


def save_chunks(path: Path, chunks: Iterable[np.ndarray], dtype, digest) -> int:
    """Write the chunks as one .npy array without holding it whole; returns its length.

    The header, which holds the length, is written last over a placeholder: a 1-D header is
    padded to the same 128 bytes whatever the length.
    """
    def header(size: int) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": (size,)})
        return buffer.getvalue()

    size, placeholder = 0, header(np.iinfo(np.int64).max)
    with path.open("wb") as handle:
        handle.write(placeholder)
        for chunk in chunks:
            data = chunk.tobytes()
            handle.write(data)
            digest.update(data)
            size += chunk.size
        final = header(size)
        assert len(final) == len(placeholder)  # the data starts where numpy will look for it
        handle.seek(0)
        handle.write(final)
    return size


def prepare_data(
    corpus: CorpusConfig, tokenizer_config: TokenizerConfig, out_dir: Path, seed: int = 0,
    shared_root: Path | None = None,
) -> dict:
    """Load every domain, build the tokenizer, and write packed token arrays. Returns meta.

    Memory stays bounded by a batch of documents: the documents stay in `datasets`' Arrow files
    and the training tokens go to disk a batch at a time. With `shared_root` (a volume every
    pod mounts) the arrays go to `shared_root/<fingerprint>/` and `out_dir` only points there,
    so each proxy pod reads them in place instead of downloading them as a KFP artifact.
    """
    sources, base = resolve_domains(corpus)
    files = files_by_domain(sources, base)
    documents = {s.name: load_documents(s, base, files.get(s.name)) for s in sources}
    tokenizer = build_tokenizer(tokenizer_config, documents)
    eos, vocab = eos_id(tokenizer, tokenizer_config.eos_token), tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max else np.uint32
    staging = (None if shared_root is None
               else Path(shared_root).resolve() / f".partial-{uuid.uuid4().hex}")
    with replacing(out_dir) as folder, removing(staging):  # whole or not at all
        arrays = staging or folder
        folder.mkdir(parents=True, exist_ok=True)
        (arrays / "train").mkdir(parents=True)
        (arrays / "validation").mkdir()
        tokenizer.save(str(folder / "tokenizer.json"))
        digest = hashlib.sha256((folder / "tokenizer.json").read_bytes())
        tokens = {}

        # A document that quotes the end-of-text token (code, docs about tokenizers) is text:
        # only pack() puts the separator between documents.
        tokenizer.encode_special_tokens = True

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

        for name, docs in documents.items():
            validation, held_out, unused = hold_out(name, docs, encode, corpus.validation_tokens,
                                                    seed, eos, dtype)
            chunks = train_chunks(docs, held_out, encode, eos, dtype, corpus.max_train_tokens)
            train_size = save_chunks(arrays / "train" / f"{name}.npy", chunks, dtype, digest)
            np.save(arrays / "validation" / f"{name}.npy", validation)
            digest.update(validation.tobytes())
            tokens[name] = {"train": train_size, "validation": int(validation.size)}
            log.info("%s: %d documents, %d train tokens", name, len(docs), train_size)
            if (share := unused / (train_size + validation.size + unused)) > UNUSED_WARNING:
                log.warning("domain '%s': %d tokens (%.0f%% of it), the tail of a long document "
                            "the validation split cut, are in neither split; split long "
                            "documents to train on them", name, unused, 100 * share)
        meta = {
            "domains": list(documents),
            "tokens": tokens,
            "vocab_size": vocab,
            "eos_id": eos,
            "dtype": np.dtype(dtype).name,
            "fingerprint": digest.hexdigest()[:16],
        }
        if staging:  # named by content and by the domain names the files carry
            names = hashlib.sha256(json.dumps(meta["domains"]).encode()).hexdigest()[:8]
            meta["arrays"] = publish(staging, staging.parent / f"{meta['fingerprint']}-{names}")
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def publish(staging: Path, final: Path) -> str:
    """Move finished arrays to their content-named folder; the same arrays may be there
    already (an earlier, or concurrent, preparation of the same data): then keep those."""
    try:
        os.replace(staging, final)
    except OSError:
        if not (final / "validation").is_dir():
            raise
    return str(final)


# ---------------------------------------------------------------- reading it back
@dataclass
class TokenData:
    """Read access to a prepared data folder; arrays are memory-mapped, never copied whole."""

    root: Path
    meta: dict

    @classmethod
    def open(cls, root: str | os.PathLike) -> "TokenData":
        root = Path(root)
        data = cls(root, json.loads((root / "meta.json").read_text()))
        if not (data.arrays / "validation").is_dir():
            raise CorpusError(
                f"the prepared token arrays at {data.arrays} are gone (a cleaned volume?); "
                "prepare the data again: start the run with `regmix submit --no-cache` (or "
                "`regmix schedule --no-cache`)")
        return data

    @property
    def arrays(self) -> Path:
        """Where the arrays are: beside meta.json, or on the shared volume (meta's `arrays`)."""
        return Path(self.meta.get("arrays", self.root))

    @property
    def domains(self) -> list[str]:
        return self.meta["domains"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def train_tokens(self) -> np.ndarray:
        return np.array([self.meta["tokens"][d]["train"] for d in self.domains], dtype=np.int64)

    def array(self, split: str, domain: str) -> np.ndarray:
        return np.load(self.arrays / split / f"{domain}.npy", mmap_mode="r")


# ---------------------------------------------------------------- KFP component
@component
def data_settings_op(config: dict) -> dict:
    """The config's sections that decide the prepared data: corpus, tokenizer and seed, and on
    a cluster the shared volume the token arrays are written to (`cluster.volume`).

    Data preparation takes only these, so that KFP's cache of it (keyed on a task's inputs)
    survives an edit to any other section, such as a gate threshold or a pod's memory. The
    volume is among them because a cached result names the arrays by their path on it: another
    claim or mount path, or a first run without one, would hand the proxies a path to nothing.
    """
    from components.config import parse_config

    sections = {"corpus": True, "tokenizer": True, "seed": True, "cluster": {"volume"}}
    return parse_config(config).model_dump(mode="json", include=sections, exclude_none=True)


@component
def prepare_data_op(settings: dict, data: Output[dsl.Dataset]) -> dict:
    """Tokenize the corpus into per-domain packed arrays; returns the data meta."""
    import logging
    import os
    from pathlib import Path

    from components.config import CorpusConfig, TokenizerConfig
    from components.data import SHARED_TOKENS_ENV, prepare_data

    logging.basicConfig(level=logging.INFO)
    corpus = CorpusConfig.model_validate(settings["corpus"])
    tokenizer = TokenizerConfig.model_validate(settings["tokenizer"])
    shared = os.environ.get(SHARED_TOKENS_ENV)  # set on a cluster with a shared volume
    # KFP hands dict parameters over as JSON objects, in which every number is a float
    return prepare_data(corpus, tokenizer, data.path, seed=int(settings["seed"]),
                        shared_root=Path(shared) if shared else None)
