"""The config's sections, one typed model per stage; `schema.RegMixConfig` holds them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from regmix.config.constraints import Constraints
from regmix.config.shapes import SHAPES, ModelShape
from regmix.errors import ConfigError


class Strict(BaseModel):
    # No NaN or infinity anywhere: neither is a meaningful setting, and KFP cannot carry them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Share = Annotated[float, Field(ge=0, le=1)]  # a domain's weight in a mixture

# Patterns of string settings (a Kubernetes quantity's typo then fails at load time, not in a
# pending pod), and what they ask for in words, for error messages
NAME = r"^[A-Za-z0-9_.-]+$"
PIPELINE_NAME = r"^[a-z0-9][a-z0-9-]*$"
SECONDS = r"^[0-9]+s$"
CPU_QUANTITY = r"^([0-9]*[.])?[0-9]+m?$"
MEMORY_QUANTITY = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"
PATTERN_WORDS = {
    NAME: "letters, digits, '_', '.' and '-'",
    PIPELINE_NAME: "lowercase letters, digits and '-', first a letter or digit (it names the "
                   "Kubeflow pipeline and the MLflow experiment), such as regmix-local",
    SECONDS: "whole seconds, such as 60s",
    CPU_QUANTITY: "a Kubernetes CPU quantity, such as 8 or 500m",
    MEMORY_QUANTITY: "a Kubernetes memory quantity, such as 64Gi",
}

# A memory quantity's suffix (MEMORY_QUANTITY) in bytes
MEMORY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity matching MEMORY_QUANTITY, such as 64Gi, in bytes."""
    digits = quantity.rstrip("EPTGMKi")
    return int(digits) * MEMORY_UNITS[quantity[len(digits):]]


class DomainSource(Strict):
    """One corpus domain: local files (jsonl/txt/parquet; a file, folder or glob) or a HF dataset."""

    name: str = Field(pattern=NAME)
    path: str | None = None
    hf_path: str | None = None
    hf_name: str | None = None
    hf_split: str = "train"
    text_column: str = "text"
    # target: a validation set only (a benchmark's text, a held-out quality set): measured on
    # every proxy and larger run, a possible regression target, never sampled into a mixture
    role: Literal["train", "target"] = "train"

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hf_path is None):
            raise ValueError(f"domain '{self.name}': give exactly one of `path` or `hf_path`")
        return self


