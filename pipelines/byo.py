"""Bring your own results: `regmix fit`, `regmix predict`, `regmix search` on CSV files.

The CSVs are the paper's format (an `index` column pairs a mixtures file, one column per
domain, with a losses file, one column per target), so the published RegMix data works as is.
A model folder holds one subfolder per target plus `targets.json` and the training mixtures.
"""

import argparse
import hashlib
import json
import math
import re
from pathlib import Path
from typing import get_args

import numpy as np
import yaml

from components.config import (
    CMAES_POPULATION,
    MAX_SEED,
    MIN_SEARCH_TRIALS,
    PAPER_SAMPLES,
    PER_DOMAIN_MAX_SECONDS,
    SEARCH_TRIALS,
    RegressionModel,
    default_trials,
)
from components.files import write_text
from components.paper_data import (
    DataError,
    read_proxy_csvs,
    resolve_target,
    target_name,
    write_predictions_csv,
)

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
    from components.regression import (
        DOMAIN_INTERACTION_PLOT,
        REGRESSOR_FILE,
        check_target,
        fit_target,
        plot_domain_interactions,
        plot_fit,
    )

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
        regressor.save(out / index[name])
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

    from components.regression import Regressor

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
    from components.regression import DOMAIN_INTERACTION_PLOT

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
    write_predictions_csv(out, table.index, names, predictions)
    return len(table.index)


def search_model(model_dir: Path, out: Path, target: str | None, method: str, trials: int,
                 seed: int, constraints_args: dict, allow_extrapolation: bool) -> dict:
    """The chosen mixture and the paper's recipe beside it (as the pipeline's search stage
    does), written as YAML with the search's plots beside it (`<out stem>-*.png`)."""
    from components.regression import TRAIN_WEIGHTS_FILE
    from components.search import (
        Constraints,
        save_search_plots,
        search_record,
        search_with_baseline,
    )

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
    write_text(out, yaml.safe_dump(record, sort_keys=False))
    save_search_plots(chosen, recipe, dict(zip(regressor.domains, prior.tolist(), strict=True)),
                      out.parent, prefix=f"{out.stem}-")
    return record


EXPORTED_STAGES = ("proxy", "active-proxy")  # the proxies a pipeline's regression fits on


def export_csv(tracking_uri: str, experiment: str, stages: list[str], mixtures: Path,
               losses: Path) -> int:
    """Write an experiment's finished proxies of these stages as the paper's two CSVs (paired
    by index)."""
    from components.tracking import proxy_runs

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


def weights_arg(text: str) -> dict[str, float]:
    """An argparse type: `domain=w,domain=w` for --min-weight/--max-weight/--fixed."""
    try:
        spec = parse_target(text)
    except DataError as e:  # argparse shows an ArgumentTypeError's own message, not a ValueError's
        raise argparse.ArgumentTypeError(str(e)) from None
    if isinstance(spec, str):
        raise argparse.ArgumentTypeError(f"'{text}': give DOMAIN=WEIGHT[,DOMAIN=WEIGHT...]")
    return spec


class MergeWeights(argparse.Action):
    """Repeating --fixed (or --min-weight, --max-weight) adds to it; naming a domain twice is
    an error rather than a silent last-one-wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest) or {})
        twice = sorted(set(merged) & set(values))
        if twice:
            parser.error(f"{option_string}: {twice} given twice; give each domain once")
        setattr(namespace, self.dest, {**merged, **values})


def output_file(text: str) -> Path:
    """An argparse type: a file to write, refused now, before any work, if it cannot be."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a folder; give a file path")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder '{path.parent}' to write '{path.name}' in; "
                                         "create it first")
    return path


def output_folder(text: str) -> Path:
    """An argparse type: a folder to write into (made if missing), not an existing file."""
    path = Path(text)
    # The nearest folder that exists (at worst '.' or '/') is where it will be made
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"'{existing}' is a file; give a folder path")
    return path


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (1e9 and 1000000000 alike)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"give a number > 0, not '{text}'")
    return value


