import numpy as np
import pytest

from regmix.config.loading import parse_config
from regmix.config.sections import GateConfig
from regmix.gate import bootstrap_spearman, decide, plan_gate_proxies, proxies_needed
from tests.conftest import tiny_config_dict

TARGET = {"a": 0.5, "b": 0.5}


def result(id_, loss):
    return {"id": id_, "val_loss": {"a": loss, "b": loss}}


def fit_report(**extra):
    return {"best_train_target": 3.0, "cv_rmse": 0.05, "proxies": 32,
            "learning_curve": [[8, 0.4], [16, 0.55], [32, 0.65]], **extra}


def test_bootstrap_interval_brackets_the_point_and_is_seeded():
    rng = np.random.default_rng(0)
    predicted = rng.normal(size=10)
    measured = predicted + rng.normal(scale=0.3, size=10)
    point, low, high = bootstrap_spearman(predicted, measured, 1000, 0.9, seed=0)
    assert low <= point <= high and high - low > 0.05
    assert (point, low, high) == bootstrap_spearman(predicted, measured, 1000, 0.9, seed=0)


def test_gate_passes_when_ranks_agree_and_chosen_is_within_seed_noise():
    fresh = [result("chosen", 2.95)] + [result(f"g{i}", 3.0 + 0.1 * i) for i in range(1, 9)]
    noise = [result("chosen@seed1", 2.97), result("chosen@seed2", 2.95),
             result("best@seed1", 2.96), result("best@seed2", 2.97)]
    predicted = {r["id"]: r["val_loss"]["a"] + 0.01 for r in fresh}
    decision = decide(fresh + noise, predicted, TARGET, fit_report(), GateConfig(proxies=9, baselines=[]))
    assert decision["passed"], decision["reason"]
    assert decision["spearman"] == pytest.approx(1.0)
    assert decision["chosen_measured"] == pytest.approx(2.96)  # over the paired seeds
    assert decision["gap"] == pytest.approx(-0.005)
    assert "difference over 2 seeds" in decision["tolerance_basis"]


def test_gate_fails_on_scrambled_ranks_and_estimates_more_proxies():
    fresh = [result("chosen", 2.9)] + [result(f"g{i}", 3.0 + 0.1 * i) for i in range(1, 9)]
    rng = np.random.default_rng(1)
    predicted = {r["id"]: float(v) for r, v in zip(fresh, rng.permutation(9), strict=True)}
    decision = decide(fresh, predicted, TARGET, fit_report(), GateConfig(proxies=9, baselines=[], seeds=1))
    assert not decision["passed"]
    assert "lower bound < 0.8" in decision["reason"]
    assert "more training proxies" in decision["reason"]


def test_gate_fails_when_chosen_is_worse_beyond_the_noise():
    fresh = [result("chosen", 3.5)] + [result(f"g{i}", 3.0 + 0.1 * i) for i in range(1, 9)]
    noise = [result("chosen@seed1", 3.51), result("chosen@seed2", 3.49),
             result("best@seed1", 3.0), result("best@seed2", 3.01)]
    predicted = {r["id"]: r["val_loss"]["a"] for r in fresh}
    decision = decide(fresh + noise, predicted, TARGET, fit_report(),
                      GateConfig(proxies=9, baselines=[], spearman_threshold=-1))
    assert not decision["passed"] and "worse than the best training proxy" in decision["reason"]


def test_proxies_needed_from_a_power_law_curve():
    curve = [[n, 1 - 2.0 * n**-0.5] for n in (16, 32, 64)]
    assert proxies_needed(curve, 0.9) == pytest.approx(400, abs=2)  # 2 n^-0.5 = 0.1
    assert proxies_needed([[16, 0.8], [32, 0.7], [64, 0.6]], 0.9) is None  # getting worse
    assert proxies_needed([[16, 0.5], [32, 0.6]], 0.9) is None  # two points: no extrapolation
    # Nearly flat: a power law would ask for astronomically many (or overflow); no estimate
    assert proxies_needed([[16, 0.70], [32, 0.7001], [64, 0.7002]], 0.9) is None
    assert proxies_needed([[16, 0.60], [32, 0.62], [48, 0.61], [64, 0.63]], 0.9) is None