class CorpusConfig(Strict):
    tinypile: Literal["tiny", "full"] | None = None  # build the bundled demo corpus
    spec: str | None = None  # a corpus YAML: {name, domains: [...]}
    domains: list[DomainSource] | None = None  # or the domains inline
    validation_tokens: int = Field(16_384, gt=0)  # fixed held-out tokens per domain
    # Training tokens kept per domain (None: all). Preparation stops reading a domain there, so
    # a cap saves time on a huge corpus; but the sampling prior (token shares) and the max-epochs
    # limits then see the capped counts.
    max_train_tokens: int | None = Field(None, gt=0)
    # Domains made target-only sets (as `role: target` does) by name: for a corpus whose domain
    # list is not yours to edit, such as tinypile or a shared spec
    target_only: list[Annotated[str, Field(pattern=NAME)]] = []

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("tinypile", "spec", "domains") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `tinypile` (tiny|full), `spec` (a corpus YAML) or "
                f"`domains` (a list); got {given or 'none'}"
            )
        if self.domains is not None:
            if len(self.domains) < 2:
                raise ValueError(f"corpus.domains: a mixture needs at least 2 domains, "
                                 f"found {len(self.domains)}")
            check_unique([d.name for d in self.domains], "corpus.domains")
        check_unique(self.target_only, "corpus.target_only")
        return self

    def roles(self, names: list[str], declared: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        """The corpus's training domains and its target-only sets, in corpus order, from its
        domain `names` and those `declared` with `role: target`."""
        unknown = sorted(set(self.target_only) - set(names))
        if unknown:
            raise ConfigError(f"corpus.target_only: unknown domain(s) {unknown}; the corpus has "
                              f"{sorted(names)}")
        targets = [n for n in names if n in set(declared) | set(self.target_only)]
        train = [n for n in names if n not in targets]
        if len(train) < 2:
            raise ConfigError(
                f"corpus: a mixture needs at least 2 training domains, found {len(train)} "
                f"({len(targets)} of the {len(names)} are target-only sets, role: target); "
                "make more of them `role: train`")
        return train, targets


class TokenizerConfig(Strict):
    kind: Literal["bpe", "file", "hf"] = "bpe"
    vocab_size: int = Field(4096, ge=256, le=1 << 20)  # for kind=bpe
    path: str | None = None  # for kind=file: a tokenizer.json
    name: str | None = None  # for kind=hf: a Hugging Face tokenizer name
    train_bytes_per_domain: int = Field(2_000_000, gt=0)  # bpe training sample per domain
    # The token put between documents; None: the first of data.EOS_NAMES the tokenizer has
    eos_token: str | None = None

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "file" and not self.path:
            raise ValueError("tokenizer.kind 'file' needs `path` (a tokenizer.json)")
        if self.kind == "hf" and not self.name:
            raise ValueError("tokenizer.kind 'hf' needs `name` (e.g. EleutherAI/gpt-neox-20b)")
        return self


class TrainRecipe(Strict):
    """The paper's recipe: AdamW, warmup then cosine decay to a floor, clipping, a token budget."""

    tokens: int = Field(gt=0)  # training token budget
    batch_size: int = Field(16, gt=0)  # sequences per optimizer step
    micro_batch_size: int | None = Field(None, gt=0)  # None: no gradient accumulation
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9, 0.95)  # AdamW's, each in [0, 1)
    grad_clip: float = Field(1.0, gt=0)
    # auto: bf16 autocast where the device has it (CUDA), float32 elsewhere
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(1000, ge=0)  # optimizer steps between checkpoints; 0: none
    # How several GPUs (torchrun, accelerate launch) share the model: each holds a replica
    # (ddp), or a shard of parameters, gradients and optimizer state (fsdp, for large models).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # torch.compile the model (its body: the output layer compiles its own softmax) after a
    # one-off compile per process: 1.11x the steps on 2 CPU cores (local-proxy), 1.21-1.28x on an
    # H200 (proxy-1m) in no more memory than eager (docs/deploy.md)
    compile: bool = False

    def identity(self) -> dict:
        """The settings that decide what a run computes: the recipe in a result's content hash.
        Gradient accumulation changes only float rounding, and logging and checkpoint intervals
        nothing, so changing them keeps every finished result. (`distributed` and `compile`
        stay in: they change how checkpoints are stored, and checkpoints share the hash.)
        `mixed_precision: auto` stays `auto`: runs are planned in a CPU pod, which cannot know
        what the trainer's device resolves it to; an experiment whose runs train on both CPUs
        and GPUs should name the precision, or bf16 and float32 results share hashes."""
        return self.model_dump(mode="json", exclude={"micro_batch_size", "log_every",
                                                     "checkpoint_every"})

    @model_validator(mode="after")
    def _micro(self):
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


SHAPE_TAGS = ("name", "inline")  # a model shape is one of SHAPES by name, or its fields inline


class ModelConfig(Strict):
    # A name from config.shapes.SHAPES, or the fields inline (errors then name the field)
    shape: Annotated[
        Annotated[str, Tag(SHAPE_TAGS[0])] | Annotated[ModelShape, Tag(SHAPE_TAGS[1])],
        Discriminator(lambda v: SHAPE_TAGS[0] if isinstance(v, str) else SHAPE_TAGS[1]),
    ]

    @field_validator("shape")
    @classmethod
    def _known(cls, v):
        if isinstance(v, str) and v not in SHAPES:
            raise ValueError(f"unknown shape '{v}'; known: {', '.join(SHAPES)}")
        return v

    def resolve(self) -> ModelShape:
        return SHAPES[self.shape] if isinstance(self.shape, str) else self.shape


