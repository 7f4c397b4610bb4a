import pytest
import torch

from components.config import parse_config
from components.large import (
    compare,
    plan_large_runs,
    plan_rank_check,
    rank_invariance,
    target_key,
    target_run,
    train_target,
    verdict,
)
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
    runs = plan_large_runs(config, prepared_data.meta, chosen, chosen, {"t": 1})
    assert [r["id"] for r in runs] == [f"{n}@seed{s}" for n in ("chosen", "prior", "uniform",
                                                                 "mine") for s in (0, 1)]
    assert [r["role"] for r in runs][:3] == ["large", "large", "baseline"]
    prior = runs[2]["weights"]
    tokens = prepared_data.train_tokens()
    assert prior["code"] == pytest.approx(tokens[0] / tokens.sum())
    assert len({r["hash"] for r in runs}) == len(runs)


def test_compare_judges_wins_against_the_seed_spread():
    stats = compare([loss("chosen", 3.00), loss("chosen", 3.02), loss("prior", 3.20),
                     loss("prior", 3.22), loss("uniform", 3.01), loss("uniform", 3.05)], TARGET)
    assert stats["prior"]["chosen_wins"] and stats["prior"]["margin"] == pytest.approx(0.2)
    assert not stats["uniform"]["chosen_wins"]  # 0.02 apart, inside a 0.028 spread
    assert verdict(stats["prior"]) == "chosen wins by 0.2000, beyond the seed spread"


def test_compare_leaves_a_one_seed_margin_undecided():
    stats = compare([loss("chosen", 3.0000), loss("uniform", 3.0001)], TARGET)
    assert stats["uniform"]["chosen_wins"] is None
    assert verdict(stats["uniform"]).startswith("chosen ahead by 0.0001 on one seed each")


def test_rank_check_spans_the_losses_and_measures_agreement(prepared_data):
    config = parse_config(tiny_config_dict(
        "x.yaml", regression={"target": "code"},
        rank_check={"mixtures": 3, "model": {"shape": "tiny-large"}, "train": {"tokens": 1024}}))
    proxies = [loss(f"m{i}", 3 + i, weights={"code": 1.0}) for i in range(7)]
    runs = plan_rank_check(config, prepared_data.meta, proxies, {"t": 1})
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
                     target_key(config, prepared_data.meta, "large"), tracking)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train_target(str(prepared_data.root), run, config)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert result["name"] == "chosen" and result["val_loss"]["code"] > 0
