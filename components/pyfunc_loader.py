"""MLflow's loader of a logged regmix regressor (`mlflow.pyfunc.load_model`).

`log_mlflow_model` logs this file beside the model's copy of the `components` package, renamed
`regmix_regressor_<hash of that code>.py`, and names it the model's `loader_module`. MLflow puts
the model's code folder first on `sys.path` but keeps modules already imported, so a process
that imported another `components` (another regmix version, or another project's package of that
common name) would run that code on this model's files, or fail to load it. Here the model's own
`components` is imported aside, and the process's modules are put back afterwards; the loaded
model keeps its own.
"""

import importlib
import sys
from pathlib import Path

PACKAGE = "components"


def _package_modules() -> dict:
    return {name: module for name, module in sys.modules.items()
            if name == PACKAGE or name.startswith(f"{PACKAGE}.")}


def _load_pyfunc(data_path: str):
    code = str(Path(__file__).resolve().parent)  # where MLflow put the model's code
    theirs = _package_modules()
    for name in theirs:
        del sys.modules[name]
    sys.path.insert(0, code)
    try:
        regression = importlib.import_module(f"{PACKAGE}.regression")
        return regression._PyfuncRegressor(data_path)
    finally:
        sys.path.remove(code)
        for name in _package_modules():
            del sys.modules[name]
        sys.modules.update(theirs)
