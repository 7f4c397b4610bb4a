import torch

from components.model import LM
from components.shapes import SHAPES, ModelShape


def test_paper_proxy_shape_is_about_one_million_non_embedding_params():
    model = LM(SHAPES["proxy-1m"], vocab_size=50_432)
    assert 1.2e6 < model.non_embedding_params() < 1.4e6  # the output head is tied to embed


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    shape = ModelShape(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp_hidden=64, context=16)
    model = LM(shape, vocab_size=100).eval()
    x = torch.randint(0, 100, (2, 16))
    logits, _ = model(x)
    assert logits.shape == (2, 16, 100)
    changed = x.clone()
    changed[:, 10:] = 0  # a change in the future must not move earlier positions
    assert torch.allclose(model(changed)[0][:, :10], logits[:, :10], atol=1e-5)


def test_untrained_loss_is_near_uniform():
    torch.manual_seed(0)
    model = LM(SHAPES["tiny-proxy"], vocab_size=512)
    x, y = torch.randint(0, 512, (2, 4, 64))
    _, loss = model(x, y)
    assert abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.3
