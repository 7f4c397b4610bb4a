"""KFP ops: data settings and preparation."""

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
    from regmix.config.loading import parse_config

    sections = {"corpus": True, "tokenizer": True, "seed": True, "cluster": {"volume"}}
    return parse_config(config).model_dump(mode="json", include=sections, exclude_none=True)


@component
def prepare_data_op(settings: dict, data: Output[dsl.Dataset]) -> dict:
    """Tokenize the corpus into per-domain packed arrays; returns the data meta."""
    import logging
    import os
    from pathlib import Path

    from regmix.config.sections import CorpusConfig, TokenizerConfig
    from regmix.data.prepare import SHARED_TOKENS_ENV, prepare_data

    logging.basicConfig(level=logging.INFO)
    corpus = CorpusConfig.model_validate(settings["corpus"])
    tokenizer = TokenizerConfig.model_validate(settings["tokenizer"])
    shared = os.environ.get(SHARED_TOKENS_ENV)  # set on a cluster with a shared volume
    # KFP hands dict parameters over as JSON objects, in which every number is a float
    return prepare_data(corpus, tokenizer, data.path, seed=int(settings["seed"]),
                        shared_root=Path(shared) if shared else None)
