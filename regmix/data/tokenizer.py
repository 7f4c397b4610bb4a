"""The tokenizer: a byte-level BPE trained on the corpus, or one loaded from a file; its end-of-text id."""

from collections.abc import Iterable, Sequence
from pathlib import Path

from regmix.config.sections import TokenizerConfig
from regmix.errors import CorpusError

EOS = "<|endoftext|>"


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
