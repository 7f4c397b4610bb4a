"""Stage 6, train_large: the target-size model on the chosen mixture, run only when the gate passes.

The same trainer as the proxies (`components/proxy.py`) with the large shape and recipe; locally
a few times the proxy size, on a cluster the paper's 1B shape.
"""

from kfp import dsl
from kfp.dsl import Input

from components import component


@component
def train_large_op(config: dict, chosen: dict, data: Input[dsl.Dataset], tracking: dict) -> dict:
    """Train the large model on the chosen mixture and log its per-domain validation losses."""
    from components.config import parse_config
    from components.data import TokenData
    from components.mixtures import mixture_hash
    from components.proxy import train_proxy

    cfg = parse_config(config)
    token_data = TokenData.open(data.path)
    shape, recipe = cfg.large.model.resolve(), cfg.large.train
    key = mixture_hash(chosen["weights"], token_data.fingerprint, shape.to_dict(),
                       recipe.model_dump(mode="json"), cfg.seed)
    mixture = {"id": "chosen", "weights": chosen["weights"], "hash": key}
    target = cfg.regression.target_weights(token_data.domains)
    return train_proxy(token_data, mixture, shape, recipe, cfg.seed, tracking, target, "large")
