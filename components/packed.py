"""Packing: G proxies of one shape trained at once as one batched model on one device.

A ~1M-parameter proxy leaves most of a GPU idle. Packing stacks G proxies' parameters along a new
leading dimension and runs the unchanged `LM` through `torch.func.functional_call` under
`torch.vmap`, so each of its matmuls becomes one batched matmul over the G proxies. The proxies
stay independent: each loss depends only on its own slice of the stacked parameters, so the
gradient of the summed losses is each proxy's own gradient, and AdamW is elementwise.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
from torch.func import functional_call

from components.model import LM

# vmap has no batching rule for the CPU flash-attention kernel (CUDA's have one), so on CPU it
# runs attention once per proxy: correct, and attention is a small share of a proxy's work.
warnings.filterwarnings("ignore", "There is a performance drop because we have not yet implemented "
                        "the batching rule for aten::_scaled_dot_product_flash_attention_for_cpu")


class PackedLM(nn.Module):
    """G `LM`s of one shape with their parameters stacked: (G, B, T) tokens -> (G,) losses."""

    def __init__(self, models: list[LM]):
        super().__init__()
        self.names = [name for name, _ in models[0].named_parameters()]
        self.stacked = nn.ParameterList(
            torch.stack([m.get_parameter(name).detach() for m in models]) for name in self.names
        )
        self.register_buffer("rope_cos", models[0].rope_cos, persistent=False)
        self.register_buffer("rope_sin", models[0].rope_sin, persistent=False)
        # The architecture without storage, in a list so that it is not a submodule: its
        # parameters are always replaced by a slice of the stacked ones.
        self.template = [copy.deepcopy(models[0]).to("meta")]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        buffers = {"rope_cos": self.rope_cos, "rope_sin": self.rope_sin}

        def loss(params, x, y):
            return functional_call(self.template[0], (params, buffers), (x, y))

        return torch.vmap(loss)(dict(zip(self.names, self.stacked, strict=True)), idx, targets)

    def clip_grad_norms_(self, max_norm: float) -> torch.Tensor:
        """Clip each proxy's gradient to `max_norm` on its own, as `clip_grad_norm_` would alone."""
        grads = [p.grad for p in self.stacked]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
        return norms

    def unpack(self) -> list[LM]:
        template = self.template[0]
        models = []
        for g in range(len(self.stacked[0])):
            model = LM(template.shape, template.vocab_size).to(self.rope_cos.device)
            model.load_state_dict({n: p[g].detach() for n, p in zip(self.names, self.stacked, strict=True)})
            models.append(model)
        return models