def test_bootstrap_counts_tied_draws_as_no_correlation():
    # Tied predictions (a tree model's): a draw of only tied ones has no rank correlation.
    # Dropped, they lifted the interval above its own point estimate.
    predicted, measured = np.array([1.0, 2, 2, 2, 2, 2]), np.arange(6.0)
    point, low, high = bootstrap_spearman(predicted, measured, 2000, 0.9, seed=0)
    assert low <= point <= high and low == 0


def test_the_same_seeds_cancel_their_luck_in_the_chosen_vs_best_comparison():
    # Each seed moves both mixtures alike (by 0.1 apart); the chosen is worse by 0.03 on every
    # one: unpaired, that hides in the seeds' spread; paired, it is plain.
    fresh = [result("chosen", 3.0)] + [result(f"g{i}", 3.0 + 0.1 * i) for i in range(1, 6)]
    luck = {1: 0.0, 2: 0.1, 3: 0.2}
    noise = [result(f"chosen@seed{s}", 3.03 + d) for s, d in luck.items()]
    noise += [result(f"best@seed{s}", 3.0 + d) for s, d in luck.items()]
    predicted = {r["id"]: r["val_loss"]["a"] for r in fresh}
    decision = decide(fresh + noise, predicted, TARGET, fit_report(),
                      GateConfig(proxies=6, baselines=[], spearman_threshold=-1))
    assert decision["gap"] == pytest.approx(0.03)
    assert not decision["passed"] and "worse than the best training proxy" in decision["reason"]


def test_plan_has_fresh_mixtures_chosen_first_and_seed_replicas(prepared_data):
    config = parse_config(tiny_config_dict("x.yaml", gate={"proxies": 5, "seeds": 2, "baselines": []},
                                           mixtures={"count": 8, "max_epochs": 50}))
    chosen = {"code": 0.2, "changelogs": 0.5, "licenses": 0.3}
    best = {"code": 0.6, "changelogs": 0.2, "licenses": 0.2}
    tasks = plan_gate_proxies(config, prepared_data.meta, chosen, best, np.empty((0, 3)))
    mixtures = [m for t in tasks for m in t["mixtures"]]
    # Replicas on seeds the training run did not use, the same for both mixtures
    assert [m["id"] for m in mixtures] == ["chosen", "g0001", "g0002", "g0003", "g0004",
                                           "chosen@seed1", "chosen@seed2", "best@seed1",
                                           "best@seed2"]
    assert len({m["hash"] for m in mixtures}) == len(mixtures)
    assert all(set(t) == {"task", "mixtures"} for t in tasks)  # plain items: no tracking


def test_gate_fails_when_too_few_fresh_proxies_finished():
    # Three of eight finished, in perfect order: the bootstrap alone would say [1, 1].
    fresh = [result("chosen", 2.9)] + [result(f"g{i}", 3.0 + 0.1 * i) for i in range(1, 3)]
    predicted = {r["id"]: r["val_loss"]["a"] for r in fresh}
    decision = decide(fresh, predicted, TARGET, fit_report(), GateConfig(proxies=8, baselines=[], seeds=1))
    assert not decision["passed"]
    assert decision["reason"].startswith("only 3 of 8 fresh gate proxies finished")


