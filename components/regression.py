"""KFP ops: fit (and refit) the regression."""

from kfp import dsl

from regmix.components import component


@component
def fit_regression_op(
    config: dict, proxy_results: list, data_meta: dict, tracking: dict,
    regressor: dsl.Output[dsl.Model],
) -> dict:
    """Fit mixture -> target loss on every finished proxy; log CV quality and the model."""
    from pathlib import Path

    from regmix.config.loading import parse_config
    from regmix.regression.stage import run_fit_regression

    return run_fit_regression(parse_config(config), proxy_results, data_meta, tracking,
                              Path(regressor.path))


@component
def refit_regression_op(
    config: dict, previous: dsl.Input[dsl.Model], proxy_results: list, data_meta: dict,
    tracking: dict, active_round: int, regressor: dsl.Output[dsl.Model],
) -> dict:
    """An active-learning round's refit: the previous fit's proxies plus this round's."""
    from pathlib import Path

    from regmix.config.loading import parse_config
    from regmix.regression.stage import run_refit_regression

    return run_refit_regression(parse_config(config), Path(previous.path), proxy_results,
                                data_meta, tracking, active_round, Path(regressor.path))
