"""What only a CUDA GPU can check: the compiled softmax head and model, bf16 packing, CPU-GPU
agreement.

Skipped on machines without one (CI has none); run with `python -m pytest -q tests/test_gpu.py`
where there is one. Synthetic tokens: these compare numbers, not what a model learns.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import regmix.train.model
from benchmarks.proxy_throughput import synthetic_data
from regmix.config.sections import TrainRecipe
from regmix.config.shapes import SHAPES
from regmix.data.prepare import TokenData
from regmix.train.loop import evaluate, train_lm, train_packed
from regmix.train.model import LM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WEIGHTS = {"d0": 0.4, "d1": 0.3, "d2": 0.2, "d3": 0.1}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TokenData:
    return TokenData.open(synthetic_data(tmp_path_factory.mktemp("data"), vocab=4096,
                                         tokens=1 << 18))


def test_the_compiled_softmax_head_matches_the_eager_one(monkeypatch):
    from torch.utils._triton import has_triton

    if not has_triton():
        pytest.skip("the softmax compiles only where Triton runs")
    torch.manual_seed(0)
    model = LM(SHAPES["local-proxy"], vocab_size=50_277).cuda()
    x, y = torch.randint(0, 50_277, (2, 8, 128), device="cuda")

    def loss_and_grads():
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x, y)
        return loss.item(), torch.autograd.grad(loss, list(model.parameters()))

    compiled_loss, compiled_grads = loss_and_grads()
    assert regmix.train.model.compiled_loss_and_grad.cache_info().currsize == 1  # it ran compiled
    monkeypatch.setattr(regmix.train.model, "compiled_loss_and_grad",
                        lambda: regmix.train.model.softmax_loss_and_grad)
    eager_loss, eager_grads = loss_and_grads()
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        assert (got - want).norm() <= 1e-2 * want.norm()


def test_a_proxy_trains_on_the_gpu_as_on_the_cpu(data):
    """Same batches (sampled on the host) and float32 math: the same curve, up to rounding."""
    recipe = dict(tokens=16 * 8 * 128, batch_size=8, lr=3e-3, mixed_precision="no", log_every=1)
    curve = []
    train_lm(data, WEIGHTS, SHAPES["local-proxy"], TrainRecipe(**recipe), seed=0,
             on_log=lambda step, loss: curve.append(loss))
    on_cpu = subprocess.run(
        [sys.executable, "-c", f"""if True:
            import json
            from regmix.config.sections import TrainRecipe
            from regmix.config.shapes import SHAPES
            from regmix.data.prepare import TokenData
            from regmix.train.loop import train_lm
            curve = []
            train_lm(TokenData.open({str(data.root)!r}), {WEIGHTS!r}, SHAPES["local-proxy"],
                     TrainRecipe(**{recipe!r}), seed=0, on_log=lambda s, loss: curve.append(loss))
            print(json.dumps(curve))"""],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, check=True)
    cpu_curve = json.loads(on_cpu.stdout.splitlines()[-1])
    assert len(curve) == len(cpu_curve) == 16
    assert curve == pytest.approx(cpu_curve, rel=1e-4)


def test_packed_proxies_match_the_same_proxies_trained_alone_in_bf16(data):
    recipe = TrainRecipe(tokens=16 * 8 * 128, batch_size=8, lr=3e-3, mixed_precision="bf16")
    shape, mixtures = SHAPES["local-proxy"], [WEIGHTS, {"d0": 0.1, "d1": 0.1, "d2": 0.1, "d3": 0.7}]
    models, losses, _, _ = train_packed(data, mixtures, shape, recipe, seeds=[0, 1])
    for model, loss, weights, seed in zip(models, losses, mixtures, [0, 1], strict=True):
        alone, alone_loss, _, _ = train_lm(data, weights, shape, recipe, seed)
        # bf16 products round differently batched and alone; the losses agree to about 1e-3
        assert loss == pytest.approx(alone_loss, rel=5e-3)
        assert evaluate(model, data, "bf16") == pytest.approx(evaluate(alone, data, "bf16"),
                                                              rel=5e-3)


def test_a_killed_run_resumes_on_the_gpu_to_the_same_result(data, tmp_path):
    recipe = TrainRecipe(tokens=24 * 8 * 128, batch_size=8, lr=3e-3, mixed_precision="bf16",
                         log_every=1, checkpoint_every=10)
    shape = SHAPES["local-proxy"]
    model, loss, _, _ = train_lm(data, WEIGHTS, shape, recipe, 0)

    class Killed(Exception):
        pass

    def killed_at_step_15(step, value):
        if step == 15:
            raise Killed

    with pytest.raises(Killed):
        train_lm(data, WEIGHTS, shape, recipe, 0, killed_at_step_15, tmp_path)
    resumed, resumed_loss, _, _ = train_lm(data, WEIGHTS, shape, recipe, 0, checkpoint_dir=tmp_path)
    # Not bitwise as on the CPU: CUDA's embedding and attention backward add with atomics, in
    # whatever order the threads finish.
    assert resumed_loss == pytest.approx(loss, rel=1e-3)
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert (p - q).norm() <= 1e-2 * q.norm(), name


def test_a_compiled_bf16_proxy_trains_as_the_eager_one(data):
    """`compile: true`, as configs/pile.yaml trains its proxies: the body compiled, the output
    layer outside its graph with its own compiled softmax; the run returns the plain LM."""
    recipe = TrainRecipe(tokens=16 * 8 * 128, batch_size=8, lr=3e-3, mixed_precision="bf16")
    shape = SHAPES["local-proxy"]
    eager, eager_loss, _, _ = train_lm(data, WEIGHTS, shape, recipe, 0)
    compiled, loss, _, _ = train_lm(data, WEIGHTS, shape, recipe.model_copy(update={"compile": True}),
                                    0)
    assert type(compiled) is LM
    assert loss == pytest.approx(eager_loss, rel=5e-3)  # bf16 kernels fused differently
    assert evaluate(compiled, data, "bf16") == pytest.approx(evaluate(eager, data, "bf16"), rel=5e-3)
