import pytest
import torch
import torch.nn.functional as F

import regmix.train.model
from regmix.config.shapes import SHAPES, ModelShape
from regmix.train.model import LM, head_loss


def test_shapes_are_the_papers():
    """RegMix's models (the lit-gpt configs of its code): 1M, 60M, and the 1B TinyLlama shape."""
    def dims(name):
        s = SHAPES[name]
        return s.n_layer, s.n_embd, s.n_head, s.n_kv_head or s.n_head, s.mlp_hidden, s.context

    assert dims("proxy-1m") == (2, 256, 8, 8, 512, 2048)
    assert dims("proxy-60m") == (10, 768, 8, 8, 1536, 2048)
    assert dims("large-1b") == (22, 2048, 16, 16, 5632, 2048)
    assert dims("tinyllama-1.1b") == (22, 2048, 32, 4, 5632, 2048)


def test_tinyllama_shape_has_the_released_models_parameter_count():
    with torch.device("meta"):  # no memory: only the parameter shapes are built
        model = LM(SHAPES["tinyllama-1.1b"], vocab_size=32_000)
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384  # TinyLlama-1.1B's count


def test_paper_proxy_shape_is_about_one_million_non_embedding_params():
    model = LM(SHAPES["proxy-1m"], vocab_size=50_432)
    assert 1.2e6 < model.non_embedding_params() < 1.4e6  # embedding and output head excluded
    assert model.head.weight is not model.embed.weight  # untied, as in the paper's models


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    shape = ModelShape(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp_hidden=64, context=16)
    model = LM(shape, vocab_size=100).eval()
    x = torch.randint(0, 100, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 100)
    changed = x.clone()
    changed[:, 10:] = 0  # a change in the future must not move earlier positions
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-5)


def test_untrained_loss_is_near_uniform():
    torch.manual_seed(0)
    model = LM(SHAPES["tiny-proxy"], vocab_size=512)
    x, y = torch.randint(0, 512, (2, 4, 64))
    assert abs(model(x, y).item() - torch.log(torch.tensor(512.0)).item()) < 0.3


@pytest.mark.parametrize("logits_per_chunk", [1 << 26, 7 * 30])  # one chunk; 7 rows at a time
def test_fused_head_loss_matches_cross_entropy(monkeypatch, logits_per_chunk):
    monkeypatch.setattr(regmix.train.model, "LOGITS_PER_CHUNK", logits_per_chunk)
    torch.manual_seed(0)
    # Two models' outputs (packed), each with its own weight and targets
    x, weight = torch.randn(2, 50, 16, requires_grad=True), torch.randn(2, 30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (2, 50))
    fused = head_loss(x, weight, targets)
    fused_grads = torch.autograd.grad(fused @ torch.tensor([3.0, 0.5]), (x, weight))
    reference = torch.stack([F.cross_entropy(x[g] @ weight[g].T, targets[g]) for g in range(2)])
    reference_grads = torch.autograd.grad(reference @ torch.tensor([3.0, 0.5]), (x, weight))
    assert torch.allclose(fused, reference, atol=1e-6)
    for got, want in zip(fused_grads, reference_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    with torch.inference_mode():
        assert torch.allclose(head_loss(x, weight, targets), reference, atol=1e-6)


@pytest.mark.slow  # compiling takes about 25 s on 2 cores
def test_compiled_softmax_matches_the_eager_one():
    torch.manual_seed(0)
    logits, targets = torch.randn(37, 300, dtype=torch.bfloat16), torch.randint(0, 300, (37, 1))
    compiled = regmix.train.model.compiled_loss_and_grad()(logits, targets, torch.bfloat16)
    eager = regmix.train.model.softmax_loss_and_grad(logits, targets, torch.bfloat16)
    assert compiled[0].item() == pytest.approx(eager[0].item(), rel=1e-5)
    assert torch.allclose(compiled[1].float(), eager[1].float(), atol=1e-2)


def test_a_machine_without_a_compiler_is_told_apart(monkeypatch, tmp_path):
    # Slim images have no C or C++ compiler, and torch.compile then fails at its first kernel
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert regmix.train.model.missing_compiler(cpu) == "g++"
    assert regmix.train.model.missing_compiler(cuda) == "gcc or clang"
    (tmp_path / "gcc").write_text("#!/bin/sh\n")
    (tmp_path / "gcc").chmod(0o755)
    assert regmix.train.model.missing_compiler(cuda) is None
    monkeypatch.setenv("CC", "icx")  # as Triton does, $CC alone counts when it is set
    assert regmix.train.model.missing_compiler(cuda) == "icx"
    monkeypatch.setenv("CXX", "gcc")
    assert regmix.train.model.missing_compiler(cpu) is None
