"""Property-based tests: the config and CSV parsers either accept an input or reject it with
their own user-facing error, whatever the input; valid inputs round-trip."""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regmix.config.loading import parse_config
from regmix.errors import ConfigError, DataError
from regmix.paper_data import read_proxy_csvs
from tests.conftest import tiny_config_dict

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
paths = st.lists(st.sampled_from(["proxy", "train", "model", "shape", "tokens", "lr", "gate",
                                  "mixtures", "count", "search", "fixed", "seed", "regression",
                                  "target", "corpus", "spec", "large", "name", "x"]),
                 min_size=1, max_size=3)


@SETTINGS
@given(path=paths, value=values)
def test_config_parser_accepts_or_explains(path, value):
    config = tiny_config_dict("corpus.yaml")
    node = config
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value
    try:
        parsed = parse_config(config)
    except ConfigError as e:
        assert str(e).startswith("config:") and "Traceback" not in str(e)
    else:
        assert parsed.mixtures.count >= 2


cells = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.integers(-5, 5).map(str), st.text(alphabet="0123456789.,-eaxn \"", max_size=6))


@SETTINGS
@given(header=st.lists(st.sampled_from(["index", "a", "b", "c", ""]), min_size=1, max_size=4),
       rows=st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6))
def test_csv_parser_accepts_or_explains(header, rows):
    text = "\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.csv"
        path.write_text(text)
        try:
            table = read_proxy_csvs(path)
        except DataError as e:
            assert str(e).startswith(str(path)) or "m.csv" in str(e)
        else:
            assert np.isfinite(table.weights).all() and (table.weights >= 0).all()
            assert np.allclose(table.weights.sum(1), 1)


@SETTINGS
@given(weights=st.lists(st.lists(st.floats(0.001, 10), min_size=3, max_size=3), min_size=5,
                        max_size=12, unique_by=lambda row: tuple(row)))
def test_valid_csvs_round_trip(weights):
    matrix = np.array(weights) / np.array(weights).sum(1, keepdims=True)
    losses = matrix @ np.array([1.0, 2.0, 3.0])
    with tempfile.TemporaryDirectory() as tmp:
        m, l_ = Path(tmp) / "m.csv", Path(tmp) / "l.csv"
        order = np.arange(len(matrix))[::-1]  # losses rows in another order: paired by index
        m.write_text("index,a,b,c\n" + "".join(
            f"{i},{','.join(repr(float(v)) for v in row)}\n" for i, row in enumerate(matrix)))
        l_.write_text("index,loss\n" + "".join(f"{i},{float(losses[i])!r}\n" for i in order))
        table = read_proxy_csvs(m, l_)
    assert np.allclose(table.weights, matrix)
    assert np.allclose(table.losses[:, 0], losses)
