"""KFP op: sample the proxies' mixtures."""

import hashlib
import json
import numpy as np



@component
def sample_mixtures_op(config: dict, data_meta: dict, tracking: dict) -> list:
    """Sample the proxies' mixtures; returns proxy tasks `[{task, mixtures: [...]}, ...]`."""
    import mlflow

    from regmix.config.loading import parse_config
    from regmix.mixtures import check_trained_region, plan_proxies
    from regmix.tracking.runs import stage_run

    cfg = parse_config(config)
    # A misnamed domain fails here, not after every proxy trained
    cfg.check_domains(data_meta["domains"], data_meta)
    tasks = plan_proxies(cfg, data_meta, tracking)
    mixtures = [m for t in tasks for m in t["mixtures"]]
    check_trained_region(cfg, data_meta, mixtures)
    with stage_run(tracking, "mixtures", "sample-mixtures"):
        mlflow.log_params({"count": len(mixtures), "tasks": len(tasks), "seed": cfg.seed})
        mlflow.log_dict({"mixtures": mixtures}, "mixtures.json")
    return tasks
