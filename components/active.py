"""KFP op: propose active-learning proxies."""

from kfp import dsl

from regmix.components import component


@component
def propose_proxies_op(
    config: dict, regressor: dsl.Input[dsl.Model], chosen: dict, data_meta: dict,
    tracking: dict, active_round: int,
) -> list:
    """One active-learning round's proxies: proxy tasks, like sample_mixtures_op's."""
    from pathlib import Path

    from regmix.active import run_propose_proxies
    from regmix.components.loop_items import with_tracking
    from regmix.config.loading import parse_config

    tasks = run_propose_proxies(parse_config(config), Path(regressor.path), chosen, data_meta,
                                tracking, active_round)
    return with_tracking(tasks, tracking)
