"""Packing: G proxies of one shape trained at once as one batched model on one device.

A ~1M-parameter proxy leaves most of a GPU idle. Packing stacks G proxies' parameters along a new
leading dimension (`LM(..., packs=G)`), so each matmul becomes one batched matmul over the G
proxies and attention one kernel over all their sequences. The proxies stay independent: each
loss depends only on its own slice of the stacked parameters, so the gradient of the summed
losses is each proxy's own gradient, and AdamW is elementwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from regmix.train.model import LM


class PackedLM(LM):
    """G `LM`s of one shape with their parameters stacked: (G, B, T) tokens -> (G,) losses."""

    def __init__(self, models: list[LM]):
        with torch.device("meta"):  # no random init: every weight is copied from the models
            super().__init__(models[0].shape, models[0].vocab_size, packs=len(models))
        fill(self, lambda name: torch.stack([m.get_parameter(name) for m in models]), models[0])

    def clip_grad_norms_(self, max_norm: float) -> torch.Tensor:
        """Clip each proxy's gradient to `max_norm` on its own, as `clip_grad_norm_` would alone."""
        grads = [p.grad for p in self.parameters()]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
        return norms

    def unpack(self) -> list[LM]:
        models = []
        for g in range(self.packs):
            with torch.device("meta"):
                model = LM(self.shape, self.vocab_size)
            fill(model, lambda name, g=g: self.get_parameter(name)[g], self)
            models.append(model)
        return models


def fill(model: LM, weight: Callable[[str], torch.Tensor], like: LM) -> None:
    """Give a model built on the meta device storage on `like`'s device, each parameter's values
    from `weight(name)`, and `like`'s buffers (the rotary tables)."""
    model.to_empty(device=like.rope_cos.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weight(name))
        for name, b in model.named_buffers():
            b.copy_(like.get_buffer(name))
