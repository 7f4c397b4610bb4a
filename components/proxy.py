"""KFP op: train a task's proxies."""

from kfp import dsl

from regmix.components import component


@component
def train_proxy_op(config: dict, task: dict, data: dsl.Input[dsl.Dataset], stage: str = "proxy") -> dict:
    """Train one proxy task's mixtures; returns `{task, results: [proxy result, ...]}`."""
    from regmix.components.loop_items import split_tracking
    from regmix.config.loading import parse_config
    from regmix.train.proxy import run_train_proxies

    task, tracking = split_tracking(task)
    return run_train_proxies(parse_config(config), task, data.path, tracking, stage)
