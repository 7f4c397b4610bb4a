import pytest
import torch

import regmix.train.proxy
from regmix.config.loading import parse_config
from regmix.evidence import (
    compare,
    plan_large_runs,
    plan_rank_check,
    rank_invariance,
    target_key,
    target_run,
    verdict,
)
from regmix.train.launcher import train_target
from tests.conftest import tiny_config_dict

TARGET = {"code": 1.0}


def loss(name, value, **extra):
    return {"name": name, "id": name, "val_loss": {"code": value}, **extra}


def test_plan_trains_chosen_and_baselines_over_seeds(prepared_data):
    config = parse_config(tiny_config_dict(
        "x.yaml", large={"model": {"shape": "tiny-large"}, "train": {"tokens": 1024},
                         "seeds": 2, "baselines": ["prior", "uniform"],
                         "extra_baselines": {"mine": {"code": 1.0}}}))
    chosen = {"code": 0.2, "changelogs": 0.5, "licenses": 0.3}
    runs = plan_large_runs(config, prepared_data.meta, chosen, chosen)
    assert [r["id"] for r in runs] == [f"{n}@seed{s}" for n in ("chosen", "prior", "uniform",
                                                                 "mine") for s in (0, 1)]
    assert [r["role"] for r in runs][:3] == ["large", "large", "baseline"]
    prior = runs[2]["weights"]
    tokens = prepared_data.train_tokens()
    assert prior["code"] == pytest.approx(tokens[0] / tokens.sum())
    assert len({r["hash"] for r in runs}) == len(runs)


def test_compare_judges_wins_seed_by_seed():
    stats = compare([loss("chosen", 3.00, seed=0), loss("chosen", 3.02, seed=1),
                     loss("prior", 3.20, seed=0), loss("prior", 3.22, seed=1),
                     loss("uniform", 3.01, seed=0), loss("uniform", 3.05, seed=1)], TARGET)
    assert stats["prior"]["chosen_wins"] and stats["prior"]["margin"] == pytest.approx(0.2)
    # Differences 0.01 and 0.03: a t bound of 12.7 x 0.01 over 2 seeds.
    assert not stats["uniform"]["chosen_wins"]
    assert stats["uniform"]["noise"] == pytest.approx(0.127, abs=1e-3)
    assert verdict(stats["prior"]).startswith("chosen wins by 0.2000, beyond the seed noise")


def test_compare_sees_a_consistent_gap_that_seed_spread_hides():
    # Seed luck moves every mixture by 0.2; the baseline is 0.03 worse on each seed.
    stats = compare([loss("chosen", 3.0 + 0.2 * s, seed=s) for s in range(3)]
                    + [loss("uniform", 3.03 + 0.2 * s + 0.001 * (s == 1), seed=s) for s in range(3)],
                    TARGET)
    assert stats["uniform"]["std"] > stats["uniform"]["margin"]
    assert stats["uniform"]["chosen_wins"] and stats["uniform"]["paired_seeds"] == 3
    assert stats["chosen"]["losses"] == pytest.approx({0: 3.0, 1: 3.2, 2: 3.4})


def test_compare_leaves_an_unpaired_margin_undecided():
    stats = compare([loss("chosen", 3.0000, seed=0), loss("uniform", 3.0001, seed=0),
                     loss("prior", 3.1, seed=1), loss("prior", 3.2, seed=2)], TARGET)
    assert stats["uniform"]["chosen_wins"] is None and stats["prior"]["chosen_wins"] is None
    assert verdict(stats["uniform"]).startswith("chosen ahead by 0.0001 with 1 shared seed")


def test_rank_check_spans_the_losses_and_measures_agreement(prepared_data):
    config = parse_config(tiny_config_dict(
        "x.yaml", regression={"target": "code"},
        rank_check={"mixtures": 3, "model": {"shape": "tiny-large"}, "train": {"tokens": 1024}}))
    proxies = [loss(f"m{i}", 3 + i, weights={"code": 1.0}) for i in range(7)]
    runs = plan_rank_check(config, prepared_data.meta, proxies)
    assert [r["name"] for r in runs] == ["m0", "m3", "m6"]
    larger = [loss("m0", 2.0), loss("m3", 2.5), loss("m6", 2.4)]
    check = rank_invariance(proxies, larger, TARGET)
    assert check["spearman"] == pytest.approx(0.5) and check["mixtures"] == 3


def test_a_larger_run_trains_on_the_configured_cpu_threads(prepared_data, tracking):
    # kfp.local trains two larger runs at once; torch's default thread per core stalls both
    config = parse_config(tiny_config_dict(
        "x.yaml", large={"model": {"shape": "tiny-large"}, "train": {"tokens": 1024},
                         "cpu_threads": 1}))
    weights = {"code": 0.5, "changelogs": 0.5, "licenses": 0.0}
    run = target_run("chosen", "large", weights, 0,
                     target_key(config, prepared_data.meta, "large"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train_target(str(prepared_data.root), run, config, tracking)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert result["name"] == "chosen" and result["val_loss"]["code"] > 0


def test_a_diverged_large_run_fails_its_task_naming_the_fix(prepared_data, tracking, monkeypatch):

    config = parse_config(tiny_config_dict(
        "x.yaml", large={"model": {"shape": "tiny-proxy"}, "train": {"tokens": 1024}}))
    run = target_run("uniform", "baseline", {"code": 0.5, "changelogs": 0.5, "licenses": 0.0}, 0,
                     target_key(config, prepared_data.meta, "large"))
    monkeypatch.setattr(regmix.train.proxy, "evaluate",
                        lambda model, data, precision: {d: float("nan") for d in data.domains})
    with pytest.raises(RuntimeError, match=r"baseline run uniform@seed0: diverged: .* lower "
                                           r"large\.train\.lr or large\.train\.grad_clip"):
        train_target(str(prepared_data.root), run, config, tracking)
