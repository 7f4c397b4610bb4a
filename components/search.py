"""KFP op: search the mixture."""

from kfp import dsl

from regmix.components import component


@component
def search_mixture_op(
    config: dict, regressor: dsl.Input[dsl.Model], data_meta: dict, tracking: dict,
    mixture: dsl.Output[dsl.Artifact],
) -> dict:
    """Search the simplex for the lowest predicted loss; compare with the paper's recipe."""
    from pathlib import Path

    from regmix.config.loading import parse_config
    from regmix.search import run_search

    return run_search(parse_config(config), Path(regressor.path), data_meta, tracking,
                      Path(mixture.path))
