"""A fitted regressor as an MLflow pyfunc model (`mlflow.pyfunc.load_model`).

`log_mlflow_model` logs a saved regressor with a copy of the modules that predict with it
(PREDICTOR_MODULES: the members, the saved format and this loader, not the fitting code) as a
package named after a hash of that code, `regmix_regressor_<digest>`. A process that imported
another regmix version, or another package of a common name, loads each model with its own
code under its own name, with nothing swapped in `sys.modules`. For that, these modules import
each other relatively and need only PREDICTOR_PACKAGES (no kfp, no optuna).
"""

import hashlib
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

from .saved import Regressor

PREDICTOR_MODULES = ("__init__.py", "boosted.py", "gp.py", "law.py", "linear.py", "saved.py",
                     "pyfunc.py")
# The packages a logged regressor needs where it is loaded: what PREDICTOR_MODULES import
PREDICTOR_PACKAGES = ("numpy", "scipy", "scikit-learn", "lightgbm", "joblib", "pandas")


class _PyfuncRegressor:
    """What `mlflow.pyfunc.load_model` gives for a logged regressor: `predict` takes a table
    of mixture weights (a column per domain, in any order) and returns the predicted loss."""

    def __init__(self, folder: str):
        self.regressor = Regressor.load(Path(folder))

    def predict(self, model_input, params=None) -> np.ndarray:
        return self.regressor.predict(np.asarray(model_input[self.regressor.domains], dtype=float))


def _load_pyfunc(data_path: str) -> _PyfuncRegressor:
    """mlflow.pyfunc's loader hook (the logged model's `loader_module` is this module)."""
    return _PyfuncRegressor(data_path)


def code_digest(package: Path) -> str:
    """A hash of the predictor's sources: names the package a model logged with them loads as."""
    digest = hashlib.sha256()
    for name in PREDICTOR_MODULES:
        digest.update(name.encode() + b"\0" + (package / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def log_mlflow_model(folder: Path, regressor: Regressor):
    """Log the saved regressor `folder` to the active run as an MLflow pyfunc model: loadable
    with `mlflow.pyfunc.load_model`, registrable and servable, with a signature naming the
    domains. Its data is the folder as saved (LightGBM text, JSON, .npy): nothing is pickled.
    Returns MLflow's ModelInfo."""
    package = Path(__file__).parent
    example = pd.DataFrame(regressor.train_weights[:3], columns=regressor.domains)
    with tempfile.TemporaryDirectory() as scratch:
        code = Path(scratch) / f"regmix_regressor_{code_digest(package)}"
        code.mkdir()
        for name in PREDICTOR_MODULES:
            shutil.copyfile(package / name, code / name)
        return mlflow.pyfunc.log_model(
            name="regressor", loader_module=f"{code.name}.pyfunc", data_path=str(folder),
            code_paths=[str(code)],
            pip_requirements=[f"{name}=={version(name)}" for name in PREDICTOR_PACKAGES],
            signature=infer_signature(example, regressor.predict(example.to_numpy())),
            input_example=example,
        )
