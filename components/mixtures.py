"""KFP op: sample the proxies' mixtures."""

from regmix.components import component


@component
def sample_mixtures_op(config: dict, data_meta: dict, tracking: dict) -> list:
    """Sample the proxies' mixtures; returns proxy tasks `[{task, mixtures, tracking}, ...]`."""
    from regmix.components.loop_items import with_tracking
    from regmix.config.loading import parse_config
    from regmix.mixtures import run_sample_mixtures

    return with_tracking(run_sample_mixtures(parse_config(config), data_meta, tracking), tracking)
