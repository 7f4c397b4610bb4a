"""regmix: find a pre-training data mixture by regression (RegMix, Liu et al., ICLR 2025).

The core library: everything that thinks (config, data, training, regression, search, gate,
evidence, tracking, report), with each pipeline stage a plain `run_<stage>` function. It never
imports kfp; `regmix.components` (the KFP ops) and `regmix.pipelines` (wiring, runners, CLI)
sit above it.
"""
import os

# MLflow's usage telemetry, unless the user chose otherwise: its background config fetch, when
# it fails (no internet in a pod or container), pops an environment variable while the task's
# own MLflow request is reading os.environ for proxies, and the task fails with a KeyError
# ('_MLFLOW_TELEMETRY_SESSION_ID'). Set here, before any regmix module imports mlflow, it also
# reaches every process a task starts.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
