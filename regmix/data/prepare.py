"""Data preparation: each domain tokenized once into a training array and a fixed validation split."""

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regmix.config.cluster import SHARED_TOKENS_ENV
from regmix.config.sections import CorpusConfig, TokenizerConfig
from regmix.data.corpus import (
    DOCUMENTS_PER_BATCH,
    domain_roles,
    files_by_domain,
    load_documents,
    resolve_domains,
)
from regmix.data.tokenizer import build_tokenizer, eos_id
from regmix.errors import CorpusError
from regmix.files import damage, removing, replacing, write_checksums

log = logging.getLogger("regmix.data")
UNUSED_WARNING = 0.1  # warn when a domain's held-out tail, in neither split, is this much of it


# ---------------------------------------------------------------- encoding
# A document longer than this many characters is encoded a piece at a time, PIECES_PER_CALL
# pieces at once: the tokenizer's working memory per character (offsets, alignments, token
# strings) is about a hundred times the text, so one 50 MB line would otherwise take GBs.
PIECE_CHARS = 1 << 17
PIECES_PER_CALL = 8


def pieces(text: str) -> list[str]:
    """`text` cut into pieces of at most PIECE_CHARS characters, each cut just before a space
    between two non-spaces: a byte-level BPE's pre-tokenizer splits there too, so the pieces'
    tokens are the whole text's (a stretch without such spaces is cut where it must be)."""
    found, start = [], 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        cut = text.rfind(" ", start + 1, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1 : cut + 2].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end
        found.append(text[start:cut])
        start = cut
    found.append(text[start:])
    return found


