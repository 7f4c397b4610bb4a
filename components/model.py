"""A small LLaMA-style language model: RMSNorm, rotary embeddings, SwiGLU MLP, untied output head.

One short file in the spirit of nanoGPT. The architecture and initialisation are those of the
paper's models (TinyLlama in lit-gpt, as the RegMix code trains them); shapes are data in
`components/shapes.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.shapes import ModelShape

# Rows of output-layer logits computed at once: bounds the loss's memory (a (tokens x vocab)
# float32 block) at 256 MiB however large the batch or vocabulary.
LOGITS_PER_CHUNK = 1 << 26


def rope_tables(shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles as (context, 1, head_dim); sin carries rotate-half's sign."""
    head_dim = shape.n_embd // shape.n_head
    inv_freq = 1.0 / shape.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(shape.context).float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); rotate the two halves of each head (the GPT-NeoX / LLaMA-HF convention):
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with the minus sign folded into `sin`.
    T = x.size(1)
    return x * cos[:T] + x.roll(x.size(-1) // 2, dims=-1) * sin[:T]


class Attention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.n_head, self.n_kv = shape.n_head, shape.n_kv_head or shape.n_head
        self.head_dim = shape.n_embd // shape.n_head
        self.qkv = nn.Linear(shape.n_embd, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=False)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv, self.head_dim)
        qk = apply_rope(qkv[:, :, : self.n_head + self.n_kv], cos, sin)  # q and k in one pass
        q, k = qk.split([self.n_head, self.n_kv], dim=2)
        v = qkv[:, :, self.n_head + self.n_kv :]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv != self.n_head,
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
        self.shape, self.vocab_size = shape, vocab_size
        # Rows padded to a multiple of 64, as in the paper's models: the output layer's matmuls
        # then tile evenly on tensor cores (50,277 GPT-NeoX tokens -> 50,304 rows).
        padded = -(-vocab_size // 64) * 64
        self.embed = nn.Embedding(padded, shape.n_embd)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.norm = nn.RMSNorm(shape.n_embd, eps=1e-5)
        self.head = nn.Linear(shape.n_embd, padded, bias=False)
        cos, sin = rope_tables(shape)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # The paper's (GPT-NeoX) init: fan-in scaled normals, the MLP's output shrunk by depth.
        for name, p in self.named_parameters():
            if name.endswith("down.weight"):
                nn.init.normal_(p, std=1 / math.sqrt(shape.mlp_hidden) / shape.n_layer)
            elif not name.endswith("norm.weight"):  # p.size(1) is the fan-in (the width for embed)
                nn.init.normal_(p, std=math.sqrt(2 / 5 / p.size(1)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, T, vocab) or, given targets, the mean next-token loss."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        x = self.norm(x)
        if targets is None:
            return self.head(x)[..., : self.vocab_size]
        return head_loss(x.flatten(0, -2), self.head.weight, targets.flatten())

    def non_embedding_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("embed", "head")))

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x matmul params (output layer included) + attention."""
        matmul = sum(p.numel() for n, p in self.named_parameters()
                     if not n.startswith("embed") and "norm" not in n)
        attention = 12 * self.shape.n_layer * self.shape.n_embd * self.shape.context
        return 6 * matmul + attention // 2  # causal attention touches half the context on average


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits `x @ weight.T` (x: (N, C), targets: (N,))."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets)[0]
    return _chunked_head(x, weight, targets, with_grads=False)[0]


class LinearCrossEntropy(torch.autograd.Function):
    """The output layer and the loss fused: the (tokens x vocab) logits never exist whole.

    With a vocabulary far wider than the model, the logits are most of a small LM's memory
    traffic. The loss is the graph's last op, so its gradients are known in the forward pass:
    compute them there chunk by chunk (as Liger-Kernel does) and let backward only rescale.
    """

    generate_vmap_rule = True  # packed proxies (components/packed.py) run it under vmap

    @staticmethod
    def forward(x, weight, targets):
        return _chunked_head(x, weight, targets, with_grads=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_x, grad_weight = output
        ctx.mark_non_differentiable(grad_x, grad_weight)
        ctx.save_for_backward(grad_x, grad_weight)

    @staticmethod
    def backward(ctx, grad_loss, _grad_x, _grad_weight):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None


def _chunked_head(x, weight, targets, with_grads: bool):
    """(mean loss, d loss / d x, d loss / d weight); the gradients only `with_grads`."""
    n, vocab = x.size(0), weight.size(0)
    rows = max(1, LOGITS_PER_CHUNK // vocab)
    loss = x.new_zeros((), dtype=torch.float32)
    # The weight's gradient sums over chunks: in float32, whatever the weight's dtype.
    grads_x, grad_weight = [], torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    matmul_dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    for start in range(0, n, rows):
        xc, tc = x[start : start + rows], targets[start : start + rows, None]
        probs = torch.softmax(xc @ weight.T, -1, dtype=torch.float32)  # bf16 logits read once
        # One softmax pass serves loss and gradient (log_softmax + exp costs two). A token's
        # loss reads as at most -log(float32 tiny) = 87 nats, far past any trained model's.
        loss = loss - probs.gather(-1, tc).clamp_min(torch.finfo(torch.float32).tiny).log().sum()
        if with_grads:
            probs.scatter_add_(-1, tc, probs.new_full(tc.shape, -1.0))  # d loss / d logits * n
            probs = probs.to(matmul_dtype)  # cast once, not once per product under autocast
            grads_x.append(probs @ weight)
            grad_weight += (xc.T @ probs).T  # as (C x V) products: faster than probs.T @ xc
    if not with_grads:
        return loss / n, None, None
    # 1/n scales the small (N x C) and (V x C) products rather than the (N x V) probabilities
    return loss / n, torch.cat(grads_x).div_(n).to(x.dtype), grad_weight.div_(n).to(weight.dtype)
