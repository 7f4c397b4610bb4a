import numpy as np
import pytest

from regmix.config.loading import parse_config
from regmix.errors import ConfigError
from regmix.mixtures import (
    capped,
    dirichlet_around,
    epoch_caps,
    mixture_hash,
    proxy_key,
    run_sample_mixtures,
    sample_mixtures,
    token_prior,
)
from tests.conftest import tiny_config_dict


def test_prior_is_tempered_token_share():
    prior = token_prior(np.array([100, 400]), 0.5)
    assert np.allclose(prior, [1 / 3, 2 / 3])


def test_sampler_honours_simplex_minimum_caps_and_seed():
    prior = token_prior(np.array([1000, 3000, 500, 8000]), 0.5)
    caps = np.array([0.3, 1.0, 0.2, 1.0])
    draw = sample_mixtures(prior, 64, caps, np.random.default_rng(0), min_weight=0.01)
    assert draw.shape == (64, 4)
    assert np.allclose(draw.sum(1), 1)
    assert (draw <= caps + 1e-12).all()
    assert ((draw == 0) | (draw >= 0.01)).all()
    assert len({tuple(np.round(r, 4)) for r in draw}) == 64
    again = sample_mixtures(prior, 64, caps, np.random.default_rng(0), min_weight=0.01)
    assert np.array_equal(draw, again)


def test_more_mixtures_extend_the_same_sequence():
    prior = token_prior(np.array([1000, 3000, 500, 8000]), 0.5)
    caps = np.ones(4)
    first = sample_mixtures(prior, 40, caps, np.random.default_rng(7))
    more = sample_mixtures(prior, 48, caps, np.random.default_rng(7))
    assert np.array_equal(more[:40], first)


def test_draws_centre_on_the_prior_itself():
    # The prior arrives tempered (token_prior): the draw must not temper it again.
    prior = np.array([0.6, 0.3, 0.1])
    draws = dirichlet_around(prior, 20_000, np.random.default_rng(0), (0.1, 5.0))
    assert (draws >= 0).all()
    np.testing.assert_allclose(draws.sum(axis=1), 1.0)
    np.testing.assert_allclose(draws.mean(axis=0), prior, atol=0.02)


def test_sampler_explains_impossible_caps():
    with pytest.raises(ValueError, match="raise mixtures.max_epochs"):
        sample_mixtures(np.array([0.5, 0.5]), 4, np.array([0.1, 0.1]), np.random.default_rng(0),
                        max_blocks=5)


def test_sampler_names_a_min_weight_no_mixture_passes():
    # A weight over 0.7 leaves the only domain with all of it, above its cap of 0.6; and no
    # division by zero on the way.
    with np.errstate(all="raise"), pytest.raises(ValueError, match="lower mixtures.min_weight"):
        sample_mixtures(np.full(4, 0.25), 4, np.full(4, 0.6), np.random.default_rng(0),
                        min_weight=0.7, max_blocks=5)


def test_capping_shares_the_excess_in_proportion_and_keeps_zeros():
    caps = np.array([0.3, 1.0, 1.0, 0.25])
    rows = capped(np.array([[0.6, 0.3, 0.1, 0.0], [0.2, 0.2, 0.2, 0.4], [0.5, 0.0, 0.0, 0.5]]), caps)
    np.testing.assert_allclose(rows[0], [0.3, 0.525, 0.175, 0.0])  # 0.3 over, shared 3:1
    np.testing.assert_allclose(rows[1], [0.25, 0.25, 0.25, 0.25])  # 0.15 over, shared 1:1:1
    assert np.isnan(rows[2]).all()  # only capped domains hold weight: no room
    # The prior proxy's mixture (the caps that once rescaled it past them again)
    prior, caps = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.32, 1.0])
    np.testing.assert_allclose(capped(prior, caps)[0], [0.4, 0.32, 0.28])


def test_epoch_caps():
    caps = epoch_caps(np.array([100, 10_000]), token_budget=1000, max_epochs=2)
    assert caps.tolist() == [0.2, 1.0]


def test_hash_changes_with_what_determines_the_result():
    base = dict(weights={"a": 0.5, "b": 0.5}, fingerprint="f", shape={"n": 1}, recipe={"t": 1},
                seed=0)
    h = mixture_hash(**base)
    assert h == mixture_hash(**{**base, "weights": {"b": 0.5, "a": 0.5}})
    for change in ({"seed": 1}, {"fingerprint": "g"}, {"recipe": {"t": 2}},
                   {"weights": {"a": 0.6, "b": 0.4}}):
        assert mixture_hash(**{**base, **change}) != h


def test_settings_that_change_how_not_what_a_proxy_trains_keep_its_hash():
    def key(**train):
        base = {"tokens": 8192, "batch_size": 8, "lr": 0.01}
        config = parse_config(tiny_config_dict("unused.yaml", proxy={"train": {**base, **train}}))
        return proxy_key(config, {"fingerprint": "f"})

    assert key() == key(micro_batch_size=2, log_every=1, checkpoint_every=5)
    for change in ({"lr": 0.02}, {"mixed_precision": "no"}, {"compile": True}):
        assert key(**change) != key()


def test_the_stage_plans_chunked_tasks(prepared_data, tracking):
    config = tiny_config_dict("unused.yaml", mixtures={"count": 10, "max_epochs": 50})
    tasks = run_sample_mixtures(parse_config(config), prepared_data.meta, tracking)
    assert [len(t["mixtures"]) for t in tasks] == [4, 4, 2]
    mixtures = [m for t in tasks for m in t["mixtures"]]
    assert mixtures[0]["id"] == "m0000"  # the prior comes first
    cfg = parse_config(config)
    prior = token_prior(prepared_data.train_tokens(), cfg.mixtures.temperature)
    assert np.allclose(list(mixtures[0]["weights"].values()), prior)
    for m in mixtures:
        assert set(m["weights"]) == set(prepared_data.domains)
        assert abs(sum(m["weights"].values()) - 1) < 1e-9


@pytest.mark.parametrize(("overrides", "message"), [
    ({"regression": {"target": "wikipdia"}}, r"regression.target: unknown domain\(s\) \['wikipdia'\]"),
    # A hundredth of an epoch of every domain is far below the large run's 16k-token budget
    ({"search": {"max_epochs": 0.01}}, "search: maximum weights .* < 1: no mixture fits; raise max_epochs"),
    # The search stays where proxies trained: bounds outside fail before the proxies train
    ({"search": {"min_weight": {"licenses": 0.97}, "allow_extrapolation": False}},
     "search: domain 'licenses': the constraints ask for at least 0.97, but no proxy was trained above"),
])
def test_the_stage_checks_the_config_against_the_prepared_corpus(prepared_data, tracking,
                                                                 overrides, message):
    config = tiny_config_dict("unused.yaml", **overrides)
    with pytest.raises(ConfigError, match=message):
        run_sample_mixtures(parse_config(config), prepared_data.meta, tracking)
