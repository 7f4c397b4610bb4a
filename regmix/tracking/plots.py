"""The figures the regression and search stages save (and the report reuses): plain functions
from arrays to a PNG file, so the pipeline's stages and `regmix fit|search` draw the same.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on pods or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def predicted_vs_measured(measured: np.ndarray, predicted: np.ndarray, title: str,
                          path: Path, outliers: list[int] = ()) -> Path:
    """Out-of-fold predictions against the measured losses, with the diagonal; the rows left
    out of the fit as outliers marked (red crosses), not hidden."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    kept = np.setdiff1d(np.arange(len(measured)), outliers)
    ax.scatter(predicted[kept], measured[kept], s=10, alpha=0.7, label="fitted")
    if len(outliers):
        ax.scatter(predicted[list(outliers)], measured[list(outliers)], s=30, marker="x",
                   color="tab:red", label="left out (outlier)")
        ax.legend(fontsize=7)
    low, high = min(measured.min(), predicted.min()), max(measured.max(), predicted.max())
    ax.plot([low, high], [low, high], color="gray", linewidth=1)
    ax.set_xlabel("predicted (cross-validated)")
    ax.set_ylabel("measured")
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def domain_interaction(coefficients: np.ndarray, losses: list[str], domains: list[str],
                       path: Path, linear_cv: float | None = None) -> Path:
    """The paper's domain-interaction figure: how each training domain's weight moves each
    validation loss (a linear model's coefficients, a row per loss). Each row is scaled to its
    largest |coefficient|, so that rows of very different loss ranges share one colour scale;
    negative (blue): more of that domain lowers that loss. `linear_cv`: how well a linear model
    ranks the target (its CV Spearman), shown in the title: a low one says to read it loosely."""
    scaled = coefficients / np.maximum(np.abs(coefficients).max(axis=1, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(domains), 1.2 + 0.4 * len(losses)))
    image = ax.imshow(scaled, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(domains)), domains, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(losses)), losses, fontsize=7)
    ax.set_xlabel("training domain weight")
    ax.set_ylabel("validation loss")
    fig.colorbar(image, ax=ax, label="coefficient / row's largest |coefficient|")
    ranks = "" if linear_cv is None else f"; its CV Spearman on the target {linear_cv:.2f}"
    ax.set_title(f"Domain interactions (linear model{ranks})", fontsize=9)
    return save(fig, path)


def mixtures(series: dict[str, dict[str, float]], title: str, path: Path) -> Path:
    """Bars of several mixtures side by side, domains ordered by the first mixture's weight."""
    first = next(iter(series.values()))
    domains = sorted(first, key=first.get, reverse=True)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(series)
    for k, (name, weights) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(domains))], [weights.get(d, 0) for d in domains],
               width, label=name)
    ax.set_xticks(range(len(domains)), domains, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("weight")
    ax.legend()
    ax.set_title(title)
    return save(fig, path)


def simulated_losses(predicted: np.ndarray, marks: dict[str, float], path: Path) -> Path:
    """The regression's predicted loss over the mixtures sampled around the prior (the paper's
    simulation), with vertical lines at `marks` (the chosen mixture, the best training proxy)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(predicted, bins=60, color="tab:gray")
    for (name, value), color in zip(marks.items(), ("tab:green", "tab:red", "tab:blue"),
                                    strict=False):
        ax.axvline(value, color=color, label=f"{name} {value:.4f}")
    ax.set_xlabel("predicted loss")
    ax.set_ylabel("sampled mixtures")
    ax.legend(fontsize=8)
    ax.set_title(f"Predicted loss of {len(predicted):,} simulated mixtures", fontsize=9)
    return save(fig, path)
