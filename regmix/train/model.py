"""A small LLaMA-style language model: RMSNorm, rotary embeddings, SwiGLU MLP, untied output head.

One short file in the spirit of nanoGPT. The architecture and initialisation are those of the
paper's models (TinyLlama in lit-gpt, as the RegMix code trains them); shapes are data in
`regmix/config/shapes.py`.
"""

from __future__ import annotations

import functools
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

from regmix.config.shapes import ModelShape

# Output-layer logits computed at once: bounds the loss's memory (a (tokens x vocab) float32
# block) at 256 MiB however large the batch or vocabulary; 4x that on a GPU (logits_per_chunk).
LOGITS_PER_CHUNK = 1 << 26
# A token's loss reads as at most -log(float32 tiny) = 87 nats, far past any trained model's.
TINY = torch.finfo(torch.float32).tiny


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
    # In x's dtype (as Hugging Face's Llama does): float32 tables would promote bf16 q and k to
    # float32 under autocast, doubling their traffic, and leave v behind in bf16.
    T = x.size(1)
    return x * cos[:T].to(x.dtype) + x.roll(x.size(-1) // 2, dims=-1) * sin[:T].to(x.dtype)


# Packing (train/packed.py): a model built with `packs=G` is G models of one shape in one,
# each weight stacked along a new leading dimension, its activations (G, B, T, C). The layers
# below take either; a packed one does each product as one batched matmul over the G models.

def stacked(packs: int | None, *dims: int) -> torch.Tensor:
    return torch.empty(*(() if packs is None else (packs,)), *dims)


class Linear(nn.Module):
    """`nn.Linear` without bias: weight (out, in), or (G, out, in) packed."""

    def __init__(self, fan_in: int, fan_out: int, packs: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(stacked(packs, fan_out, fan_in))

    def forward(self, x):
        if self.weight.dim() == 2:
            return F.linear(x, self.weight)
        return torch.bmm(x.flatten(1, -2), self.weight.mT).unflatten(1, x.shape[1:-1])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, packs: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(stacked(packs, dim).fill_(1.0))

    def forward(self, x):
        # The same arithmetic packed or not, so that a packed model matches its models alone
        weight = self.weight if self.weight.dim() == 1 else self.weight[:, None, None]
        return F.rms_norm(x, x.shape[-1:], eps=1e-5) * weight


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, packs: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(stacked(packs, vocab, dim))

    def forward(self, idx):
        if self.weight.dim() == 2:
            return F.embedding(idx, self.weight)
        # Model g's rows follow model g-1's in the flattened table: one lookup for all G
        G, vocab = self.weight.shape[:2]
        offsets = torch.arange(0, G * vocab, vocab, device=idx.device).view(G, *[1] * (idx.dim() - 1))
        return F.embedding(idx + offsets, self.weight.flatten(0, 1))


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, packs: int | None = None):
        super().__init__()
        self.n_head, self.n_kv = shape.n_head, shape.n_kv_head or shape.n_head
        self.head_dim = shape.n_embd // shape.n_head
        self.qkv = Linear(shape.n_embd, (self.n_head + 2 * self.n_kv) * self.head_dim, packs)
        self.proj = Linear(shape.n_embd, shape.n_embd, packs)

    def forward(self, x, cos, sin):
        *_, T, C = x.shape
        # Packed models' sequences join the batch: attention has no weights, one kernel serves all
        qkv = self.qkv(x).view(-1, T, self.n_head + 2 * self.n_kv, self.head_dim)
        qk = apply_rope(qkv[:, :, : self.n_head + self.n_kv], cos, sin)  # q and k in one pass
        q, k = qk.split([self.n_head, self.n_kv], dim=2)
        v = qkv[:, :, self.n_head + self.n_kv :]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv != self.n_head,
        )
        return self.proj(y.transpose(1, 2).reshape(x.shape))