def at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= minimum (and <= maximum, if given); argparse names the
    flag in its message."""
    def parse(text: str) -> int:
        if (not text.lstrip("-").isdigit() or int(text) < minimum
                or (maximum is not None and int(text) > maximum)):
            within = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"give an integer {within}, not '{text}'")
        return int(text)
    return parse


DEFAULT_TRACKING_HELP = "default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db"


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose `--help` starts by saying what it does."""
    return sub.add_parser(name, help=help, description=help)


def add_commands(sub) -> None:
    fit = add_command(sub, "fit", "fit mixture -> loss regressors on CSV results")
    fit.add_argument("--mixtures", required=True, type=Path, help="mixtures CSV (index, domains)")
    fit.add_argument("--losses", required=True, type=Path, help="losses CSV (index, targets)")
    fit.add_argument("--target", required=True, action="append",
                     help="a loss column, or COLUMN=W,COLUMN=W for a weighted mean; repeatable")
    fit.add_argument("--out", required=True, type=output_folder, help="model folder to write")
    fit.add_argument("--model", default="auto", choices=get_args(RegressionModel),
                     help="the regressor (default: auto, the best by cross-validation)")
    fit.add_argument("--folds", type=at_least(2), default=5,
                     help="cross-validation folds (default 5; at most one per row: leave-one-out)")
    fit.add_argument("--tune-trials", type=at_least(0), default=0,
                     help="Optuna trials for LightGBM's settings (default 0: its defaults)")
    fit.add_argument("--seed", type=at_least(0, MAX_SEED), default=0, help="for folds and fits (default 0)")
    fit.add_argument("--per-domain-max-seconds", type=at_least(0),
                     default=int(PER_DOMAIN_MAX_SECONDS),
                     help="auto's time budget for fitting a weighted mean one column at a time "
                     f"(default {int(PER_DOMAIN_MAX_SECONDS)}; 0: never)")
    fit.set_defaults(func=cmd_fit)

    predict = add_command(sub, "predict", "predict losses for a mixtures CSV")
    predict.add_argument("--model", required=True, type=Path, help="a folder `regmix fit` wrote")
    predict.add_argument("--mixtures", required=True, type=Path,
                         help="mixtures CSV (index, the model's domains)")
    predict.add_argument("--out", required=True, type=output_file,
                         help="CSV to write: index and one predicted column per target")
    predict.set_defaults(func=cmd_predict)

    search = add_command(sub, "search", "search the simplex for the lowest predicted loss")
    search.add_argument("--model", required=True, type=Path, help="a folder `regmix fit` wrote")
    search.add_argument("--out", required=True, type=output_file, help="the chosen mixture (YAML)")
    search.add_argument("--target", help="which fitted target (if the folder has several)")
    search.add_argument("--method", default="cmaes", choices=["cmaes", "tpe", "paper"],
                        help="CMA-ES or TPE over the simplex, or the paper's recipe (mean of the "
                        "best 128 Dirichlet samples); default cmaes")
    search.add_argument("--trials", type=at_least(MIN_SEARCH_TRIALS),
                        help=f"objective evaluations: CMA-ES/TPE trials (default {SEARCH_TRIALS}; "
                        f"CMA-ES runs whole generations of {CMAES_POPULATION}, so up to "
                        f"{CMAES_POPULATION - 1} fewer) or the paper recipe's samples (default "
                        f"{PAPER_SAMPLES})")
    search.add_argument("--seed", type=at_least(0, MAX_SEED), default=0, help="default 0")
    for flag, what in (("--min-weight", "a lower bound on"), ("--max-weight", "an upper bound on"),
                       ("--fixed", "the exact")):
        search.add_argument(flag, type=weights_arg, action=MergeWeights, default={},
                            metavar="D=W,...", help=f"{what} domain D's weight; repeatable")
    # The max-epochs cap: w_d <= max_epochs x available_tokens[d] / token_budget.
    search.add_argument("--available-tokens", type=weights_arg, action=MergeWeights,
                        metavar="D=N,...", help="each domain's tokens for the large run, for "
                        "the max-epochs cap (every domain; repeatable)")
    search.add_argument("--token-budget", type=positive_number,
                        help="the large run's training tokens, for the max-epochs cap")
    search.add_argument("--max-epochs", type=positive_number,
                        help="repeat no domain more often than this in the large run")
    search.add_argument("--allow-extrapolation", action="store_true",
                        help="accept an optimum far from every training mixture")
    search.set_defaults(func=cmd_search)

    export = add_command(sub, "export", "write an experiment's proxy results as CSVs")
    export.add_argument("--experiment", required=True, help="the config's `name`")
    export.add_argument("--stage", action="append", dest="stages", metavar="STAGE",
                        help="export runs tagged regmix.stage=STAGE; repeat for several "
                             f"(default: {' and '.join(EXPORTED_STAGES)})")
    export.add_argument("--tracking-uri", help=f"MLflow tracking URI ({DEFAULT_TRACKING_HELP})")
    export.add_argument("--mixtures", required=True, type=output_file,
                        help="mixtures CSV to write (index, one column per domain)")
    export.add_argument("--losses", required=True, type=output_file,
                        help="losses CSV to write (index, one column per validation domain)")
    export.set_defaults(func=cmd_export)


