"""Bring your own results: `regmix fit`, `regmix predict`, `regmix search` on CSV files.

The CSVs are the paper's format (an `index` column pairs a mixtures file, one column per
domain, with a losses file, one column per target), so the published RegMix data works as is.
A model folder holds one subfolder per target plus `targets.json` and the training mixtures.
"""

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import yaml

from regmix.config.constraints import Constraints
from regmix.errors import DataError
from regmix.files import replacing, write_text
from regmix.paper_data import read_proxy_csvs, resolve_target, target_name, write_predictions_csv
from regmix.regression.saved import REGRESSOR_FILE, TRAIN_WEIGHTS_FILE, Regressor
from regmix.regression.selection import check_target, fit_target
from regmix.regression.stage import DOMAIN_INTERACTION_PLOT, plot_domain_interactions, plot_fit
from regmix.search import save_search_plots, search_record, search_with_baseline
from regmix.tracking.runs import proxy_runs

TARGETS_FILE = "targets.json"
FOLDER_NAME_LENGTH = 80


def parse_target(text: str) -> str | dict[str, float]:
    """`COLUMN`, or a weighted mean `COLUMN=W,COLUMN=W`."""
    if "=" not in text:
        return text
    spec = {}
    for part in text.split(","):
        name, _, weight = (p.strip() for p in part.rpartition("="))
        try:
            value = float(weight)
        except ValueError:
            raise DataError(f"'{text}': '{part}' is not NAME=WEIGHT") from None
        if not name or not math.isfinite(value) or value < 0:
            raise DataError(f"'{text}': '{part}' needs a name and a finite weight >= 0")
        if name in spec:
            raise DataError(f"'{text}': '{name}' is given twice; give it once")
        spec[name] = value
    return spec


def folder_name(target: str) -> str:
    """A readable folder name for a target; a long one keeps a hash of the whole, so that two
    targets that differ only past the cut do not share (and overwrite) one folder."""
    # Dots stay inside a name (`val_loss.web`), not at its ends: '.' and '..' are not folders.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", target).strip("_.") or "target"
    if len(name) <= FOLDER_NAME_LENGTH:
        return name
    digest = hashlib.sha256(target.encode()).hexdigest()[:10]
    return f"{name[: FOLDER_NAME_LENGTH - 11]}-{digest}"


def fit_csv(mixtures: Path, losses: Path, targets: list[str], out: Path, model: str,
            folds: int, seed: int, tune_trials: int, per_domain_max_seconds: float) -> list[dict]:
    """Fit one regressor per target; returns a report per target.

    Every target is checked, then every target fitted, before anything is written: a bad
    target or a failed fit leaves the folder as it was, never half one fit and half another.
    Each target's folder is replaced whole, and `targets.json`, which names them, last."""
    if mixtures.resolve() == losses.resolve():
        raise DataError(f"--mixtures and --losses are both {mixtures}; give the mixtures file "
                        "and the losses file")
    table = read_proxy_csvs(mixtures, losses)
    try:  # a column's own name first: it may hold '=' or ','
        specs = [text if text in table.targets else parse_target(text) for text in targets]
    except DataError as e:
        raise DataError(f"--target {e}") from None
    resolved, index = [], {}  # target name -> its folder
    for text, spec in zip(targets, specs, strict=True):
        try:
            name, columns, shares = resolve_target(table, spec)
            check_target(columns, shares, model)  # e.g. a constant target
        except ValueError as e:
            raise DataError(f"--target '{text}': {e}") from None
        if name in index:
            raise DataError(f"--target '{text}': given twice; give each target once")
        folder = folder_name(name)
        if folder in index.values():
            raise DataError(f"--target '{text}': its folder name '{folder}' is taken by another "
                            "target; rename a loss column")
        if folder in (TARGETS_FILE, DOMAIN_INTERACTION_PLOT):
            raise DataError(f"--target '{text}': its folder name '{folder}' is a file `regmix fit` "
                            "writes beside the targets' folders; rename the loss column")
        # Each target's folder is replaced whole: never one that `regmix fit` did not write.
        if (out / folder).exists() and not (out / folder / REGRESSOR_FILE).is_file():
            raise DataError(f"--out {out}: '{out / folder}' (target '{name}') exists and is not "
                            "a model `regmix fit` wrote, and fitting would replace it; give "
                            "another --out, or move it away")
        index[name] = folder
        resolved.append((name, columns, shares))
    fitted = [(name, columns @ shares, *fit_target(
        table.weights, columns, shares, table.domains, model=model, folds=folds, seed=seed,
        tune_trials=tune_trials, per_domain_max_seconds=per_domain_max_seconds))
        for name, columns, shares in resolved]
    # Every loss column measured on every row, for the domain interactions
    complete = {n: table.losses[:, j] for j, n in enumerate(table.targets)
                if np.isfinite(table.losses[:, j]).all()}
    # The folder itself is written into, not replaced: it may be the shell's working folder.
    for name, y, regressor, report in fitted:
        with replacing(out / index[name]) as folder:
            regressor.save(folder)
        plot_fit(out / index[name], name, y, report)
    if complete:
        plot_domain_interactions(out, table.weights, table.domains, complete)
    write_text(out / TARGETS_FILE, json.dumps(index, indent=2))
    return [{"target": name, "model": report.model, "cv_spearman": report.cv_spearman,
             "cv_rmse": report.cv_rmse, "seconds": report.seconds,
             "cv_by_model": report.cv_by_model, "per_domain": report.settings.get("per_domain"),
             "left_out": table.index[report.left_out].tolist()}
            for name, _, _, report in fitted]


