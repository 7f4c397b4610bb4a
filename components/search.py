"""KFP op: search the mixture."""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
import numpy as np
import optuna
from cmaes import CMA
from kfp import dsl
from scipy.spatial.distance import cdist
from scipy.special import expit, logit



@component
def search_mixture_op(
    config: dict, regressor: dsl.Input[dsl.Model], data_meta: dict, tracking: dict,
    mixture: dsl.Output[dsl.Artifact],
) -> dict:
    """Search the simplex for the lowest predicted loss; compare with the paper's recipe."""
    import tempfile
    from pathlib import Path

    import mlflow
    import numpy as np
    import yaml

    from regmix.config.loading import parse_config
    from regmix.files import write_text
    from regmix.mixtures import token_prior
    from regmix.regression.saved import Regressor
    from regmix.config.constraints import search_constraints
    from regmix.search import save_search_plots, search_record, search_with_baseline
    from regmix.tracking.runs import stage_run

    cfg = parse_config(config)
    model = Regressor.load(Path(regressor.path))
    tokens = np.array([data_meta["tokens"][d]["train"] for d in model.domains])
    prior = token_prior(tokens, cfg.mixtures.temperature)
    constraints = search_constraints(cfg, data_meta)
    # The paper's recipe samples as the proxies were sampled: around the same prior, same strengths
    chosen, recipe = search_with_baseline(
        model, prior, cfg.search.method, cfg.search.trials, constraints, cfg.seed,
        cfg.search.allow_extrapolation, cfg.mixtures.strength_range)
    record = search_record(chosen, recipe, constraints, cfg.search.allow_extrapolation, model)
    write_text(mixture.path, yaml.safe_dump(record, sort_keys=False))
    with stage_run(tracking, "search", "search-mixture"):
        mlflow.log_params({f"weight.{d}": round(w, 6) for d, w in chosen.weights.items()})
        mlflow.log_params({"method": chosen.method, "trials": chosen.trials})
        mlflow.log_metrics({"predicted_loss": chosen.predicted, "spread": chosen.spread,
                            "search_seconds": chosen.seconds,
                            "paper_recipe_predicted_loss": recipe.predicted,
                            **({"predicted_gain": chosen.predicted_gain}
                               if chosen.predicted_gain is not None else {})})
        mlflow.log_artifact(mixture.path, "mixture")
        # the mixture the proxies were sampled around (the plot's "prior"), as data
        prior_weights = dict(zip(model.domains, prior.tolist(), strict=True))
        mlflow.log_dict(prior_weights, "prior.json")
        with tempfile.TemporaryDirectory() as folder:
            save_search_plots(chosen, recipe, prior_weights, Path(folder))
            mlflow.log_artifacts(folder, "plots")
    return record