class SwiGLU(nn.Module):
    def __init__(self, shape: ModelShape, packs: int | None = None):
        super().__init__()
        self.gate_up = Linear(shape.n_embd, 2 * shape.mlp_hidden, packs)
        self.down = Linear(shape.mlp_hidden, shape.n_embd, packs)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, shape: ModelShape, packs: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(shape.n_embd, packs)
        self.attn = Attention(shape, packs)
        self.mlp_norm = RMSNorm(shape.n_embd, packs)
        self.mlp = SwiGLU(shape, packs)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    def __init__(self, shape: ModelShape, vocab_size: int, packs: int | None = None):
        super().__init__()
        self.shape, self.vocab_size, self.packs = shape, vocab_size, packs
        # Rows padded to a multiple of 64, as in the paper's models: the output layer's matmuls
        # then tile evenly on tensor cores (50,277 GPT-NeoX tokens -> 50,304 rows).
        padded = -(-vocab_size // 64) * 64
        self.embed = Embedding(padded, shape.n_embd, packs)
        self.blocks = nn.ModuleList(Block(shape, packs) for _ in range(shape.n_layer))
        self.norm = RMSNorm(shape.n_embd, packs)
        self.head = Linear(shape.n_embd, padded, packs)
        cos, sin = rope_tables(shape)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # The paper's (GPT-NeoX) init: fan-in scaled normals, the MLP's output shrunk by depth.
        for name, p in self.named_parameters():
            if name.endswith("down.weight"):
                nn.init.normal_(p, std=1 / math.sqrt(shape.mlp_hidden) / shape.n_layer)
            elif not name.endswith("norm.weight"):  # the last dim is the fan-in (the width for embed)
                nn.init.normal_(p, std=math.sqrt(2 / 5 / p.size(-1)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, T, vocab) or, given targets, the mean next-token loss; packed, each with
        a leading G: tokens (G, B, T) give logits (G, B, T, vocab) or the G models' losses (G,)."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        x = self.norm(x)
        if targets is None:
            return self.head(x)[..., : self.vocab_size]
        if self.packs is None:
            return head_loss(x.flatten(0, -2)[None], self.head.weight[None], targets.flatten()[None])[0]
        return head_loss(x.flatten(1, -2), self.head.weight, targets.flatten(1))

    def non_embedding_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("embed", "head")))

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x matmul params (output layer included) + attention."""
        matmul = sum(p.numel() for n, p in self.named_parameters()
                     if not n.startswith("embed") and "norm" not in n)
        attention = 12 * self.shape.n_layer * self.shape.n_embd * self.shape.context
        return 6 * matmul + attention // 2  # causal attention touches half the context on average


# Outside a compiled model's graph: traced, the chunk loop unrolls and the chunks' buffers stay
# alive, which is what chunking exists to prevent (proxy-1m on 2 CPU cores: 1.8 GB more and 1.3x
# the step time; the GPU's compiled graph took 3x eager's memory). The head compiles its own
# softmax where that pays (compiles_softmax).
@torch.compiler.disable
def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each of G models' mean cross-entropy of its logits `x[g] @ weight[g].T`.

    x: (G, N, C), weight: (G, V, C), targets: (G, N); returns the G losses.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets)[0]
    return _chunked_head(x, weight, targets, with_grads=False)[0]


class LinearCrossEntropy(torch.autograd.Function):
    """The output layer and the loss fused: the (tokens x vocab) logits never exist whole.

    With a vocabulary far wider than the model, the logits are most of a small LM's memory
    traffic. The loss is the graph's last op, so its gradients are known in the forward pass:
    compute them there chunk by chunk (as Liger-Kernel does) and let backward only rescale.
    """

    @staticmethod
    def forward(x, weight, targets):
        return _chunked_head(x, weight, targets, with_grads=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_x, grad_weight = output
        ctx.mark_non_differentiable(grad_x, grad_weight)
        ctx.save_for_backward(grad_x, grad_weight)

    @staticmethod
    def backward(ctx, grad_losses, _grad_x, _grad_weight):
        grad_x, grad_weight = ctx.saved_tensors
        scale = grad_losses.view(-1, 1, 1)
        return grad_x * scale.to(grad_x.dtype), grad_weight * scale.to(grad_weight.dtype), None


def _chunked_head(x, weight, targets, with_grads: bool):
    """(G mean losses, d loss / d x, d loss / d weight); the gradients only `with_grads`."""
    G, n, vocab = x.size(0), x.size(1), weight.size(1)
    rows = max(1, logits_per_chunk(x) // vocab)
    losses = x.new_zeros(G, dtype=torch.float32)
    if with_grads:
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        matmul_dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        loss_and_grad = compiled_loss_and_grad() if compiles_softmax(x) else softmax_loss_and_grad
        grad_x = torch.empty_like(x)
        # The weight's gradient sums over chunks: in float32, whatever the weight's dtype.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    for g in range(G):
        for start in range(0, n, rows):
            xc, tc = x[g, start : start + rows], targets[g, start : start + rows, None]
            logits = xc @ weight[g].T
            if not with_grads:
                probs = torch.softmax(logits, -1, dtype=torch.float32)
                losses[g] -= probs.gather(-1, tc).clamp_min(TINY).log().sum()
                continue
            chunk_loss, grad_logits = loss_and_grad(logits, tc, matmul_dtype)
            losses[g] += chunk_loss
            grad_x[g, start : start + rows] = grad_logits @ weight[g]
            grad_weight[g] += (xc.T @ grad_logits).T  # as (C x V) products: faster than probs.T @ xc
    if not with_grads:
        return losses / n, None, None
    # 1/n scales the small (N x C) and (V x C) products rather than the (N x V) probabilities
    return losses / n, grad_x.div_(n), grad_weight.div_(n).to(weight.dtype)


def logits_per_chunk(x: torch.Tensor) -> int:
    """Logits computed at once. On a GPU, larger chunks: fewer, fuller kernels, and a chunk's
    bf16 logits and gradient (1 GiB) are small beside its memory."""
    return LOGITS_PER_CHUNK * (4 if x.is_cuda else 1)


def softmax_loss_and_grad(logits, targets, grad_dtype):
    """A chunk's summed loss and n x d loss / d logits (softmax minus one-hot), from one softmax.

    One softmax serves loss and gradient (log_softmax + exp costs two passes), and the
    gradient is cast once to the matmul dtype rather than once per product under autocast.
    """
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    loss = -probs.gather(-1, targets).clamp_min(TINY).log().sum()
    if torch.compiler.is_compiling():  # as a `where`, the one-hot fuses into the softmax's kernel
        hit = torch.arange(probs.size(-1), device=probs.device) == targets
        return loss, torch.where(hit, probs - 1, probs).to(grad_dtype)
    # Eager, updating the n target entries in place beats two more passes over the block
    return loss, probs.scatter_add_(-1, targets, probs.new_full(targets.shape, -1.0)).to(grad_dtype)


def compiles_softmax(x: torch.Tensor) -> bool:
    """On GPUs that Triton (torch.compile's GPU backend) supports, where it finds its C
    compiler; elsewhere eager."""
    return x.is_cuda and _triton_runs()


@functools.cache  # asked at every output-layer call: look the compiler up (a PATH scan) once
def _triton_runs() -> bool:
    from torch.utils._triton import has_triton

    return has_triton() and missing_compiler(torch.device("cuda")) is None


def missing_compiler(device: torch.device) -> str | None:
    """The compiler torch.compile needs on `device` and this machine lacks, if it lacks it.

    Triton builds each GPU kernel's launcher with a C compiler ($CC, else gcc or clang, as
    Triton looks for one); inductor builds CPU kernels with a C++ one ($CXX, else g++). Slim
    images (python:*-slim) have neither, and compiling then fails at the first step.
    """
    if device.type == "cuda":
        names = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
    else:
        names = [os.environ.get("CXX") or "g++"]
    return None if any(shutil.which(name) for name in names) else " or ".join(names)


@functools.cache
def compiled_loss_and_grad():
    """`softmax_loss_and_grad` compiled, which on CUDA is one fused kernel.

    Eager, the (tokens x vocab) block is read and written five times (bf16 logits, float32
    probabilities, their one-hot update, the bf16 cast); compiled, the kernel reads the logits
    and writes the gradient. On CPU compiling costs more than it saves.
    """
    # fullgraph: a graph break would silently fall back to the slow eager kernels
    return torch.compile(softmax_loss_and_grad, fullgraph=True, dynamic=False)