def cmd_fit(args) -> int:
    reports = fit_csv(args.mixtures, args.losses, args.target, args.out, args.model, args.folds,
                      args.seed, args.tune_trials, args.per_domain_max_seconds)
    for r in reports:
        print(f"{r['target']}: {r['model']} CV Spearman {r['cv_spearman']:.4f} "
              f"(CV RMSE {r['cv_rmse']:.4f}), fitted in {r['seconds']:.1f} s")
        if r["per_domain"]:
            print(f"  per-domain {r['per_domain']}")
        if r["left_out"]:
            shown = ", ".join(map(str, r["left_out"][:20])) + (", ..." * (len(r["left_out"]) > 20))
            print(f"  left out {len(r['left_out'])} rows whose loss CV could not predict "
                  f"(index {shown})")
    print(f"wrote {args.out}")
    return 0


def cmd_predict(args) -> int:
    rows = predict_csv(args.model, args.mixtures, args.out)
    print(f"wrote {rows} predictions to {args.out}")
    return 0


def cmd_search(args) -> int:
    constraints = {"min_weight": args.min_weight, "max_weight": args.max_weight,
                   "fixed": args.fixed, "available_tokens": args.available_tokens,
                   "token_budget": args.token_budget, "max_epochs": args.max_epochs}
    trials = args.trials or default_trials(args.method)
    try:
        record = search_model(args.model, args.out, args.target, args.method, trials,
                              args.seed, constraints, args.allow_extrapolation)
    except ValueError as e:  # infeasible constraints or a refused extrapolation
        raise DataError(str(e)) from None
    uncertainty, gain = record["uncertainty"], record.get("predicted_gain")
    error = f"CV RMSE {uncertainty['cv_rmse']:.4f}, " if "cv_rmse" in uncertainty else ""
    print(f"{record['target']}: predicted {record['predicted']:.4f} ({error}members disagree by "
          f"{uncertainty['members_spread']:.4f}; {record['method']}, {record['seconds']:.1f} s); "
          f"wrote {args.out}")
    if gain is not None:
        meaning = {"within the CV error": "within the CV error: no evidence either way",
                   "better": "better beyond the CV error",
                   "worse": "worse beyond the CV error"}[gain["verdict"]]
        margin = gain["over_best_training_proxy"]
        side = "below" if margin > 0 else "above" if margin < 0 else "at"
        print(f"  predicted {abs(margin):.4f} {side} the best training proxy's prediction: {meaning}")
    return 0


def cmd_export(args) -> int:
    from components.tracking import checked_tracking_uri, default_tracking_uri

    uri = checked_tracking_uri(args.tracking_uri or default_tracking_uri(), existing=True)
    try:
        rows = export_csv(uri, args.experiment, args.stages or list(EXPORTED_STAGES),
                          args.mixtures, args.losses)
    except ValueError as e:
        raise DataError(str(e)) from None
    print(f"wrote {rows} proxies to {args.mixtures} and {args.losses}")
    return 0
