import mlflow
import numpy as np
import pytest

from regmix.config.loading import parse_config
from regmix.config.sections import TrainRecipe
from regmix.config.shapes import SHAPES
from regmix.mixtures import as_mixtures, proxy_key
from regmix.train.loop import evaluate, train_lm, train_packed
from regmix.train.proxy import run_train_proxies
from tests.conftest import tiny_config_dict
from tests.regmix.test_proxy import one_cpu_thread  # noqa: F401 (an autouse fixture)


def test_packed_proxies_match_the_same_proxies_trained_alone(prepared_data):
    recipe = TrainRecipe(tokens=8192, batch_size=8, lr=0.01)
    shape = SHAPES["tiny-proxy"]
    mixtures = [{"code": 0.8, "changelogs": 0.1, "licenses": 0.1},
                {"code": 0.2, "changelogs": 0.3, "licenses": 0.5}]
    seeds = [0, 1]
    models, losses, tokens, _ = train_packed(prepared_data, mixtures, shape, recipe, seeds)
    assert tokens == 8192 and losses[0] != losses[1]
    for model, loss, weights, seed in zip(models, losses, mixtures, seeds, strict=True):
        alone, alone_loss, _, _ = train_lm(prepared_data, weights, shape, recipe, seed)
        assert loss == pytest.approx(alone_loss, rel=1e-5)
        assert evaluate(model, prepared_data) == pytest.approx(evaluate(alone, prepared_data),
                                                               rel=1e-5)
        # Weights agree as a whole; elementwise, Adam turns rounding noise in near-zero
        # gradients into steps of the learning rate's size.
        for p, q in zip(model.parameters(), alone.parameters(), strict=True):
            assert (p - q).norm() <= 1e-3 * q.norm()


def test_a_packed_task_logs_one_run_per_proxy_as_an_unpacked_one_does(prepared_data, tracking):
    config = tiny_config_dict("unused.yaml", proxy={"packed": True})
    weights = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    mixtures = as_mixtures(weights, prepared_data.domains, "m",
                           proxy_key(parse_config(config), prepared_data.meta))
    task = {"task": 0.0, "mixtures": mixtures}
    data = str(prepared_data.root)
    out = run_train_proxies(parse_config(config), task, data, tracking)
    assert [r["reused"] for r in out["results"]] == [False, False]
    runs = mlflow.MlflowClient(tracking["uri"]).search_runs(
        [tracking["experiment_id"]], "tags.`regmix.stage` = 'proxy'")
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["regmix.packed"] == "2"
        assert {f"weight.{d}" for d in prepared_data.domains} <= set(run.data.params)
        assert {f"val_loss.{d}" for d in prepared_data.domains} <= set(run.data.metrics)
        assert {"train_loss", "tokens", "seconds", "target_loss"} <= set(run.data.metrics)
        curve = mlflow.MlflowClient(tracking["uri"]).get_metric_history(run.info.run_id,
                                                                        "train_loss")
        assert len(curve) >= 2

    again = run_train_proxies(parse_config(config), task, data, tracking)
    assert [r["reused"] for r in again["results"]] == [True, True]


def test_a_bad_mixture_does_not_sink_its_pack(prepared_data, tracking):
    config = tiny_config_dict("unused.yaml", proxy={"packed": True})
    good = as_mixtures(np.array([[0.4, 0.3, 0.3]]), prepared_data.domains, "m",
                       proxy_key(parse_config(config), prepared_data.meta))[0]
    broken = {"id": "m0009", "hash": "0" * 16, "weights": {d: 0.0 for d in prepared_data.domains}}
    task = {"task": 1.0, "mixtures": [broken, good]}
    data = str(prepared_data.root)
    failed, finished = run_train_proxies(parse_config(config), task, data, tracking)["results"]
    assert "error" in failed and "val_loss" not in failed
    assert set(finished["val_loss"]) == set(prepared_data.domains)
