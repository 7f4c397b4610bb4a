"""Benchmark the regression and search stages on the RegMix paper's real proxy results.

Fits on the paper's 512 training mixtures only (every setting by k-fold CV on them) and scores
the Spearman rank correlation of predicted vs. measured loss on its 256 unseen mixtures:

    python benchmarks/paper_regression.py            # everything (several minutes on 2 cores)
    python benchmarks/paper_regression.py --quick    # about a minute
    python benchmarks/paper_regression.py --json     # one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
from scipy.stats import spearmanr

from regmix.paper_data import ProxyTable, read_proxy_csvs
from regmix.regression.selection import MODELS, fit_regressor, fit_target
from regmix.search import paper_search, search_mixture

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "regmix-paper-data"
HEADLINE = "metric/the_pile_pile_cc_val_loss"


@dataclass
class Data:
    train: ProxyTable
    test: ProxyTable

    def target(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return (
            self.train.losses[:, self.train.targets.index(name)],
            self.test.losses[:, self.test.targets.index(name)],
        )


def load(directory: Path) -> Data:
    return Data(
        read_proxy_csvs(directory / "train_mixture_1m.csv", directory / "train_pile_loss_1m.csv"),
        read_proxy_csvs(directory / "test_mixture_1m.csv", directory / "test_pile_loss_1m.csv"),
    )


def authors_recipe(weights, y, test_weights, test_y) -> np.ndarray:
    """The authors' notebook: LightGBM, lr 0.01, up to 1000 rounds, early stopping on the
    *test* set (3 rounds' patience) -- the number of rounds is chosen with the test labels."""
    model = lgb.LGBMRegressor(
        objective="regression", n_estimators=1000, learning_rate=1e-2, seed=42, verbose=-1
    )
    model.fit(
        weights,
        y,
        eval_X=(test_weights,),
        eval_y=(test_y,),
        callbacks=[lgb.early_stopping(3, verbose=False)],
    )
    return model.predict(test_weights)


def rho(predicted: np.ndarray, measured: np.ndarray) -> float:
    return float(spearmanr(predicted, measured)[0])


def rho_sd(predicted: np.ndarray, measured: np.ndarray, resamples: int = 1000) -> float:
    """How precisely the unseen mixtures measure `rho`: its standard deviation over bootstrap
    resamples of them (seeded). Two models whose scores differ by much less are tied on this
    test set, whatever the digits say."""
    draws = np.random.default_rng(0).integers(0, len(measured), size=(resamples, len(measured)))
    return float(np.std([rho(predicted[rows], measured[rows]) for rows in draws]))


@dataclass
class Fit:
    out_of_fold: np.ndarray  # CV predictions on the training rows
    predicted: np.ndarray  # on the unseen mixtures


def score_model(
    data: Data, model: str, targets: list[str], rows: int, tune: int
) -> tuple[dict, dict[str, Fit]]:
    """Spearman on the unseen mixtures for each target, and the total fit seconds; and each
    target's fit (none for the authors' recipe, which has no CV)."""
    by_target, seconds, chosen, fits, left_out, headline_sd = {}, 0.0, {}, {}, 0, None
    for name in targets:
        y, test_y = data.target(name)
        start = time.perf_counter()
        if model == "authors (leaks test)":
            predicted = authors_recipe(data.train.weights[:rows], y[:rows], data.test.weights, test_y)
        else:
            regressor, report = fit_regressor(
                data.train.weights[:rows], y[:rows], data.train.domains, model, tune_trials=tune
            )
            predicted = regressor.predict(data.test.weights)
            chosen[name] = report.model
            left_out += len(report.left_out)
            fits[name] = Fit(report.out_of_fold, predicted)
        seconds += time.perf_counter() - start
        by_target[name] = rho(predicted, test_y)
        if name == HEADLINE:
            headline_sd = rho_sd(predicted, test_y)
    return {
        "model": model,
        "train_rows": rows,
        "tune_trials": tune,
        "targets": len(targets),
        "pile_cc": by_target.get(HEADLINE),
        "pile_cc_sd": headline_sd,
        "mean": float(np.mean(list(by_target.values()))),
        "fit_seconds": seconds,
        "chosen": sorted(set(chosen.values())),
        # proxies left out as outliers, summed over the targets (each target's fit decides)
        "left_out": left_out,
    }, fits


def run_noise_rows(data: Data, fits: dict[str, Fit]) -> list[dict]:
    """How much of each target's error on the unseen mixtures is run-to-run noise.

    Each proxy is one training run, and a lucky run is lucky on every domain. On the training
    rows, a target's CV residual is partly a linear combination of the other targets'
    residuals (for Pile-CC, 60 % of its variance), and no model predicts that shared part
    from the mixture (CV R^2 about 0 for ridge, LightGBM and the GP): it is noise. Those
    training-row coefficients, applied to the unseen mixtures' residuals, estimate each
    measured loss's run noise. `ceiling` is what a perfect predictor of the noise-free loss
    would score against the measured losses: the best any regression from the mixture can
    reach, counting this noise alone. `vs_noise_free` scores the model against the noise-free
    losses. Like every score here, it uses the unseen mixtures' labels.
    """
    names = list(fits)
    train_residuals = np.column_stack([data.target(n)[0] - fits[n].out_of_fold for n in names])
    measured = np.column_stack([data.target(n)[1] for n in names])
    test_residuals = measured - np.column_stack([fits[n].predicted for n in names])
    rows = []
    for column, name in enumerate(names):
        others = np.delete(np.arange(len(names)), column)
        coefficients = np.linalg.lstsq(
            train_residuals[:, others], train_residuals[:, column], rcond=None
        )[0]
        noise = test_residuals[:, others] @ coefficients
        noise_free = measured[:, column] - noise
        rows.append({
            "target": name,
            "spearman": rho(fits[name].predicted, measured[:, column]),
            "noise_share": float(1 - np.var(test_residuals[:, column] - noise)
                                 / np.var(test_residuals[:, column])),
            "ceiling": rho(noise_free, measured[:, column]),
            "vs_noise_free": rho(fits[name].predicted, noise_free),
        })
    means = {k: float(np.mean([row[k] for row in rows])) for k in rows[0] if k != "target"}
    return [*rows, {"target": "mean", **means}]


def mean_target_row(data: Data, rows: int) -> dict:
    """The mean loss over the 13 validation domains as one target (what a run's default
    `target: mean` asks for): fitted as one column, and by `auto`, which may fit it per domain."""
    columns = [data.target(name) for name in data.train.targets]
    losses, test_losses = (np.column_stack(side) for side in zip(*columns, strict=True))
    shares = np.full(len(columns), 1 / len(columns))
    weights, row = data.train.weights[:rows], {"train_rows": rows}
    for label, fit in (
        ("one_column", lambda: fit_regressor(weights, losses[:rows] @ shares, data.train.domains)),
        ("auto", lambda: fit_target(weights, losses[:rows], shares, data.train.domains)),
    ):
        start = time.perf_counter()
        regressor, report = fit()
        row[label] = rho(regressor.predict(data.test.weights), test_losses @ shares)
        row[f"{label}_model"] = report.model
        row[f"{label}_seconds"] = time.perf_counter() - start
    return row


def search_rows(data: Data, samples: int) -> list[dict]:
    """Search the Pile-CC regressor: CMA-ES against the paper's sample-and-average recipe."""
    y, _ = data.target(HEADLINE)
    regressor, _ = fit_regressor(data.train.weights, y, data.train.domains)
    prior = data.train.weights.mean(axis=0)  # the training mixtures' centre stands in
    common = {"train_weights": data.train.weights, "allow_extrapolation": True}
    results = [
        search_mixture(regressor, prior, **common),
        paper_search(regressor, prior, samples=samples, **common),
    ]
    return [
        {
            "method": r.method,
            "trials": r.trials,
            "predicted": r.predicted,
            "spread": r.spread,
            "nearest_l1": r.nearest_distance,
            "seconds": r.seconds,
            "best_training_loss": float(y.min()),
        }
        for r in results
    ]


def synthetic_row(domains: int, proxies: int, seed: int = 0) -> dict:
    """A synthetic problem at scale: smooth diminishing returns in each domain's weight."""
    rng = np.random.default_rng(seed)
    importance = rng.uniform(0.1, 1.0, size=domains)
    weights = rng.dirichlet(np.full(domains, 0.3), size=proxies + 500)
    loss = 3.0 - 0.3 * np.log(weights + 1e-3) @ -importance / domains
    loss += rng.normal(0, 0.003, size=len(loss))
    names = [f"d{i}" for i in range(domains)]
    train, held_out = slice(0, proxies), slice(proxies, None)
    start = time.perf_counter()
    regressor, report = fit_regressor(weights[train], loss[train], names)
    fit_seconds = time.perf_counter() - start
    found = search_mixture(
        regressor, np.full(domains, 1 / domains), train_weights=weights[train], allow_extrapolation=True
    )
    return {
        "domains": domains,
        "proxies": proxies,
        "model": report.model,
        "cv_spearman": report.cv_spearman,
        "held_out_spearman": rho(regressor.predict(weights[held_out]), loss[held_out]),
        "fit_seconds": fit_seconds,
        "search_seconds": found.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true", help="Pile-CC only, fewer sizes (~1 min)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--tune-trials", type=int, default=10)
    args = parser.parse_args()
    data = load(args.data)
    every = data.train.targets
    targets = [HEADLINE] if args.quick else every

    def emit(section: str, row: dict) -> None:
        if args.json:
            print(json.dumps({"section": section, **row}), flush=True)
            return
        cells = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
        print(f"{section:<15} " + "  ".join(cells), flush=True)

    for model in ("authors (leaks test)", *MODELS):
        emit("models", score_model(data, model, targets, 512, tune=0)[0])
    row, auto_fits = score_model(data, "auto", targets, 512, tune=0)
    emit("models", row)
    if len(auto_fits) > 1:  # the shared run noise is estimated from the other targets
        for row in run_noise_rows(data, auto_fits):
            emit("run_noise", row)
    emit("models", score_model(data, "auto", targets, 512, tune=args.tune_trials)[0])
    for row in search_rows(data, samples=20_000 if args.quick else 100_000):
        emit("search", row)
    for rows in (32, 128, 512) if args.quick else (32, 64, 128, 256, 512):
        emit("learning_curve", score_model(data, "auto", targets, rows, tune=0)[0])
    for rows in (32, 128) if args.quick else (32, 128, 512):
        emit("mean_target", mean_target_row(data, rows))
    emit("synthetic", synthetic_row(30, 300) if args.quick else synthetic_row(100, 1000))


if __name__ == "__main__":
    main()
