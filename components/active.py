"""KFP op: propose active-learning proxies."""

import numpy as np
from kfp import dsl



@component
def propose_proxies_op(
    config: dict, regressor: dsl.Input[dsl.Model], chosen: dict, data_meta: dict,
    tracking: dict, active_round: int,
) -> list:
    """One active-learning round's proxies: proxy tasks, like sample_mixtures_op's."""
    from pathlib import Path

    import mlflow

    from regmix.active import plan_active_proxies
    from regmix.config.loading import parse_config
    from regmix.regression.saved import Regressor
    from regmix.tracking.runs import stage_run

    cfg = parse_config(config)
    model = Regressor.load(Path(regressor.path))
    tasks = plan_active_proxies(cfg, data_meta, model, chosen["weights"], active_round, tracking)
    mixtures = [m for t in tasks for m in t["mixtures"]]
    with stage_run(tracking, "active-learning", f"propose-round-{active_round}"):
        mlflow.log_params({"round": active_round, "proxies": len(mixtures)})
        mlflow.log_dict({"mixtures": mixtures}, "mixtures.json")
    return tasks
