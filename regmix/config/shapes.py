"""Model shapes as data, like litgpt's config hub: the paper's shapes and the local CPU shapes.

Kept apart from the model (and torch) so that stages which only read configs start fast.
"""

from dataclasses import asdict, dataclass

from pydantic import ConfigDict


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    mlp_hidden: int
    context: int
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    rope_base: float = 10_000.0

    # Written inline in a config, unknown keys are errors, as everywhere in configs
    __pydantic_config__ = ConfigDict(extra="forbid")

    def __post_init__(self):
        sizes = {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_head": self.n_head,
                 "mlp_hidden": self.mlp_hidden, "context": self.context,
                 "n_kv_head": 1 if self.n_kv_head is None else self.n_kv_head}
        small = [name for name, size in sizes.items() if size < 1]
        if small or self.rope_base <= 0:
            raise ValueError(f"model shape: {', '.join(small) or 'rope_base'} must be positive")
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head or self.n_head % kv:
            raise ValueError(
                f"model shape: n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) "
                f"and n_head by n_kv_head ({kv})"
            )
        if (self.n_embd // self.n_head) % 2:  # RoPE rotates pairs of a head's dimensions
            raise ValueError(
                f"model shape: the head size n_embd / n_head ({self.n_embd // self.n_head}) must "
                "be even; change n_embd or n_head"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's shapes (RegMix, Liu et al. 2025, table 7; `tinyllama_1M`, `tinyllama_60M` and
# `tinyllama_1_1b` in its code's lit-gpt configs) and the local CPU shapes. The paper's 1B model
# is TinyLlama's shape with 16 full attention heads (its config sets no query groups);
# `tinyllama-1.1b` is the released TinyLlama (32 query heads over 4 key/value heads), for a
# large run that should match that checkpoint's architecture.
SHAPES: dict[str, ModelShape] = {
    "proxy-1m": ModelShape(n_layer=2, n_embd=256, n_head=8, mlp_hidden=512, context=2048),
    "proxy-60m": ModelShape(n_layer=10, n_embd=768, n_head=8, mlp_hidden=1536, context=2048),
    "large-1b": ModelShape(n_layer=22, n_embd=2048, n_head=16, mlp_hidden=5632, context=2048),
    "tinyllama-1.1b": ModelShape(
        n_layer=22, n_embd=2048, n_head=32, n_kv_head=4, mlp_hidden=5632, context=2048
    ),
    "local-proxy": ModelShape(n_layer=2, n_embd=64, n_head=4, mlp_hidden=128, context=128),
    "local-large": ModelShape(n_layer=4, n_embd=160, n_head=5, mlp_hidden=320, context=128),
    "tiny-proxy": ModelShape(n_layer=1, n_embd=32, n_head=2, mlp_hidden=64, context=64),
    "tiny-large": ModelShape(n_layer=2, n_embd=48, n_head=2, mlp_hidden=96, context=64),
}