def encoder(tokenizer):
    """A function from a list of texts to their token ids (one uint32 array each), encoding
    long documents in pieces so that memory follows the batch, not the longest document."""

    def ids(texts: list[str]) -> list[np.ndarray]:
        return [np.array(e.ids, dtype=np.uint32)
                for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode(texts: list[str]) -> list[np.ndarray]:
        short = [i for i, text in enumerate(texts) if len(text) <= PIECE_CHARS]
        encoded = dict(zip(short, ids([texts[i] for i in short]), strict=True))
        for i in sorted(set(range(len(texts))) - set(short)):
            parts = pieces(texts[i])
            encoded[i] = np.concatenate([a for start in range(0, len(parts), PIECES_PER_CALL)
                                         for a in ids(parts[start : start + PIECES_PER_CALL])])
        return [encoded[i] for i in range(len(texts))]

    return encode


# ---------------------------------------------------------------- packing
def pack(token_lists: Sequence[Sequence[int]], eos: int, dtype) -> np.ndarray:
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    packed = np.full(int(lengths.sum()), eos, dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    for start, tokens in zip(starts, token_lists, strict=True):
        packed[start : start + len(tokens)] = tokens
    return packed


def hold_out(
    name: str, docs: Sequence[str], encode, validation_tokens: int, seed: int, eos: int, dtype,
    training: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole documents (a fixed, seeded choice) until `validation_tokens` are covered.

    Returns the validation tokens, the held-out documents' indices and how many tokens of the
    last one, cut at `validation_tokens`, are in neither split. `encode` maps a list of texts to
    their token id lists. A target-only set (`training` false) may give all its documents.
    """
    if len(docs) == 1:
        raise CorpusError(f"domain '{name}': one document cannot be split into validation and "
                          "training text (whole documents are held out); split it into several "
                          "documents (files, or JSON lines)")
    order = np.random.default_rng(seed).permutation(len(docs))
    held_out: list[Sequence[int]] = []
    covered = 0
    while len(held_out) < len(order) and covered < validation_tokens:
        (tokens,) = encode([docs[order[len(held_out)]]])
        held_out.append(tokens)
        covered += len(tokens) + 1
    if covered < validation_tokens or (training and len(held_out) == len(order)):
        needs = "plus training data" if training else "(a target-only set)"
        raise CorpusError(
            f"domain '{name}': {covered} tokens in {len(order)} documents is too small for "
            f"a {validation_tokens}-token validation split {needs}; add text or "
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
    train_domains, targets = domain_roles(corpus, sources)
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
        encode = encoder(tokenizer)
        for name, docs in documents.items():
            validation, held_out, unused = hold_out(name, docs, encode, corpus.validation_tokens,
                                                    seed, eos, dtype, training=name in train_domains)
            if name in targets:  # measured, never trained on: no training array
                np.save(arrays / "validation" / f"{name}.npy", validation)
                digest.update(validation.tobytes())
                tokens[name] = {"validation": int(validation.size)}
                log.info("%s: a target-only set of %d validation tokens", name, validation.size)
                continue
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
            "domains": train_domains,
            **({"targets": targets} if targets else {}),
            "tokens": tokens,
            "vocab_size": vocab,
            "eos_id": eos,
            "dtype": np.dtype(dtype).name,
            "fingerprint": digest.hexdigest()[:16],
        }
        write_checksums(arrays)  # read back before they are trusted (TokenData.open)
        if staging:  # named by content and by the domain names the files carry
            named = meta["domains"] + targets
            names = hashlib.sha256(json.dumps(named).encode()).hexdigest()[:8]
            meta["arrays"] = publish(staging, staging.parent / f"{meta['fingerprint']}-{names}")
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def publish(staging: Path, final: Path) -> str:
    """Move finished arrays to their content-named folder; the same arrays may be there
    already (an earlier, or concurrent, preparation of the same data): then keep those, if
    whole. Damaged ones (a full volume, a bad copy) are replaced by these."""
    if (final / "validation").is_dir() and (problem := damage(final)) is not None:
        log.warning("the prepared token arrays at %s are damaged (%s); replaced", final, problem)
        shutil.rmtree(final, ignore_errors=True)
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
        if (problem := damage(data.arrays, contents=False)) is not None:  # sizes: cheap
            raise CorpusError(
                f"the prepared token arrays at {data.arrays} are damaged ({problem}); prepare "
                "the data again: rerun (`regmix run`), or start the run with `regmix submit "
                "--no-cache` (or `regmix schedule --no-cache`)")
        return data

    @property
    def arrays(self) -> Path:
        """Where the arrays are: beside meta.json, or on the shared volume (meta's `arrays`)."""
        return Path(self.meta.get("arrays", self.root))

    @property
    def domains(self) -> list[str]:
        """The training domains: what mixtures weigh."""
        return self.meta["domains"]

    @property
    def targets(self) -> list[str]:
        """The target-only sets: validation tokens only."""
        return self.meta.get("targets", [])

    @property
    def validation_domains(self) -> list[str]:
        """Every validation set a model is measured on: the training domains, then the targets."""
        return self.domains + self.targets

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


def data_settings(config) -> dict:
    """The config's sections that decide the prepared data: corpus, tokenizer and seed, and on
    a cluster the shared volume the token arrays are written to (`cluster.volume`).

    Data preparation takes only these, so that KFP's cache of it (keyed on a task's inputs)
    survives an edit to any other section, such as a gate threshold or a pod's memory. The
    volume is among them because a cached result names the arrays by their path on it: another
    claim or mount path, or a first run without one, would hand the proxies a path to nothing.
    """
    sections = {"corpus": True, "tokenizer": True, "seed": True, "cluster": {"volume"}}
    return config.model_dump(mode="json", include=sections, exclude_none=True)


def run_prepare_data(settings: dict, out: Path) -> dict:
    """The prepare-data stage on `data_settings`: tokenize the corpus into per-domain packed
    arrays under `out` (or the shared volume, on a cluster); returns the data meta."""
    logging.basicConfig(level=logging.INFO)
    corpus = CorpusConfig.model_validate(settings["corpus"])
    tokenizer = TokenizerConfig.model_validate(settings["tokenizer"])
    shared = os.environ.get(SHARED_TOKENS_ENV)  # set on a cluster with a shared volume
    # KFP hands dict parameters over as JSON objects, in which every number is a float
    return prepare_data(corpus, tokenizer, out, seed=int(settings["seed"]),
                        shared_root=Path(shared) if shared else None)
