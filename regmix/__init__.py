"""regmix: find a pre-training data mixture by regression (RegMix, Liu et al., ICLR 2025).

The core library: everything that thinks (config, data, training, regression, search, gate,
evidence, tracking, report), with each pipeline stage a plain `run_<stage>` function. It never
imports kfp; `regmix.components` (the KFP ops) and `regmix.pipelines` (wiring, runners, CLI)
sit above it.
"""
import os

# Two MLflow defaults every regmix process (CLI, task, pod, and what they start) changes unless
# the user set them; here, before any regmix module imports mlflow.
# - Telemetry: its background config fetch, when it fails (no internet in a pod or container),
#   pops an environment variable while a task's own MLflow request reads os.environ for proxies,
#   and the task fails with KeyError('_MLFLOW_TELEMETRY_SESSION_ID').
# - Artifact progress bars: a tqdm bar per artifact read or written, lines of noise before
#   `regmix report`'s output and in every task log.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
