"""Bounds on mixture weights (min, max, fixed, a max-epochs cap), checked before anything trains."""

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Constraints:
    min_weight: dict[str, float] = field(default_factory=dict)  # per domain
    max_weight: dict[str, float] = field(default_factory=dict)
    fixed: dict[str, float] = field(default_factory=dict)  # domain -> exact weight
    # With token_budget and max_epochs: w_d <= max_epochs * available_tokens[d] / token_budget,
    # so that no domain is repeated more than max_epochs times in the final run.
    available_tokens: dict[str, int] | None = None
    token_budget: int | None = None
    max_epochs: float | None = None

    def record(self, allow_extrapolation: bool) -> dict:
        """The constraints as asked (settings left unset omitted: KFP carries no nulls)."""
        asked = {k: v for k, v in asdict(self).items() if v is not None and v != {}}
        return {**asked, "allow_extrapolation": allow_extrapolation}

    def _epoch_cap(self, domains: list[str]) -> np.ndarray:
        if self.available_tokens is None or self.token_budget is None or self.max_epochs is None:
            return np.ones(len(domains))
        tokens = np.array([self.available_tokens[d] for d in domains], dtype=float)
        return np.minimum(1.0, self.max_epochs * tokens / self.token_budget)

    def _free_bounds(self, domains: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Bounds before fixed weights are applied."""
        lower = np.array([self.min_weight.get(d, 0.0) for d in domains], dtype=float)
        upper = np.array([self.max_weight.get(d, 1.0) for d in domains], dtype=float)
        return lower, np.minimum(upper, self._epoch_cap(domains))

    def lower_bounds(self, domains: list[str]) -> np.ndarray:
        lower = self._free_bounds(domains)[0]
        for i, d in enumerate(domains):
            lower[i] = self.fixed.get(d, lower[i])
        return lower

    def upper_bounds(self, domains: list[str]) -> np.ndarray:
        upper = self._free_bounds(domains)[1]
        for i, d in enumerate(domains):
            upper[i] = self.fixed.get(d, upper[i])
        return upper

    def check(self, domains: list[str]) -> None:
        """Raise ValueError, saying what to change, unless some mixture satisfies everything."""
        known = set(domains)
        named = {
            "min_weight": self.min_weight,
            "max_weight": self.max_weight,
            "fixed": self.fixed,
            "available_tokens": self.available_tokens or {},
        }
        for what, values in named.items():
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{what} names unknown domains {unknown}; domains are {domains}")
        token_settings = (self.available_tokens, self.token_budget, self.max_epochs)
        if any(s is not None for s in token_settings) and None in token_settings:
            raise ValueError(
                "the max-epochs cap needs available_tokens, token_budget and max_epochs together"
            )
        if self.available_tokens is not None:
            missing = sorted(known - set(self.available_tokens))
            if missing:
                raise ValueError(f"available_tokens lacks domains {missing}")
            if self.token_budget <= 0 or self.max_epochs <= 0:
                raise ValueError("token_budget and max_epochs must be positive")
        for what, values in (("min_weight", self.min_weight), ("max_weight", self.max_weight)):
            outside = {d: w for d, w in values.items() if not 0.0 <= w <= 1.0}
            if outside:
                raise ValueError(f"{what} {outside} outside [0, 1]")
        lower, upper = self._free_bounds(domains)
        for i, d in enumerate(domains):
            if lower[i] > upper[i]:
                raise ValueError(
                    f"domain '{d}': minimum weight {lower[i]:g} above its maximum {upper[i]:g} "
                    "(max_weight or the max-epochs cap)"
                )
            if d in self.fixed and not lower[i] <= self.fixed[d] <= upper[i]:
                raise ValueError(
                    f"domain '{d}': fixed weight {self.fixed[d]:g} outside its bounds "
                    f"[{lower[i]:g}, {upper[i]:g}] (min_weight, max_weight, max-epochs cap)"
                )
        lower, upper = self.lower_bounds(domains), self.upper_bounds(domains)
        if lower.sum() > 1.0 + 1e-12:
            raise ValueError(
                f"minimum and fixed weights sum to {lower.sum():.6g} > 1; lower some of them"
            )
        if upper.sum() < 1.0 - 1e-12:
            causes = [(cause, fix) for cause, fix, given in (
                ("max_weight", "raise max_weight", self.max_weight),
                ("max-epochs cap", "raise max_epochs, lower the token budget or add data",
                 self.max_epochs is not None),
                ("fixed", "raise the fixed weights or fix fewer domains", self.fixed),
            ) if given]
            raise ValueError(
                f"maximum weights ({', '.join(c for c, _ in causes)}) sum to {upper.sum():.6g} "
                f"< 1: no mixture fits; {', or '.join(f for _, f in causes)}"
            )

    def upper_bounds_in_trained_region(self, domains: list[str], train_weights) -> np.ndarray:
        """The upper bounds, each domain also capped at the largest weight any training mixture
        gave it; raise ValueError, saying what to change, if the bounds leave that region."""
        lower, upper = self.lower_bounds(domains), self.upper_bounds(domains)
        trained = np.asarray(train_weights, dtype=float).max(axis=0)
        for i, d in enumerate(domains):
            if lower[i] > trained[i] + 1e-9:
                raise ValueError(
                    f"domain '{d}': the constraints ask for at least {lower[i]:g}, but no proxy "
                    f"was trained above {trained[i]:g} of it, so the prediction there is an "
                    "extrapolation. Train proxies there, relax min_weight/fixed, or set "
                    "search.allow_extrapolation (`regmix search --allow-extrapolation`)"
                )
        upper = np.minimum(upper, trained)
        if upper.sum() < 1.0 - 1e-12:
            raise ValueError(
                "no mixture satisfies the constraints inside the trained region (each domain at "
                "most its largest weight among the training proxies); relax max_weight or "
                "max_epochs, or set search.allow_extrapolation (`regmix search --allow-extrapolation`)"
            )
        return upper


# ---------------------------------------------------------------- the pipeline stage
def search_constraints(config, meta: dict | None) -> Constraints:
    """The config's bounds plus the large run's max-epochs cap over each domain's tokens (which
    needs the prepared corpus's `meta`; without it, the bounds alone)."""
    search = config.search
    cap = {} if search.max_epochs is None or meta is None else {
        "available_tokens": {d: meta["tokens"][d]["train"] for d in meta["domains"]},
        "token_budget": config.large.train.tokens, "max_epochs": search.max_epochs,
    }
    return Constraints(min_weight=dict(search.min_weight), max_weight=dict(search.max_weight),
                       fixed=dict(search.fixed), **cap)
