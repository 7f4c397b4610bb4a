import json
import os
import subprocess
import sys
import textwrap
import time

import mlflow
import numpy as np
import pytest
import torch

import regmix.train.loop
from regmix.config.loading import parse_config
from regmix.config.sections import TrainRecipe
from regmix.config.shapes import SHAPES
from regmix.errors import TrackingUnavailable
from regmix.mixtures import as_mixtures, proxy_key
from regmix.train.loop import MixtureBatches, evaluate, lr_at, train_lm, train_packed
from regmix.train.proxy import (
    DIVERGED_TAG,
    _train_proxy,
    find_finished,
    keep_outcome,
    kept_result_path,
    run_name,
    run_train_proxies,
    train_proxies_packed,
    train_proxy,
    training_lock,
)
from tests.conftest import tiny_config_dict


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from a second thread, and on busy shared cores it stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_batches_follow_the_mixture_and_the_seed(prepared_data):
    weights = {"code": 0.75, "changelogs": 0.25, "licenses": 0.0}
    batches = MixtureBatches(prepared_data, weights, context=32, seed=3)
    x, y = batches.next(400)
    assert x.shape == y.shape == (400, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = MixtureBatches(prepared_data, weights, context=32, seed=3).next(400)[0]
    assert torch.equal(x, again)
    assert batches.domains == ["code", "changelogs"]  # zero-weight domains are never drawn
    counts = batches.rng.multinomial(10_000, batches.p)
    assert abs(counts[0] / 10_000 - 0.75) < 0.02


def test_schedule_warms_up_then_decays_to_the_floor():
    recipe = TrainRecipe(tokens=1, lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1)
    lrs = [lr_at(s, 100, recipe) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_training_is_deterministic_and_learns(prepared_data):
    recipe = TrainRecipe(tokens=16_384, batch_size=8, lr=0.01)
    weights = {d: 1 / 3 for d in prepared_data.domains}
    model, loss, tokens, _ = train_lm(prepared_data, weights, SHAPES["tiny-proxy"], recipe, seed=0)
    again, loss_again, _, _ = train_lm(prepared_data, weights, SHAPES["tiny-proxy"], recipe, seed=0)
    assert loss == loss_again
    assert tokens == 16_384
    assert max(evaluate(model, prepared_data).values()) < np.log(512) - 0.5


def test_compile_without_a_compiler_is_refused_before_training(prepared_data, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")  # inductor's, on CPU
    monkeypatch.setenv("CC", "no-such-compiler")  # Triton's, on a GPU
    recipe = TrainRecipe(tokens=16_384, batch_size=8, compile=True)
    weights = {d: 1 / 3 for d in prepared_data.domains}
    with pytest.raises(ValueError, match=r"train.compile is true, but torch.compile on (cpu|cuda) needs a "
                                         r"compiler this machine lacks \(no-such-compiler\).*"
                                         r"set compile: false"):
        train_lm(prepared_data, weights, SHAPES["tiny-proxy"], recipe, seed=0)


@pytest.mark.slow  # compiling takes about 15 s on 2 cores
def test_a_compiled_run_trains_as_the_eager_one_and_returns_the_plain_model(prepared_data, tmp_path):
    recipe = TrainRecipe(tokens=16_384, batch_size=8, lr=0.01, checkpoint_every=5)
    weights = {d: 1 / 3 for d in prepared_data.domains}
    eager, eager_loss, _, _ = train_lm(prepared_data, weights, SHAPES["tiny-proxy"], recipe, 0)
    compiled, loss, _, _ = train_lm(prepared_data, weights, SHAPES["tiny-proxy"],
                                    recipe.model_copy(update={"compile": True}), 0, None, tmp_path)
    assert type(compiled) is type(eager)  # its state dict loads into an LM
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert loss == pytest.approx(eager_loss, abs=1e-4)
    measured, expected = evaluate(compiled, prepared_data), evaluate(eager, prepared_data)
    assert measured == pytest.approx(expected, abs=1e-4)


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(prepared_data, tmp_path):
    recipe = TrainRecipe(tokens=16_384, batch_size=8, lr=0.01, log_every=1, checkpoint_every=5)
    weights = {"code": 0.5, "changelogs": 0.3, "licenses": 0.2}
    shape = SHAPES["tiny-proxy"]
    curve = []
    model, loss, _, _ = train_lm(prepared_data, weights, shape, recipe, 0,
                                 on_log=lambda step, value: curve.append((step, value)))

    class Killed(Exception):
        pass

    def killed_at_step_12(step, value):
        time.sleep(0.2)  # a slow first try: its seconds (2+ by the checkpoint) count once resumed
        if step == 12:
            raise Killed

    with pytest.raises(Killed):
        train_lm(prepared_data, weights, shape, recipe, 0, killed_at_step_12, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000010"]  # whole, and only the last
    resumed_curve, started = [], time.perf_counter()
    resumed, resumed_loss, _, seconds = train_lm(
        prepared_data, weights, shape, recipe, 0,
        on_log=lambda step, value: resumed_curve.append((step, value)), checkpoint_dir=tmp_path)
    assert resumed_loss == loss and resumed_curve == curve  # the curve so far is replayed
    assert seconds > time.perf_counter() - started + 1.0
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# What the fault drills train: a tiny proxy that checkpoints every 10 of its 32 steps
DRILL_RECIPE = TrainRecipe(tokens=16_384, batch_size=8, lr=0.01, checkpoint_every=10)
DRILL_SHAPE = SHAPES["tiny-proxy"]


def drill_mixture(mixture_id: str, mixture_hash: str) -> dict:
    return {"id": mixture_id, "hash": mixture_hash,
            "weights": {"code": 0.6, "changelogs": 0.2, "licenses": 0.2}}


def uninterrupted_loss(data, mixture: dict) -> dict[str, float]:
    """The drill proxy's validation losses, trained in one go with no cache."""
    return evaluate(train_lm(data, mixture["weights"], DRILL_SHAPE, DRILL_RECIPE, 0)[0], data)


def evicted_after_last_checkpoint(monkeypatch, data, mixture, tracking, target):
    """Train the proxy until its pod is evicted, after its last checkpoint and before evaluating."""
    def killed(*args):
        raise RuntimeError("pod evicted")

    with monkeypatch.context() as m:
        m.setattr(regmix.train.proxy, "evaluate", killed)
        with pytest.raises(RuntimeError):
            train_proxy(data, mixture, DRILL_SHAPE, DRILL_RECIPE, 0, tracking, target)


def test_a_rerun_task_resumes_its_proxy_from_the_cache(prepared_data, tracking, tmp_path,
                                                       monkeypatch):

    monkeypatch.setenv("REGMIX_CACHE", str(tmp_path))
    mixture = drill_mixture("m0001", "abcdef0123456789")
    target = {d: 1 / 3 for d in prepared_data.domains}

    evicted_after_last_checkpoint(monkeypatch, prepared_data, mixture, tracking, target)
    folder = tmp_path / "checkpoints" / mixture["hash"]
    assert [p.name for p in folder.iterdir()] == ["step-000000030"]
    result = train_proxy(prepared_data, mixture, DRILL_SHAPE, DRILL_RECIPE, 0, tracking, target)
    assert result["val_loss"] == uninterrupted_loss(prepared_data, mixture)
    assert not folder.exists()  # the finished run in MLflow is the record now


def test_damaged_checkpoints_and_kept_results_are_removed_and_trained_again(
        prepared_data, tracking, tmp_path, monkeypatch, caplog):
    """Fault drill: a truncated checkpoint model and a truncated kept result (a full disk, a
    killed copy) are reported by name and removed; the proxies train again to the result an
    uninterrupted run gives, instead of failing every rerun."""
    monkeypatch.setenv("REGMIX_CACHE", str(tmp_path))
    target = {d: 1 / 3 for d in prepared_data.domains}
    resumed, kept = (drill_mixture(f"m{i}", f"{i:016x}") for i in (1, 2))

    evicted_after_last_checkpoint(monkeypatch, prepared_data, resumed, tracking, target)
    model = tmp_path / "checkpoints" / resumed["hash"] / "step-000000030" / "model.safetensors"
    os.truncate(model, model.stat().st_size // 2)
    kept_result_path(kept["hash"]).parent.mkdir(parents=True, exist_ok=True)
    kept_result_path(kept["hash"]).write_text('{"val_loss": {"code": 3.1')  # cut mid-write
    uninterrupted = uninterrupted_loss(prepared_data, resumed)
    for mixture in (resumed, kept):
        result = train_proxy(prepared_data, mixture, DRILL_SHAPE, DRILL_RECIPE, 0, tracking,
                             target)
        assert result["val_loss"] == uninterrupted and not result["reused"]
    assert f"{model} has" in caplog.text and f"{kept_result_path(kept['hash'])} is damaged" in caplog.text
    assert not kept_result_path(kept["hash"]).exists()


@pytest.fixture
def full_disk(tmp_path):
    """A small tmpfs filled to the last byte: the cache of a pod whose volume ran full."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    (mount / "locks").mkdir()  # made before the disk filled, as on a volume used before
    try:
        with (mount / "filler").open("wb") as filler, pytest.raises(OSError, match="No space"):
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_proxy_trained_on_a_full_disk_still_reaches_mlflow(prepared_data, tracking, full_disk,
                                                            monkeypatch, caplog):
    """Fault drill: with the cache's disk full, neither checkpoints nor the kept result can be
    written; the training is not discarded: it ends as an uninterrupted run and is logged."""
    monkeypatch.setenv("REGMIX_CACHE", str(full_disk))
    mixture = drill_mixture("m0001", "feedfacecafe0001")
    target = {d: 1 / 3 for d in prepared_data.domains}
    result = train_proxy(prepared_data, mixture, DRILL_SHAPE, DRILL_RECIPE, 0, tracking, target)
    assert result["val_loss"] == uninterrupted_loss(prepared_data, mixture)
    assert find_finished(tracking, mixture["hash"]).info.run_id == result["run_id"]
    assert "not written" in caplog.text and "No space left on device" in caplog.text
    assert f"not kept at {kept_result_path(mixture['hash'])}" in caplog.text


def test_a_proxy_another_run_is_training_is_waited_for_and_reused(prepared_data, tracking,
                                                                  tmp_path, monkeypatch):
    """Two pipeline runs at once (a manual run beside a scheduled one) train a shared proxy once."""
    import threading

    monkeypatch.setenv("REGMIX_CACHE", str(tmp_path))
    recipe, shape = TrainRecipe(tokens=4096, batch_size=4), SHAPES["tiny-proxy"]
    mixture = {"id": "m0001", "hash": "0123456789abcdef", "weights": {"code": 1.0}}
    args = (prepared_data, mixture, shape, recipe, 0, tracking, {"code": 1.0})
    second: list[dict] = []
    with training_lock(mixture["hash"]):  # the first run holds it while it trains
        waiting = threading.Thread(target=lambda: second.append(train_proxy(*args)))
        waiting.start()
        waiting.join(timeout=2.0)
        assert waiting.is_alive() and not second  # the second run waits...
        first = _train_proxy(*args, stage="proxy", main=True)
    waiting.join(timeout=60)
    assert first["reused"] is False
    assert second[0]["reused"] is True and second[0]["run_id"] == first["run_id"]  # ...and reuses
    runs = mlflow.MlflowClient(tracking["uri"]).search_runs(
        [tracking["experiment_id"]], f"tags.`regmix.mixture_hash` = '{mixture['hash']}'")
    assert len(runs) == 1


def test_runs_with_different_precisions_share_one_process(prepared_data):
    """accelerate's state is a process-wide singleton; each run still gets its own precision."""
    weights = {d: 1 / 3 for d in prepared_data.domains}
    for precision in ("bf16", "no", "bf16"):
        recipe = TrainRecipe(tokens=2048, batch_size=4, mixed_precision=precision)
        _, loss, _, _ = train_lm(prepared_data, weights, SHAPES["tiny-proxy"], recipe, seed=0)
        assert np.isfinite(loss)


@pytest.mark.slow
@pytest.mark.parametrize(("batch_size", "micro_batch_size"), [(8, 2), (12, 4)])  # 12: 4 + 2 a rank
def test_two_processes_train_the_model_one_process_does(prepared_data, tmp_path, batch_size,
                                                       micro_batch_size):
    """The multi-GPU path (DDP under torchrun), on CPU over gloo: same batches, same model,
    checkpoints written by both ranks on the way."""
    weights = {"code": 0.5, "changelogs": 0.3, "licenses": 0.2}
    recipe = TrainRecipe(tokens=12288, batch_size=batch_size, micro_batch_size=micro_batch_size,
                         lr=0.01, checkpoint_every=10)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from accelerate import PartialState
        from regmix.config.sections import TrainRecipe
        from regmix.config.shapes import SHAPES
        from regmix.data.prepare import TokenData
        from regmix.train.loop import train_lm
        recipe = TrainRecipe.model_validate_json({recipe.model_dump_json()!r})
        _, loss, _, _ = train_lm(TokenData.open(sys.argv[1]), {weights!r}, SHAPES["tiny-proxy"],
                              recipe, 0, checkpoint_dir=sys.argv[2])
        if PartialState().is_main_process:
            print(json.dumps({{"processes": PartialState().num_processes, "loss": loss}}))
    """))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(prepared_data.root), str(tmp_path / "checkpoints")],
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, check=True)
    ranks = json.loads(out.stdout.strip().splitlines()[-1])
    _, loss, _, _ = train_lm(prepared_data, weights, SHAPES["tiny-proxy"], recipe, 0)
    assert ranks["processes"] == 2 and ranks["loss"] == pytest.approx(loss, rel=1e-5)
    kept = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert len(kept) == 1 and kept[0].startswith("step-")  # whole (no .partial), the last only


def test_mixture_moves_the_domain_losses(prepared_data):
    """The premise of RegMix: more of a domain in the mixture, lower loss on that domain."""
    recipe = TrainRecipe(tokens=32_768, batch_size=8, lr=0.01)
    code_heavy = {"code": 0.9, "changelogs": 0.05, "licenses": 0.05}
    log_heavy = {"code": 0.05, "changelogs": 0.9, "licenses": 0.05}
    shape = SHAPES["tiny-proxy"]
    on_code = evaluate(train_lm(prepared_data, code_heavy, shape, recipe, 0)[0], prepared_data)
    on_logs = evaluate(train_lm(prepared_data, log_heavy, shape, recipe, 0)[0], prepared_data)
    assert on_code["code"] < on_logs["code"]
    assert on_logs["changelogs"] < on_code["changelogs"]


def test_component_logs_one_run_per_proxy_and_reuses_finished_ones(prepared_data, tracking):
    config = tiny_config_dict("unused.yaml")
    weights = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    mixtures = as_mixtures(weights, prepared_data.domains, "m",
                           proxy_key(parse_config(config), prepared_data.meta))
    task = {"task": 0.0, "mixtures": mixtures}  # KFP gives ints as floats
    data = str(prepared_data.root)
    out = run_train_proxies(parse_config(config), task, data, tracking)
    assert out["task"] == 0 and [r["reused"] for r in out["results"]] == [False, False]
    runs = mlflow.MlflowClient(tracking["uri"]).search_runs(
        [tracking["experiment_id"]], "tags.`regmix.stage` = 'proxy'")
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == tracking["parent_run_id"]
        assert {f"weight.{d}" for d in prepared_data.domains} <= set(run.data.params)
        assert {f"val_loss.{d}" for d in prepared_data.domains} <= set(run.data.metrics)
        assert {"train_loss", "tokens", "seconds", "target_loss"} <= set(run.data.metrics)
        # What export checks rows share: the data and the recipe
        assert run.data.tags["regmix.corpus_fingerprint"] == prepared_data.fingerprint
        assert run.data.params["train.lr"] == "0.01" and run.data.params["model.n_layer"] == "1"
        assert next(iter(run.data.metrics)) == "target_loss"  # what MLflow's compare view plots
    history = mlflow.MlflowClient(tracking["uri"]).get_metric_history(runs[0].info.run_id,
                                                                      "train_loss")
    assert len(history) >= 2  # the training curve, stepped

    again = run_train_proxies(parse_config(config), task, data, tracking)
    assert [r["reused"] for r in again["results"]] == [True, True]
    assert again["results"][1]["val_loss"] == out["results"][1]["val_loss"]


def test_a_failed_proxy_is_reported_and_its_task_mates_kept(prepared_data, tracking):
    config = tiny_config_dict("unused.yaml")
    good = as_mixtures(np.array([[0.4, 0.3, 0.3]]), prepared_data.domains, "m",
                       proxy_key(parse_config(config), prepared_data.meta))[0]
    broken = {"id": "m0009", "hash": "0" * 16, "weights": {d: 0.0 for d in prepared_data.domains}}
    task = {"task": 1.0, "mixtures": [broken, good]}
    data = str(prepared_data.root)
    out = run_train_proxies(parse_config(config), task, data, tracking)
    failed, finished = out["results"]
    assert failed["id"] == "m0009" and "error" in failed and "val_loss" not in failed
    assert finished["id"] == good["id"] and set(finished["val_loss"]) == set(prepared_data.domains)


def test_a_diverged_proxy_fails_its_run_and_is_not_trained_again(prepared_data, tracking,
                                                                  monkeypatch):
    config = tiny_config_dict("unused.yaml")
    mixture = as_mixtures(np.array([[0.4, 0.3, 0.3]]), prepared_data.domains, "m",
                          proxy_key(parse_config(config), prepared_data.meta))[0]
    task = {"task": 0.0, "mixtures": [mixture]}
    data = str(prepared_data.root)
    losses = dict(zip(prepared_data.domains, [float("nan"), float("inf"), 3.0], strict=True))
    monkeypatch.setattr(regmix.train.proxy, "evaluate", lambda model, data, precision: losses)
    failed = run_train_proxies(parse_config(config), task, data, tracking)["results"][0]
    diverged = sorted(prepared_data.domains[:2])
    assert "val_loss" not in failed
    assert failed["error"].startswith(f"diverged: validation loss not finite on {diverged}")
    assert failed["error"].endswith("lower proxy.train.lr or proxy.train.grad_clip")
    run = find_finished(tracking, mixture["hash"])
    assert run.info.status == "FAILED" and run.data.tags[DIVERGED_TAG] == "true"
    assert run.data.metrics[f"val_loss.{prepared_data.domains[2]}"] == 3.0  # what it measured

    def no_training(*args, **kwargs):
        raise AssertionError("a diverged proxy must not be trained again")

    monkeypatch.setattr(regmix.train.proxy, "train_lm", no_training)
    again = run_train_proxies(parse_config(config), task, data, tracking)["results"][0]
    assert again["error"] == failed["error"]  # MLflow kept the infinite loss as the largest float


def test_only_the_main_process_logs_a_kept_outcome(prepared_data, tracking, monkeypatch, tmp_path):
    """A retried multi-GPU run finds the outcome its last try kept: one rank logs it, once."""
    import accelerate

    monkeypatch.setenv("REGMIX_CACHE", str(tmp_path))
    mixture = {"id": "large@seed0", "hash": "feedfacefeedface", "weights": {"code": 1.0}}
    outcome = {"val_loss": {d: 3.0 for d in prepared_data.domains}, "train_loss": 3.1,
               "tokens": 2048, "seconds": 1.0, "curve": [(0, 3.1)]}
    keep_outcome(mixture["hash"], outcome)
    recipe, shape = TrainRecipe(tokens=2048, batch_size=4), SHAPES["tiny-proxy"]

    class OtherRank:
        is_main_process, num_processes = False, 2

    with monkeypatch.context() as m:
        m.setattr(accelerate, "PartialState", OtherRank)
        other = train_proxy(prepared_data, mixture, shape, recipe, 0, tracking, {"code": 1.0})
    assert "val_loss" not in other and find_finished(tracking, mixture["hash"]) is None
    assert kept_result_path(mixture["hash"]).exists()
    main = train_proxy(prepared_data, mixture, shape, recipe, 0, tracking, {"code": 1.0})
    assert main["val_loss"] == outcome["val_loss"] and not kept_result_path(mixture["hash"]).exists()


def test_a_pack_trains_and_logs_one_content_hash_once(prepared_data, tracking, monkeypatch,
                                                       tmp_path):
    """The gate's replicas of the chosen mixture and of the best proxy share a hash when the
    search chose the best proxy's own mixture: one training, one MLflow run."""

    monkeypatch.setenv("REGMIX_CACHE", str(tmp_path))
    same = {"code": 0.5, "changelogs": 0.5}
    mixtures = [{"id": "chosen@seed1", "hash": "1111111111111111", "weights": same},
                {"id": "best@seed1", "hash": "1111111111111111", "weights": same},
                {"id": "g0001", "hash": "2222222222222222", "weights": {"code": 1.0}}]
    recipe, shape = TrainRecipe(tokens=4096, batch_size=4), SHAPES["tiny-proxy"]
    results = train_proxies_packed(prepared_data, mixtures, shape, recipe, [1, 1, 0], tracking,
                                   {"code": 1.0})
    assert [r["id"] for r in results] == ["chosen@seed1", "best@seed1", "g0001"]
    assert [r["reused"] for r in results] == [False, True, False]
    assert results[0]["val_loss"] == results[1]["val_loss"]
    assert results[0]["run_id"] == results[1]["run_id"]
    runs = mlflow.MlflowClient(tracking["uri"]).search_runs([tracking["experiment_id"]],
                                                            "tags.`regmix.stage` = 'proxy'")
    assert len(runs) == 2


def test_packed_training_under_a_loss_scale_clips_as_training_alone(prepared_data, monkeypatch):
    """fp16 on a GPU scales the loss by 2^16; each packed proxy must be clipped unscaled, as
    accelerate clips a model trained alone. CPU has no fp16 autocast, so the scaler is added
    by hand to the accelerator the training builds."""
    build = regmix.train.loop.make_accelerator

    def with_loss_scale(recipe):
        accelerator = build(recipe)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        prepare = accelerator.prepare

        def prepare_then_scale(obj):  # accelerate's own check for the scaler's path
            prepared = prepare(obj)
            accelerator.native_amp = True
            return prepared

        accelerator.prepare = prepare_then_scale
        return accelerator

    recipe = TrainRecipe(tokens=8192, batch_size=8, lr=0.01, mixed_precision="fp16")
    weights = {"code": 0.5, "changelogs": 0.3, "licenses": 0.2}
    monkeypatch.setattr(regmix.train.loop, "make_accelerator", with_loss_scale)
    _, alone, _, _ = train_lm(prepared_data, weights, SHAPES["tiny-proxy"], recipe, 0)
    _, packed, _, _ = train_packed(prepared_data, [weights, weights], SHAPES["tiny-proxy"],
                                   recipe, [0, 1])
    assert packed[0] == pytest.approx(alone, rel=1e-5)


def test_a_proxy_trained_while_mlflow_is_down_is_kept_and_logged_later(prepared_data, tracking,
                                                                       monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    monkeypatch.setattr(regmix.tracking.runs, "BACKOFF_S", 0.0)
    monkeypatch.setattr(regmix.tracking.runs, "RETRY_S", 0.1)
    config = tiny_config_dict("unused.yaml")
    mixture = as_mixtures(np.array([[0.3, 0.3, 0.4]]), prepared_data.domains, "m",
                          proxy_key(parse_config(config), prepared_data.meta))[0]
    task = {"task": 0.0, "mixtures": [mixture]}
    data = str(prepared_data.root)

    def outage(*args, **kwargs):  # what the client raises once the server stops answering
        raise MlflowException("Connection refused", error_code=TEMPORARILY_UNAVAILABLE)

    kept = kept_result_path(mixture["hash"])
    # The task fails (so that the orchestrator retries it), saying where the proxy is kept
    with monkeypatch.context() as down, pytest.raises(TrackingUnavailable, match=str(kept)):
        down.setattr(mlflow.MlflowClient, "log_batch", outage)
        run_train_proxies(parse_config(config), task, data, tracking)
    trained = json.loads(kept.read_text())
    assert find_finished(tracking, mixture["hash"]) is None

    def no_training(*args, **kwargs):
        raise AssertionError("a kept proxy must not be trained again")

    monkeypatch.setattr(regmix.train.proxy, "train_lm", no_training)
    logged = run_train_proxies(parse_config(config), task, data, tracking)["results"][0]
    assert "error" not in logged and logged["val_loss"] == trained["val_loss"]
    assert not kept.exists()
    run = find_finished(tracking, mixture["hash"])
    assert run.info.run_id == logged["run_id"]
    assert run.data.metrics["train_loss"] == trained["curve"][-1][1]


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp"])
def test_shipped_accelerate_configs_load_in_accelerate(name):
    # accelerate's own loader: it rejects unknown keys and values (as `accelerate launch` would)
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(f"configs/accelerate/{name}.yaml")
    assert config.mixed_precision == "bf16"
    assert config.distributed_type == {"single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP"}[name]


def test_a_run_name_leads_with_what_tells_runs_apart_and_names_the_mixture_a_replica_repeats():
    assert run_name("proxy", {"id": "m0003"}) == "m0003 · proxy"
    assert run_name("gate-proxy", {"id": "best@seed1", "replica_of": "m0007"}) \
        == "best@seed1=m0007 · gate-proxy"
    assert run_name("gate-proxy", {"id": "chosen@seed2", "replica_of": "chosen"}) \
        == "chosen@seed2 · gate-proxy"