# The paper's (RegMix, synthesize_mixture.py) range of Dirichlet strengths
STRENGTH_RANGE = (0.1, 5.0)


class MixtureConfig(Strict):
    """The paper's sampler: Dirichlet around the token prior."""

    count: int = Field(32, ge=3)  # the regression needs at least 3 proxies
    temperature: float = Field(0.5, gt=0)  # prior = token share ** temperature, renormalised
    strength_min: float = Field(STRENGTH_RANGE[0], gt=0)
    strength_max: float = Field(STRENGTH_RANGE[1], gt=0)
    min_weight: float = Field(0.002, ge=0, lt=1)  # weights below are zeroed
    max_epochs: float = Field(4.0, gt=0)  # no domain repeated more in a proxy's budget
    include_prior: bool = True  # also train the prior itself (a natural baseline point)

    @model_validator(mode="after")
    def _range(self):
        if self.strength_min > self.strength_max:
            raise ValueError("mixtures.strength_min must be <= strength_max")
        return self

    @property
    def strength_range(self) -> tuple[float, float]:
        return self.strength_min, self.strength_max


# Torch CPU threads per training task; None: torch's default (one per core). Where tasks share
# cores (kfp.local runs two at a time) use cores / 2: oversubscribed OpenMP threads stall each
# other, up to 10x slower on 2 cores when two tasks train at once.
CpuThreads = Annotated[int | None, Field(ge=1)]


class ProxyConfig(Strict):
    model: ModelConfig
    train: TrainRecipe
    per_task: int = Field(1, ge=1)  # proxies trained in one task (pod)
    packed: bool = False  # train a task's proxies at once as one batched model (train/packed.py)
    cpu_threads: CpuThreads = None
    parallelism: int = Field(8, ge=1)  # concurrent proxy tasks on a cluster


# The regression stage's models (regmix/regression/), named here so that configs and the
# command line validate them without importing the stage's heavy libraries.
OneColumnModel = Literal["lightgbm", "linear", "gp", "law", "ensemble"]
REGRESSION_MODELS: tuple[str, ...] = get_args(OneColumnModel)
# per-domain: a target over several domains fitted one domain at a time (regression.fit_target)
PER_DOMAIN = "per-domain"
RegressionModel = Literal["auto", "per-domain", OneColumnModel]
# numpy's legacy seeding and scikit-learn take seeds in [0, 2**32 - 1]
MAX_SEED = 2**32 - 1
PER_DOMAIN_MAX_SECONDS = 900.0  # auto's default time budget for the per-domain fit


class RegressionConfig(Strict):
    target: str | dict[str, float] = "mean"  # "mean" of all domains, one domain, or weights
    model: RegressionModel = "auto"  # auto: the best of the others by CV, per-domain included
    folds: int = Field(5, ge=2)
    tune_trials: int = Field(0, ge=0)
    # auto fits a target over several domains per domain too, unless that would take longer
    # than this (estimated from the one-model fit's time; see regression.fit_target); 0 never.
    per_domain_max_seconds: float = Field(PER_DOMAIN_MAX_SECONDS, ge=0)
    # The fan-in proceeds when at least this share of proxies finished; failures are logged.
    min_proxy_fraction: float = Field(0.9, gt=0, le=1)

    @model_validator(mode="after")
    def _per_domain_needs_domains(self):
        one = self.target != "mean" and (isinstance(self.target, str) or len(self.target) < 2)
        if self.model == PER_DOMAIN and one:
            raise ValueError("model 'per-domain' fits a target over several domains one domain "
                             f"at a time, and the target {self.target!r} has one; set "
                             "regression.target to mean or to weights over domains, or choose "
                             "another model")
        return self

    def target_weights(self, domains: list[str]) -> dict[str, float]:
        """The target as weights over domains' validation losses."""
        if self.target == "mean":
            return {d: 1 / len(domains) for d in domains}
        if isinstance(self.target, str):
            return {self.target: 1.0}
        return dict(self.target)


