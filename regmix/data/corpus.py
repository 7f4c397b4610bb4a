"""A corpus's domains: where their documents come from (a spec, folders, files, `datasets`),
and the checks run on them before any work."""

import codecs
import glob
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from regmix.config.loading import format_validation_error, read_yaml
from regmix.config.sections import CorpusConfig, DomainSource, TokenizerConfig, check_unique
from regmix.data.tinypile.builder import build_tinypile
from regmix.data.tokenizer import build_tokenizer, eos_id
from regmix.errors import CorpusError
from regmix.files import file_sha256

log = logging.getLogger("regmix.data")
# Documents tokenized (and read from disk) at a time: a few MB of text, on all cores.
DOCUMENTS_PER_BATCH = 1024
LOADERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
PREFLIGHT_BYTES = 1 << 20  # read from the start of each file by the checks before any work


# ---------------------------------------------------------------- corpus spec and documents
def resolve_domains(corpus: CorpusConfig) -> tuple[list[DomainSource], Path]:
    """The corpus's domains and the folder their relative paths are relative to."""
    if corpus.domains is not None:
        return list(corpus.domains), Path.cwd()
    if corpus.tinypile is not None:

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
        # file rewritten with its old size and time (cp -p, rsync -a, tar) would load the old
        # documents. Their content keys it here.
        signature = hashlib.sha256(json.dumps(
            [(f, file_sha256(f)) for f in files]).encode()).hexdigest()[:16]
        args = dict(path=kind, data_files=files, split="train",
                    cache_dir=str(Path(datasets.config.HF_DATASETS_CACHE) / "regmix" / signature))
        if kind == "text":
            args["sample_by"] = "document"
    # The cache `datasets` made on an earlier run is trusted only while it reads back: a
    # truncated Arrow file (a full disk, a killed copy) is removed and the files read again.
    cache = Path(args["cache_dir"]) if "cache_dir" in args else None
    cached = cache is not None and any(cache.rglob("*.arrow"))
    while True:
        try:
            return read_documents(source, args, column)
        except CorpusError:
            raise
        except Exception as e:  # datasets raises many types; the user needs the domain and cause
            if isinstance(e, UnicodeDecodeError) or not cached:
                raise load_error(source, kind, files, e) from None
            log.warning("domain '%s': the datasets cache %s could not be read (%s: %s); "
                        "removed, reading its files again", source.name, cache,
                        type(e).__name__, e)
            shutil.rmtree(cache, ignore_errors=True)
            cached = False  # a second failure is the files' own


def read_documents(source: DomainSource, args: dict, column: str) -> "Documents":
    """`datasets.load_dataset(**args)`'s non-empty documents in `column`."""
    import datasets

    ds = datasets.load_dataset(**args)
    if column not in ds.column_names:
        raise CorpusError(
            f"domain '{source.name}': no column '{column}' (columns: {ds.column_names}); "
            "set `text_column`"
        )
    # Reads every record: bytes that are not UTF-8 (which `datasets` stores as they are) fail here
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


def load_error(source: DomainSource, kind: str, files: list[str] | None,
               error: Exception) -> CorpusError:
    """What went wrong loading a domain, as a user can act on it: the file and byte that are
    not UTF-8, or the loader's error with its cause."""
    chain = [error, error.__cause__, error.__context__]
    if files and any(isinstance(e, UnicodeDecodeError) for e in chain):
        for name in files:
            if (offset := non_utf8_offset(name)) is not None:
                return not_utf8(source, name, offset)
    # "An error occurred while generating the dataset" says nothing: the cause says what
    cause = f" ({type(error.__cause__).__name__}: {error.__cause__})" if error.__cause__ else ""
    return CorpusError(" ".join(f"domain '{source.name}': could not load {kind} data: "
                                f"{type(error).__name__}: {error}{cause}".split()))


def non_utf8_offset(name: str) -> int | None:
    """The offset of the first byte of `name` that is not UTF-8, or None (Parquet: None)."""
    if suffix(name) == ".parquet":
        return None
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(name, "rb") as handle:
        while True:
            block = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])  # a character's first bytes, from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return offset - pending + e.start
            if not block:
                return None
            offset += len(block)


def not_utf8(source: DomainSource, name: str, offset: int) -> CorpusError:
    return CorpusError(f"domain '{source.name}': {name} is not UTF-8 text (byte {offset}); "
                       "convert it, e.g. iconv -t UTF-8")


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


def domain_roles(corpus: CorpusConfig, sources: list[DomainSource]) -> tuple[list[str], list[str]]:
    """The training domains and the target-only sets among the corpus's `sources`."""
    return corpus.roles([s.name for s in sources], [s.name for s in sources if s.role == "target"])


def preflight(corpus: CorpusConfig, tokenizer: TokenizerConfig) -> tuple[list[str], list[str]]:
    """Cheap checks before any work: files exist, are readable UTF-8 and big enough; the
    tokenizer can be loaded. Returns the training domains and the target-only sets. Problems
    raise CorpusError (ConfigError for roles the config gets wrong)."""
    sources, base = resolve_domains(corpus)
    roles = domain_roles(corpus, sources)
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
                        raise not_utf8(source, name, e.start) from None
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
    return roles


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
