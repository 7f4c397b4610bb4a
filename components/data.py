"""KFP ops: data settings and preparation."""

from kfp import dsl

from regmix.components import component


@component
def data_settings_op(config: dict) -> dict:
    """The config's sections that decide the prepared data (KFP caches preparation on them)."""
    from regmix.config.loading import parse_config
    from regmix.data.prepare import data_settings

    return data_settings(parse_config(config))


@component
def prepare_data_op(settings: dict, data: dsl.Output[dsl.Dataset]) -> dict:
    """Tokenize the corpus into per-domain packed arrays; returns the data meta."""
    from pathlib import Path

    from regmix.data.prepare import run_prepare_data

    return run_prepare_data(settings, Path(data.path))
