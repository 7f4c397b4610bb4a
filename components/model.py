"""A small LLaMA-style language model: RMSNorm, rotary embeddings, SwiGLU MLP, tied embeddings.

One short file in the spirit of nanoGPT; its shapes are data in `components/shapes.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.shapes import ModelShape


def rope_tables(shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = shape.n_embd // shape.n_head
    inv_freq = 1.0 / shape.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(shape.context).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); rotate the two halves of each head (the GPT-NeoX / LLaMA-HF convention)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[: x.size(-2)], sin[: x.size(-2)]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.n_head, self.n_kv = shape.n_head, shape.n_kv_head or shape.n_head
        self.head_dim = shape.n_embd // shape.n_head
        qkv_width = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(shape.n_embd, qkv_width, bias=False)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], -1
        )
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.gate_up = nn.Linear(shape.n_embd, 2 * shape.mlp_hidden, bias=False)
        self.down = nn.Linear(shape.mlp_hidden, shape.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.attn_norm = nn.RMSNorm(shape.n_embd, eps=1e-5)
        self.attn = Attention(shape)
        self.mlp_norm = nn.RMSNorm(shape.n_embd, eps=1e-5)
        self.mlp = SwiGLU(shape)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    def __init__(self, shape: ModelShape, vocab_size: int):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(vocab_size, shape.n_embd)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.norm = nn.RMSNorm(shape.n_embd, eps=1e-5)
        self.head = nn.Linear(shape.n_embd, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied, as small LMs usually are
        cos, sin = rope_tables(shape)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale residual projections by depth so deep stacks start stable
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * shape.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def non_embedding_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("embed"))

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x matmul params (output layer included) + attention."""
        matmul = sum(p.numel() for n, p in self.named_parameters() if "norm" not in n)
        attention = 12 * self.shape.n_layer * self.shape.n_embd * self.shape.context
        return 6 * matmul + attention // 2  # causal attention touches half the context on average