def load_models(model_dir: Path) -> dict:
    from lightgbm.basic import LightGBMError

    index_file = Path(model_dir) / TARGETS_FILE
    if not index_file.is_file():
        raise DataError(f"--model {model_dir}: no {TARGETS_FILE}; give a folder `regmix fit` "
                        "wrote")
    try:
        index = json.loads(index_file.read_text())
        models = {name: Regressor.load(Path(model_dir) / folder) for name, folder in index.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, LightGBMError) as e:
        raise DataError(f"--model {model_dir}: unreadable model folder ({type(e).__name__}: {e}); "
                        "fit it again with `regmix fit`") from None
    if not models:
        raise DataError(f"--model {model_dir}: {TARGETS_FILE} names no targets; fit it again "
                        "with `regmix fit`")
    return models


def check_output(out: Path, model_dir: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output path that would overwrite an input or what `regmix fit` wrote (the
    model folder may be the working folder: other files in it are fine)."""
    for flag, path in inputs.items():
        if out.resolve() == path.resolve():
            raise DataError(f"--out {out} is the {flag} file; give another path")
    try:
        folders = list(json.loads((model_dir / TARGETS_FILE).read_text()).values())
    except (OSError, ValueError, AttributeError):
        folders = []  # not a model folder: load_models says so
    written = [model_dir / name for name in (TARGETS_FILE, DOMAIN_INTERACTION_PLOT, *folders)]
    if any(out.resolve().is_relative_to(path.resolve()) for path in written):
        raise DataError(f"--out {out} would overwrite the model `regmix fit` wrote in "
                        f"{model_dir}; give another path")


def predict_csv(model_dir: Path, mixtures: Path, out: Path) -> int:
    check_output(out, model_dir, {"--mixtures": mixtures})
    models = load_models(model_dir)
    table = read_proxy_csvs(mixtures, domains=next(iter(models.values())).domains)
    # per model, the CSV's columns in the order it was fitted on (every target's model was
    # fitted on the same mixtures file)
    columns = {name: [table.domains.index(d) for d in regressor.domains]
               for name, regressor in models.items()}
    names = list(models)
    predictions = np.column_stack([models[n].predict(table.weights[:, columns[n]])
                                   for n in names])
    if not np.isfinite(predictions).all():  # a model fitted on absurd losses: never written
        row, column = np.argwhere(~np.isfinite(predictions))[0]
        raise DataError(f"--model {model_dir}: target '{names[column]}' predicts "
                        f"{predictions[row, column]} for the row with index {table.index[row]} "
                        f"of {mixtures}; fit the model again with `regmix fit`")
    write_predictions_csv(out, table.index, names, predictions)
    return len(table.index)


def search_model(model_dir: Path, out: Path, target: str | None, method: str, trials: int,
                 seed: int, constraints_args: dict, allow_extrapolation: bool) -> dict:
    """The chosen mixture and the paper's recipe beside it (as the pipeline's search stage
    does), written as YAML with the search's plots beside it (`<out stem>-*.png`)."""
    check_output(out, model_dir, {})
    models = load_models(model_dir)
    if target is None and len(models) > 1:
        raise DataError(f"--target: the model folder holds {list(models)}; name one")
    if target is None:
        name = next(iter(models))
    elif target in models:  # a column's own name, which may hold '=' or ','
        name = target
    else:
        try:  # named as `regmix fit --target` named it
            name = target_name(parse_target(target))
        except DataError as e:
            raise DataError(f"--target {e}") from None
    if name not in models:
        raise DataError(f"--target '{name}': not in the model folder; it has {list(models)}")
    regressor = models[name]
    if regressor.train_weights is None:
        raise DataError(f"--model {model_dir}: '{name}' was saved without its training mixtures "
                        f"({TRAIN_WEIGHTS_FILE}), which the search stays near; fit it again "
                        "with `regmix fit`")
    prior = regressor.train_weights.mean(axis=0)  # the sampled region's centre
    constraints = Constraints(**constraints_args)
    chosen, recipe = search_with_baseline(regressor, prior, method, trials, constraints, seed,
                                          allow_extrapolation)
    record = {"target": name,
              **search_record(chosen, recipe, constraints, allow_extrapolation, regressor)}
    if not math.isfinite(record["predicted"]):  # a model fitted on absurd losses: never written
        raise DataError(f"--model {model_dir}: target '{name}' predicts {record['predicted']} "
                        "at the best mixture found; fit the model again with `regmix fit`")
    write_text(out, yaml.safe_dump(record, sort_keys=False))
    save_search_plots(chosen, recipe, dict(zip(regressor.domains, prior.tolist(), strict=True)),
                      out.parent, prefix=f"{out.stem}-")
    return record