def target_loss(val_loss: dict[str, float], weights: dict[str, float]) -> float:
    return sum(w * val_loss[d] for d, w in weights.items())


CMAES_POPULATION = 32  # larger than CMA-ES's default: tree models give a rugged surface


# Objective evaluations: CMA-ES/TPE trials, or the paper recipe's samples (of which it averages
# the best 128). Fewer than MIN_SEARCH_TRIALS is not one CMA-ES generation of 32 nor 128 samples.
SEARCH_TRIALS, PAPER_SAMPLES, MIN_SEARCH_TRIALS = 3000, 100_000, 128


def default_trials(method: str) -> int:
    """`paper` counts samples, not trials: unless told, it draws the paper's 100k."""
    return PAPER_SAMPLES if method == "paper" else SEARCH_TRIALS


class SearchConfig(Strict):
    method: Literal["cmaes", "tpe", "paper"] = "cmaes"
    trials: int = Field(SEARCH_TRIALS, ge=MIN_SEARCH_TRIALS)  # samples for `paper`
    min_weight: dict[str, Share] = {}
    max_weight: dict[str, Share] = {}
    fixed: dict[str, Share] = {}
    max_epochs: float | None = Field(None, gt=0)  # cap per domain in the large run; None: none
    allow_extrapolation: bool = False

    @model_validator(mode="after")
    def _some_mixture_meets_the_bounds(self):
        # What can be checked before the corpus's domains are known, so that `compile` and
        # `submit` refuse bounds no mixture meets: the search's own check, over the domains
        # named here plus one standing for all the others (free in [0, 1]). The run checks
        # again with the corpus's domains and the max-epochs cap.
        named = sorted({*self.min_weight, *self.max_weight, *self.fixed})
        if not named:
            return self

        constraints = Constraints(dict(self.min_weight), dict(self.max_weight), dict(self.fixed))
        constraints.check([*named, "(every domain not named)"])
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_trials(cls, data):
        if isinstance(data, dict) and "trials" not in data:
            return {**data, "trials": default_trials(data.get("method", "cmaes"))}
        return data


class ActiveLearningConfig(Strict):
    """Rounds between search and gate: proxies where the regression is least sure near its
    optimum are trained, then the regression is refitted and the search run again."""

    rounds: int = Field(0, ge=0)  # 0: off; fixed when the pipeline is compiled
    proxies: int = Field(8, ge=1)  # added per round
    candidates: int = Field(2048, ge=16)  # Dirichlet draws around the chosen mixture
    # Only the best-predicted share of the candidates is "near the optimum"; among those, the
    # proxies go where the models disagree most and no proxy has been yet.
    near_fraction: float = Field(0.1, gt=0, le=1)


MIN_BASELINE_SEEDS = 3
BUILT_IN_BASELINES = ("prior", "uniform", "best_proxy")


class GateConfig(Strict):
    """Validate the prediction on fresh proxies before spending the large run."""

    # Fresh mixtures (the chosen one included); at least gate.MIN_FRESH_PROXIES must finish.
    # 8: the fewest at which one swapped pair still clears the 0.8 threshold (at 6, only a
    # perfect order does; see gate.MIN_FRESH_PROXIES).
    proxies: int = Field(8, ge=5)
    spearman_threshold: float = Field(0.8, ge=-1, le=1)  # on the bootstrap lower bound
    confidence: float = Field(0.9, gt=0, lt=1)  # two-sided bootstrap interval
    bootstrap: int = Field(2000, ge=100)
    # Chosen and best-proxy mixtures retrained per seed: the noise. 2 seeds leave their paired t
    # bound 1 degree of freedom (12.7 standard errors, a check that almost never fails): use 3+.
    seeds: int = Field(3, ge=1)
    # What the chosen mixture must beat, seed by seed at proxy size, before a large run is
    # spent: "prior" (the token shares: what you would train on anyway), "uniform",
    # "best_proxy" (the best training proxy's mixture), or a name from large.extra_baselines.
    baselines: list[Annotated[str, Field(pattern=NAME)]] = ["prior"]

    @model_validator(mode="after")
    def _a_bound_with_teeth(self):
        if self.baselines and self.seeds < MIN_BASELINE_SEEDS:
            raise ValueError(
                f"gate.seeds: comparing with gate.baselines {self.baselines} needs at least "
                f"{MIN_BASELINE_SEEDS} seeds (with 2, the paired noise bound is 12.7 standard "
                "errors wide and no baseline is ever beaten); raise gate.seeds or set "
                "gate.baselines: []")
        check_unique(self.baselines, "gate.baselines")
        return self


