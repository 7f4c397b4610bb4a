"""Regression stage: predict a proxy's loss from its data mixture (RegMix, Liu et al. 2025).

Every setting is chosen from the training rows alone, by k-fold cross-validation (CV):
LightGBM's number of rounds (and, with `tune_trials`, its hyperparameters through Optuna),
the ridge penalty, the ensemble's blend weights, which model to use, and whether to leave out
the rows CV predicted worst (see OUTLIER_MADS). Fitted models are
saved in safe formats only (LightGBM's text model, JSON, .npy) so that loading one never
executes code.
"""

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np

from regmix.regression.saved import Regressor

# The packages a logged regressor model needs where it is loaded (`components` itself travels
# with it as code): what `components.regression` imports.
MLFLOW_MODEL_PACKAGES = ("numpy", "scipy", "scikit-learn", "lightgbm", "optuna", "joblib", "kfp",
                         "pydantic", "pyyaml")


class _PyfuncRegressor:
    """What `mlflow.pyfunc.load_model` gives for a logged regressor: `predict` takes a table
    of mixture weights (a column per domain, in any order) and returns the predicted loss."""

    def __init__(self, folder: str):
        self.regressor = Regressor.load(Path(folder))

    def predict(self, model_input, params=None) -> np.ndarray:
        return self.regressor.predict(np.asarray(model_input[self.regressor.domains], dtype=float))


def _load_pyfunc(data_path: str) -> _PyfuncRegressor:
    """mlflow.pyfunc's loader hook for models logged before `pyfunc_loader` (their
    `loader_module` is this module)."""
    return _PyfuncRegressor(data_path)


def code_digest(package: Path) -> str:
    """A hash of a package's Python sources: names the loader of models logged with this code."""
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def log_mlflow_model(folder: Path, regressor: Regressor) -> None:
    """Log the saved regressor `folder` to the active run as an MLflow pyfunc model: loadable
    with `mlflow.pyfunc.load_model`, registrable and servable, with a signature naming the
    domains. Its data is the folder as saved (LightGBM text, JSON, .npy): nothing is pickled.
    Its code is this `components` package, loaded apart from any other (see pyfunc_loader)."""
    from importlib.metadata import version

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    package = Path(__file__).parent
    example = pd.DataFrame(regressor.train_weights[:3], columns=regressor.domains)
    with tempfile.TemporaryDirectory() as scratch:
        loader = Path(scratch) / f"regmix_regressor_{code_digest(package)}.py"
        shutil.copyfile(package / "pyfunc_loader.py", loader)
        mlflow.pyfunc.log_model(
            name="regressor", loader_module=loader.stem, data_path=str(folder),
            code_paths=[str(package), str(loader)],
            pip_requirements=[f"{name}=={version(name)}" for name in MLFLOW_MODEL_PACKAGES],
            signature=infer_signature(example, regressor.predict(example.to_numpy())),
            input_example=example,
        )
