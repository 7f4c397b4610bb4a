"""KFP ops: the larger runs (chosen mixture and baselines), their comparison, the rank check."""

from kfp import dsl

from regmix.components import component


@component
def plan_large_op(config: dict, data_meta: dict, chosen: dict, fit_report: dict,
                  tracking: dict) -> list:
    """The large runs: chosen mixture and baselines, over seeds."""
    from regmix.components.loop_items import with_tracking
    from regmix.config.loading import parse_config
    from regmix.evidence import run_plan_large

    return with_tracking(run_plan_large(parse_config(config), data_meta, chosen, fit_report),
                         tracking)


@component
def train_target_op(config: dict, run: dict, data: dsl.Input[dsl.Dataset]) -> dict:
    """Train one larger model (large, baseline or rank-check run) and log its losses."""
    from regmix.components.loop_items import split_tracking
    from regmix.config.loading import parse_config
    from regmix.train.launcher import run_train_target

    run, tracking = split_tracking(run)
    return run_train_target(parse_config(config), run, data.path, tracking)


@component
def compare_baselines_op(config: dict, results: list, fit_report: dict, tracking: dict) -> dict:
    """Chosen mixture vs baselines at the large size, judged against seed noise."""
    from regmix.evidence import run_compare_baselines

    return run_compare_baselines(results, fit_report, tracking)


@component
def plan_rank_check_op(config: dict, data_meta: dict, proxy_results: list, tracking: dict) -> list:
    """Training mixtures to retrain at the larger rank-check size."""
    from regmix.components.loop_items import with_tracking
    from regmix.config.loading import parse_config
    from regmix.evidence import run_plan_rank_check

    return with_tracking(run_plan_rank_check(parse_config(config), data_meta, proxy_results),
                         tracking)


@component
def rank_invariance_op(config: dict, proxy_results: list, rank_results: list, data_meta: dict,
                       tracking: dict) -> dict:
    """Spearman between proxy-size and larger-size rankings of the same mixtures."""
    from regmix.config.loading import parse_config
    from regmix.evidence import run_rank_invariance

    return run_rank_invariance(parse_config(config), proxy_results, rank_results, data_meta,
                               tracking)
