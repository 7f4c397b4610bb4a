"""The whole config, `RegMixConfig`, its cross-section checks and the settings fixed at compile time."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from regmix.config.cluster import ClusterConfig
from regmix.config.constraints import search_constraints
from regmix.config.sections import (
    BUILT_IN_BASELINES,
    MAX_SEED,
    PIPELINE_NAME,
    ActiveLearningConfig,
    CorpusConfig,
    GateConfig,
    LargeConfig,
    MixtureConfig,
    ProxyConfig,
    RankCheckConfig,
    RegressionConfig,
    SearchConfig,
    Strict,
    TokenizerConfig,
    TrackingConfig,
    check_mixture,
    check_names,
    check_trainable,
)
from regmix.errors import ConfigError


class RegMixConfig(Strict):
    name: str = Field(pattern=PIPELINE_NAME)  # pipeline and MLflow experiment name
    seed: int = Field(0, ge=0, le=MAX_SEED)
    corpus: CorpusConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    mixtures: MixtureConfig = MixtureConfig()
    proxy: ProxyConfig
    regression: RegressionConfig = RegressionConfig()
    search: SearchConfig = SearchConfig()
    active_learning: ActiveLearningConfig = ActiveLearningConfig()
    gate: GateConfig = GateConfig()
    large: LargeConfig
    rank_check: RankCheckConfig = RankCheckConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()
    # How `regmix run` runs the stages on this machine: subprocesses of this environment, or
    # containers of the project's image against an MLflow server (a rehearsal of the cluster)
    runner: Literal["subprocess", "docker"] = "subprocess"

    @model_validator(mode="after")
    def _gate_baselines_are_known(self):
        unknown = [b for b in self.gate.baselines
                   if b not in BUILT_IN_BASELINES and b not in self.large.extra_baselines]
        if unknown:
            raise ValueError(f"gate.baselines: {unknown} are neither {list(BUILT_IN_BASELINES)} "
                             "nor named in large.extra_baselines; define them there")
        return self

    @model_validator(mode="after")
    def _tokens_cover_a_window(self):
        runs = {"proxy": self.proxy, "large": self.large}
        if self.rank_check.mixtures:
            runs["rank_check"] = self.rank_check
        for field, run in runs.items():
            context = run.model.resolve().context
            # Validation loss is averaged over windows of `context` tokens (plus the next one).
            if self.corpus.validation_tokens <= context:
                raise ValueError(
                    f"corpus.validation_tokens ({self.corpus.validation_tokens}) must exceed "
                    f"{field}.model's context ({context}): raise it to at least {context + 1}")
            # A step takes batch_size windows; a smaller budget would still train one step.
            step = run.train.batch_size * context
            if run.train.tokens < step:
                raise ValueError(
                    f"{field}.train.tokens ({run.train.tokens}) is less than one step's "
                    f"batch_size x context = {step} tokens: raise it or lower batch_size")
        return self

    def check_domains(self, domains: list[str], targets: list[str] = (),
                      meta: dict | None = None) -> None:
        """Check every domain the config names exists in the corpus, mixtures sum to 1, and some
        mixture meets the search's bounds; with the prepared corpus's `meta`, also under the
        max-epochs cap over each domain's tokens. The pipeline checks with `meta` before any
        proxy trains: a corpus spec's or tinypile's domains are known only once it is prepared.
        `domains` are the training domains; the target may also name the target-only sets
        `targets`, which no mixture or bound may name."""
        known = set(domains)
        target = self.regression.target
        if isinstance(target, dict):
            check_mixture("regression.target", target, known | set(targets))
        elif target != "mean":
            check_names("regression.target", [target], known | set(targets))
        search = self.search
        for field, named in (("search.min_weight", search.min_weight),
                             ("search.max_weight", search.max_weight),
                             ("search.fixed", search.fixed),
                             *((f"large.extra_baselines.{n}", m)
                               for n, m in self.large.extra_baselines.items())):
            check_trainable(field, named, targets)
        for name, mixture in self.large.extra_baselines.items():
            check_mixture(f"large.extra_baselines.{name}", mixture, known)
        # The search's own check, so that bounds no mixture can meet fail now, not after the
        # proxies have trained.

        try:
            search_constraints(self, meta).check(domains)
        except ValueError as e:
            raise ConfigError(f"search: {e}") from None


# What the compiled pipeline is built from: the pods' resources and images, how many tasks run
# at once, how many loops are unrolled and whether the rank check exists. A run's `config`
# parameter (editable in the KFP UI) cannot change them, so a run that tries is refused.
COMPILED_SETTINGS = ("cluster", "proxy.parallelism", "large.parallelism",
                     "active_learning.rounds", "rank_check.mixtures")


def compiled_settings(config: RegMixConfig) -> dict:
    """The config's COMPILED_SETTINGS, flattened to dotted names of single values."""
    dumped, settings = config.model_dump(mode="json"), {}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                flatten(f"{prefix}.{key}", inner)
        else:
            settings[prefix] = value

    for dotted in COMPILED_SETTINGS:
        value = dumped
        for key in dotted.split("."):
            value = value[key]
        flatten(dotted, value)
    return settings


def check_compiled_settings(config: RegMixConfig, compiled: dict) -> None:
    """Refuse a run whose config changes what its pipeline was compiled with."""
    settings = compiled_settings(config)
    changed = [f"{dotted} to {json.dumps(settings.get(dotted))} (compiled: "
               f"{json.dumps(compiled.get(dotted))})"
               for dotted in sorted(settings.keys() | compiled.keys())
               if settings.get(dotted) != compiled.get(dotted)]
    if changed:
        raise ConfigError(f"this run's config changes {', '.join(changed)}; the pipeline was "
                          "compiled with those (pod resources, task counts, loops), so a run "
                          "cannot change them: recompile with `regmix compile` (or submit the "
                          "edited YAML with `regmix submit`) instead of editing them in the run")