EXPORTED_STAGES = ("proxy", "active-proxy")  # the proxies a pipeline's regression fits on


def export_csv(tracking_uri: str, experiment: str, stages: list[str], mixtures: Path,
               losses: Path) -> int:
    """Write an experiment's finished proxies of these stages as the paper's two CSVs (paired
    by index)."""
    if mixtures.resolve() == losses.resolve():
        raise DataError(f"--mixtures and --losses are both {mixtures}; give two files")
    results = sorted((r for stage in stages for r in proxy_runs(tracking_uri, experiment, stage)),
                     key=lambda r: r["id"])
    if not results:
        raise DataError(f"experiment '{experiment}' has no finished runs of stage "
                        f"{' or '.join(stages)} to export")
    # One regression needs comparable rows: one model shape and token budget, one set of domains
    settings = sorted({json.dumps(r["setting"], sort_keys=True) for r in results})
    if len(settings) > 1:
        raise DataError(f"experiment '{experiment}' mixes proxies of {len(settings)} settings "
                        f"({'; '.join(settings)}); give each setting its own config `name`")
    domains = sorted({d for r in results for d in r["weights"]})
    targets = sorted({d for r in results for d in r["val_loss"]})
    partial = [r["id"] for r in results if set(r["weights"]) != set(domains)
               or set(r["val_loss"]) != set(targets)]
    if partial:
        raise DataError(f"experiment '{experiment}': runs {partial[:5]} lack some of the domains "
                        f"{domains}; export an experiment whose proxies share one corpus")
    index = np.arange(1, len(results) + 1)
    weights = np.array([[r["weights"][d] for d in domains] for r in results])
    values = np.array([[r["val_loss"][t] for t in targets] for r in results])
    write_predictions_csv(mixtures, index, domains, weights)
    # Each row's proxy by name, to trace it back to its MLflow run; fitting skips the column
    write_predictions_csv(losses, index, [f"val_loss.{t}" for t in targets], values,
                          {"mixture_id": [r["id"] for r in results]})
    return len(results)
