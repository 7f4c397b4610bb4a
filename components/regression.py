"""KFP ops: fit (and refit) the regression."""

import hashlib
import itertools
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol
import lightgbm as lgb
import numpy as np
import optuna
from joblib import Parallel, cpu_count, delayed
from kfp import dsl
from scipy.optimize import least_squares
from scipy.stats import spearmanr
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import (
    ConstantKernel,
    DotProduct,
    Hyperparameter,
    Kernel,
    Matern,
    WhiteKernel,
)
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold



@component
def fit_regression_op(
    config: dict, proxy_results: list, data_meta: dict, tracking: dict,
    regressor: dsl.Output[dsl.Model],
) -> dict:
    """Fit mixture -> target loss on every finished proxy; log CV quality and the model."""
    from pathlib import Path

    from regmix.config.loading import parse_config
    from regmix.regression.stage import fit_and_log

    every = [r for task in proxy_results for r in task["results"]]
    return fit_and_log(parse_config(config), every, data_meta, tracking, Path(regressor.path),
                       "fit-regression")


@component
def refit_regression_op(
    config: dict, previous: dsl.Input[dsl.Model], proxy_results: list, data_meta: dict,
    tracking: dict, active_round: int, regressor: dsl.Output[dsl.Model],
) -> dict:
    """An active-learning round's refit: the previous fit's proxies plus this round's."""
    import json
    from pathlib import Path

    from regmix.config.loading import parse_config
    from regmix.regression.stage import PROXY_RESULTS_FILE, fit_and_log

    earlier = json.loads((Path(previous.path) / PROXY_RESULTS_FILE).read_text())
    every = earlier + [r for task in proxy_results for r in task["results"]]
    return fit_and_log(parse_config(config), every, data_meta, tracking, Path(regressor.path),
                       f"fit-regression-round-{active_round}")