class LargeConfig(Strict):
    """The target-size run on the chosen mixture, and the evidence that it wins."""

    model: ModelConfig
    train: TrainRecipe
    seeds: int = Field(1, ge=1)  # each large/baseline mixture trained with this many seeds
    # Comparison mixtures trained like the chosen one: "prior" (the token distribution, the
    # natural choice), "uniform", "best_proxy" (the best training proxy's mixture).
    baselines: list[Literal["prior", "uniform", "best_proxy"]] = []
    # User mixtures by name; the names become MLflow metric keys (large.<name>.mean)
    extra_baselines: dict[Annotated[str, Field(pattern=NAME)],
                          dict[str, float]] = {}
    # Concurrent larger-model runs (chosen, baselines, seeds, rank check) on a cluster: each may
    # hold a whole GPU node, so fewer than proxies
    parallelism: int = Field(2, ge=1)
    cpu_threads: CpuThreads = None  # for large, baseline and rank-check runs alike

    @model_validator(mode="after")
    def _own_names(self):
        taken = sorted(set(self.extra_baselines) & {"chosen", "best", *BUILT_IN_BASELINES})
        if taken:
            raise ValueError(f"large.extra_baselines: {taken} name built-in mixtures; rename yours")
        return self


class RankCheckConfig(Strict):
    """The paper's premise measured on your corpus: proxy ranking = larger-model ranking."""

    mixtures: int = Field(0, ge=0)  # training mixtures retrained at the larger size; 0: off
    model: ModelConfig | None = None
    train: TrainRecipe | None = None

    @model_validator(mode="after")
    def _needs(self):
        if self.mixtures and (self.model is None or self.train is None):
            raise ValueError("rank_check with mixtures > 0 needs `model` and `train`")
        if self.mixtures == 1 or self.mixtures == 2:
            raise ValueError("rank_check.mixtures: a rank correlation needs at least 3 (0: off)")
        return self


class TrackingConfig(Strict):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db


def check_names(field: str, names: list[str], known: set[str]) -> None:
    unknown = sorted(set(names) - known)
    if unknown:
        raise ConfigError(f"{field}: unknown domain(s) {unknown}; the corpus has {sorted(known)}")


WEIGHT_SUM_TOLERANCE = 1e-4


def check_mixture(field: str, weights: dict[str, float], known: set[str]) -> None:
    check_names(field, list(weights), known)
    negative = sorted(name for name, w in weights.items() if w < 0)
    if negative:
        raise ConfigError(f"{field}: negative weight(s) for {negative}; weights must be >= 0")
    total = sum(weights.values())
    # Weights copied as MLflow shows them (6 decimals) may miss 1 by a few 1e-6
    if not math.isclose(total, 1, abs_tol=WEIGHT_SUM_TOLERANCE):
        raise ConfigError(
            f"{field}: weights must be >= 0 and sum to 1 (they sum to {total:.8g}); rescale them"
        )


def check_trainable(field: str, weights: dict[str, float], targets: Iterable[str]) -> None:
    """A mixture or bound gives weight to training domains only."""
    named = sorted(set(weights) & set(targets))
    if named:
        raise ConfigError(f"{field}: {named} are target-only sets (role: target): they are "
                          "measured, never trained on, so no mixture weighs them; remove them")


def check_unique(names: list[str], field: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{field}: duplicate domain name(s) {dupes}; names must be unique")
