"""Bring your own results: `regmix fit`, `regmix predict`, `regmix search` on CSV files.

The CSVs are the paper's format (an `index` column pairs a mixtures file, one column per
domain, with a losses file, one column per target), so the published RegMix data works as is.
A model folder holds one subfolder per target plus `targets.json` and the training mixtures.
"""

import argparse
import math
from pathlib import Path
from typing import get_args

from regmix.byo import EXPORTED_STAGES, export_csv, fit_csv, parse_target, predict_csv, search_model
from regmix.config.sections import (
    CMAES_POPULATION,
    MAX_SEED,
    MIN_SEARCH_TRIALS,
    PAPER_SAMPLES,
    PER_DOMAIN_MAX_SECONDS,
    SEARCH_TRIALS,
    RegressionModel,
    default_trials,
)
from regmix.errors import DataError
from regmix.tracking.runs import checked_tracking_uri, default_tracking_uri


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

    uri = checked_tracking_uri(args.tracking_uri or default_tracking_uri(), existing=True)
    try:
        rows = export_csv(uri, args.experiment, args.stages or list(EXPORTED_STAGES),
                          args.mixtures, args.losses)
    except ValueError as e:
        raise DataError(str(e)) from None
    print(f"wrote {rows} proxies to {args.mixtures} and {args.losses}")
    return 0