def test_fresh_gate_mixtures_skip_those_the_regression_was_fitted_on(prepared_data):
    # A sparse sampler repeats mixtures (one-hot ones): the gate's must be new to the regression
    config = parse_config(tiny_config_dict("x.yaml", gate={"proxies": 5, "seeds": 1, "baselines": []},
                                           mixtures={"count": 8, "max_epochs": 50}))
    chosen = {"code": 0.2, "changelogs": 0.5, "licenses": 0.3}
    domains = prepared_data.meta["domains"]

    def fresh(fitted):
        tasks = plan_gate_proxies(config, prepared_data.meta, chosen, chosen, fitted)
        return [[m["weights"][d] for d in domains] for t in tasks for m in t["mixtures"]][1:]

    unseen = fresh(np.empty((0, 3)))
    skipped = fresh(np.array(unseen[:2]))
    assert len(skipped) == 4 and skipped[:2] == unseen[2:]  # the same sequence, less the seen
    assert not any(np.allclose(w, seen) for w in skipped for seen in unseen[:2])


def test_a_chosen_training_mixture_stays_out_of_the_rank_check(prepared_data):
    # The search may return a training mixture itself (a tree model's flat surface): its loss
    # was fitted, so the rank check scores gate.proxies others, all of them held out.
    config = parse_config(tiny_config_dict("x.yaml", gate={"proxies": 5, "seeds": 1, "baselines": []},
                                           mixtures={"count": 8, "max_epochs": 50}))
    chosen = {"code": 0.2, "changelogs": 0.5, "licenses": 0.3}
    fitted = np.array([[0.6, 0.2, 0.2], [0.2, 0.5, 0.3]])  # the second is the chosen one
    tasks = plan_gate_proxies(config, prepared_data.meta, chosen, chosen, fitted)
    ids = [m["id"] for t in tasks for m in t["mixtures"]]
    assert ids == ["chosen", "g0001", "g0002", "g0003", "g0004", "g0005"]  # one more fresh
    # The chosen one fits perfectly (in-sample) but for its rank: out of the rank check, the
    # others order perfectly
    fresh = [result("chosen", 2.0)] + [result(f"g000{i}", 3.0 + 0.1 * i) for i in range(1, 6)]
    predicted = {r["id"]: r["val_loss"]["a"] for r in fresh} | {"chosen": 5.0}
    scored = decide(fresh, predicted, TARGET, fit_report(), GateConfig(proxies=5, baselines=[], seeds=1),
                    chosen_fitted=True)
    assert scored["fresh"] == ["g0001", "g0002", "g0003", "g0004", "g0005"]
    assert scored["spearman"] == pytest.approx(1.0) and scored["chosen_fitted"]
    assert scored["chosen_measured"] == 2.0  # still judged against the best training proxy
    unflagged = decide(fresh, predicted, TARGET, fit_report(), GateConfig(proxies=5, baselines=[], seeds=1))
    assert "chosen" in unflagged["fresh"] and unflagged["spearman"] < 0.5


def with_baselines(chosen: dict[int, float], **baselines: dict[int, float]) -> list[dict]:
    """Fresh proxies in perfect order, plus the seed replicas of the chosen mixture, the best
    proxy (as good as the chosen) and each baseline."""
    fresh = [result("chosen", chosen[1])] + [result(f"g{i}", 3.0 + 0.1 * i) for i in range(1, 9)]
    replicas = [result(f"chosen@seed{s}", v) for s, v in chosen.items()]
    replicas += [result(f"best@seed{s}", v) for s, v in chosen.items()]
    replicas += [result(f"{name}@seed{s}", v) for name, by_seed in baselines.items()
                 for s, v in by_seed.items()]
    return fresh + replicas


def test_the_gate_passes_only_a_mixture_that_beats_each_baseline_beyond_paired_noise():
    # Each seed's luck moves every mixture alike; the chosen is 0.05 better than the prior on
    # every seed, and no better than uniform (ahead on one seed, behind on another)
    luck = {1: 0.0, 2: 0.2, 3: 0.1}
    chosen = {s: 2.90 + d for s, d in luck.items()}
    prior = {s: 2.95 + d for s, d in luck.items()}
    uniform = {s: 2.90 + d + e for (s, d), e in zip(luck.items(), (0.02, -0.02, 0.01), strict=True)}
    results = with_baselines(chosen, prior=prior, uniform=uniform)
    predicted = {r["id"]: r["val_loss"]["a"] for r in results if "@" not in r["id"]}
    decision = decide(results, predicted, TARGET, fit_report(),
                      GateConfig(proxies=9, baselines=["prior"]))
    assert decision["passed"], decision["reason"]
    prior_stats = decision["baselines"]["prior"]
    assert prior_stats["margin"] == pytest.approx(0.05) and prior_stats["chosen_wins"]
    assert prior_stats["noise"] == pytest.approx(0.0, abs=1e-9) and prior_stats["seeds"] == 3
    refused = decide(results, predicted, TARGET, fit_report(),
                     GateConfig(proxies=9, baselines=["prior", "uniform"]))
    assert not refused["passed"] and not refused["baselines"]["uniform"]["chosen_wins"]
    assert "chosen mixture does not beat uniform at proxy size: ahead of it by 0.0033, " \
           "within the paired noise bound" in refused["reason"]
    assert "what would help: more training proxies" in refused["reason"]
    assert "prior" not in refused["reason"]


def test_a_mixture_no_better_than_the_baseline_is_refused_saying_by_how_much():
    chosen = {1: 3.0, 2: 3.1, 3: 3.05}
    results = with_baselines(chosen, prior={s: v - 0.02 for s, v in chosen.items()})
    predicted = {r["id"]: r["val_loss"]["a"] for r in results if "@" not in r["id"]}
    decision = decide(results, predicted, TARGET, fit_report(), GateConfig(proxies=9))
    assert not decision["passed"]
    assert "does not beat prior at proxy size: behind it by 0.0200" in decision["reason"]


def test_the_best_proxy_baseline_is_the_best_proxys_own_replicas():
    chosen = {1: 2.9, 2: 3.0, 3: 2.95}
    results = with_baselines(chosen)  # best@seed*: the same losses as the chosen mixture
    predicted = {r["id"]: r["val_loss"]["a"] for r in results if "@" not in r["id"]}
    decision = decide(results, predicted, TARGET, fit_report(),
                      GateConfig(proxies=9, baselines=["best_proxy"]))
    assert decision["baselines"]["best_proxy"]["margin"] == pytest.approx(0.0)
    assert not decision["passed"] and "does not beat best_proxy" in decision["reason"]


def test_baselines_need_three_seeds_and_known_names():
    with pytest.raises(ValueError, match=r"gate.seeds: comparing with gate.baselines \['prior'\] "
                                         r"needs at least 3 seeds"):
        GateConfig(seeds=2)
    assert GateConfig(seeds=2, baselines=[]).baselines == []
    with pytest.raises(Exception, match=r"gate.baselines: \['mine'\] are neither"):
        parse_config(tiny_config_dict("x.yaml", gate={"proxies": 5, "baselines": ["mine"]}))
    config = parse_config(tiny_config_dict("x.yaml", gate={"proxies": 5, "baselines": ["mine"]},
                                           large={"extra_baselines": {"mine": {"code": 1.0}}}))
    assert config.gate.baselines == ["mine"]


def test_the_plan_retrains_each_baseline_on_the_chosen_mixtures_seeds(prepared_data):
    config = parse_config(tiny_config_dict("x.yaml", gate={"proxies": 5, "baselines": ["prior", "uniform"]},
                                           mixtures={"count": 8, "max_epochs": 50}))
    chosen = {"code": 0.2, "changelogs": 0.5, "licenses": 0.3}
    tasks = plan_gate_proxies(config, prepared_data.meta, chosen, chosen, np.empty((0, 3)))
    ids = [m["id"] for t in tasks for m in t["mixtures"]]
    for name in ("chosen", "best", "prior", "uniform"):
        assert [i for i in ids if i.startswith(f"{name}@")] == [f"{name}@seed{s}" for s in (1, 2, 3)]
    uniform = next(m for t in tasks for m in t["mixtures"] if m["id"] == "uniform@seed1")
    assert uniform["weights"] == pytest.approx({d: 1 / 3 for d in prepared_data.domains})
