from pathlib import Path

import numpy as np
import pytest

from regmix.errors import DataError
from regmix.paper_data import read_proxy_csvs, resolve_target, write_predictions_csv

PAPER_DATA = Path(__file__).resolve().parents[3] / "shared" / "regmix-paper-data"
MIXTURES = "index,a,b,c\n1,0.5,0.5,0\n2,0.2,0.3,0.5\n3,1,0,0\n4,0,0,1\n5,0.1,0.1,0.8\n"
LOSSES = "index,loss_x,loss_y\n5,1.5,2.5\n4,1.4,2.4\n3,1.3,2.3\n2,1.2,2.2\n1,1.1,2.1\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def read(tmp_path: Path, mixtures: str = MIXTURES, losses: str | None = LOSSES):
    losses_path = None if losses is None else write(tmp_path, "losses.csv", losses)
    return read_proxy_csvs(write(tmp_path, "mixtures.csv", mixtures), losses_path)


def test_pairs_rows_by_index(tmp_path):
    table = read(tmp_path)
    assert table.domains == ["a", "b", "c"]
    assert table.targets == ["loss_x", "loss_y"]
    assert table.index.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(table.losses[:, 0], [1.1, 1.2, 1.3, 1.4, 1.5])
    np.testing.assert_allclose(table.weights.sum(axis=1), 1.0)


def test_mixtures_alone_need_no_losses(tmp_path):
    table = read(tmp_path, mixtures="index,a,b\n7,0.25,0.75\n", losses=None)
    assert table.targets == [] and table.losses.shape == (1, 0)


def test_rounded_rows_are_renormalised(tmp_path):
    table = read(tmp_path, MIXTURES.replace("1,0.5,0.5,0", "1,0.5,0.498,0"))
    np.testing.assert_allclose(table.weights.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize(
    ("mixtures", "losses", "expected"),
    [
        (MIXTURES.replace("index,", "id,"), LOSSES, "no 'index' column"),
        (MIXTURES.replace("\n2,", "\n1,"), LOSSES, "line 3: duplicate index 1"),
        (MIXTURES.replace("0.2,0.3", "nan,0.3"), LOSSES, "line 3, column 'a': 'nan' is not finite"),
        (MIXTURES.replace("0.2,0.3,0.5", "-0.2,0.7,0.5"), LOSSES, "column 'a': negative weight"),
        (MIXTURES.replace("0.2,0.3,0.5", "0.2,0.3,0.4"), LOSSES, "index 2: weights sum to 0.9,"),
        (MIXTURES, LOSSES.replace("\n5,", "\n6,"), "only in mixtures: [5], only in losses: [6]"),
        (MIXTURES.replace("0.2,0.3", "0.2,abc"), LOSSES, "column 'b': 'abc' is not a number"),
        (MIXTURES.replace("0.2,0.3", "0.2,"), LOSSES, "line 3, column 'b': the cell is empty"),
        (MIXTURES.replace("index,a,b,c", "index,a,b,c,"), LOSSES, "column 5 has no name"),
        (MIXTURES.replace("\n2,", "\n2.5,"), LOSSES, "line 3: index '2.5' is not an integer"),
        (MIXTURES.replace("\n2,", "\n1e30,"), LOSSES, "line 3: index '1e30' is too large"),
        (MIXTURES.replace("\n2,", f"\n{2**63},"), LOSSES, "is out of range"),
        (MIXTURES.split("\n4,")[0], "index,x\n1,1\n2,1\n3,1\n", "3 rows for 3 domains"),
        ("index,a,b\n", LOSSES, "no data rows"),
        (MIXTURES.replace("\n3,1,0,0", "\n3,1,0"), LOSSES, "line 4: 3 cells"),
        ("index,a\n1,1\n2,1\n3,1\n", LOSSES, "a mixture needs at least 2 domains"),
        ('{"index": 1, "a": "' + "x" * 200_000 + '"}\n', LOSSES, "not a CSV file"),
    ],
)
def test_malformed_csvs_name_the_problem(tmp_path, mixtures, losses, expected):
    with pytest.raises(DataError) as error:
        read(tmp_path, mixtures, losses)
    assert expected in str(error.value)
    assert ".csv" in str(error.value)  # the message names the file


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_proxy_csvs(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="a folder, not a CSV file"):
        read_proxy_csvs(tmp_path)


def test_resolve_target(tmp_path):
    table = read(tmp_path)
    name, columns, shares = resolve_target(table, "loss_y")
    assert name == "loss_y" and (columns @ shares).tolist() == table.losses[:, 1].tolist()
    name, columns, shares = resolve_target(table, {"loss_x": 3.0, "loss_y": 1.0})
    assert shares.tolist() == [0.75, 0.25]
    np.testing.assert_allclose(columns @ shares,
                               0.75 * table.losses[:, 0] + 0.25 * table.losses[:, 1])
    assert "loss_x" in name and "loss_y" in name
    with pytest.raises(DataError, match=r"unknown target column\(s\) \['loss_z'\]; available"):
        resolve_target(table, {"loss_z": 1.0})


def test_a_loss_cell_may_be_empty_where_no_target_reads_it(tmp_path):
    table = read(tmp_path, losses=LOSSES.replace("1.2,2.2", "1.2,"))
    assert resolve_target(table, "loss_x")[1][:, 0].tolist() == [1.1, 1.2, 1.3, 1.4, 1.5]
    with pytest.raises(DataError, match="losses.csv: the row with index 2 has no value in column "
                                        "'loss_y'"):
        resolve_target(table, {"loss_x": 1.0, "loss_y": 1.0})


def test_a_loss_column_no_target_reads_may_hold_anything(tmp_path):
    """A run-name column, or a metric a failed run left as 'nan', beside the targets."""
    losses = "index,run,loss_x,loss_y\n" + "".join(
        f"{i},run-{i},1.{i},{'nan' if i == 3 else f'2.{i}'}\n" for i in range(1, 6))
    table = read(tmp_path, losses=losses)
    assert resolve_target(table, "loss_x")[1][:, 0].tolist() == [1.1, 1.2, 1.3, 1.4, 1.5]
    with pytest.raises(DataError, match="losses.csv, line 2, column 'run': 'run-1' is not a number"):
        resolve_target(table, "run")
    with pytest.raises(DataError, match="line 4, column 'loss_y': 'nan' is not finite"):
        resolve_target(table, {"loss_x": 1.0, "loss_y": 1.0})


def test_an_index_is_read_exactly(tmp_path):
    big = 2**53 + 1  # a float would read it as 2**53
    table = read(tmp_path, MIXTURES.replace("\n1,", f"\n{big},").replace("\n2,", f"\n{big - 1},"),
                 losses=None)
    assert table.index.tolist()[:2] == [big, big - 1]


def test_a_model_checks_its_domain_columns_before_the_row_sums(tmp_path):
    mixtures = write(tmp_path, "m.csv", "index,a,b\n1,0.5,0.4\n")
    with pytest.raises(DataError, match=r"missing \['c'\], not in the model \[\]"):
        read_proxy_csvs(mixtures, domains=["a", "b", "c"])


def test_predictions_round_trip(tmp_path):
    predictions = np.array([[1.0, 2.0], [3.0, 4.0 / 3.0], [0.1, 1e-17]])
    path = tmp_path / "predictions.csv"
    write_predictions_csv(path, np.array([10, 20, 30]), ["p", "q"], predictions)
    mixtures = write(tmp_path, "m.csv", "index,a,b\n10,1,0\n20,0,1\n30,0.5,0.5\n")
    table = read_proxy_csvs(mixtures, path)
    np.testing.assert_array_equal(table.losses, predictions)
    assert b"\r" not in path.read_bytes()  # plain newlines, like the paper's files


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared paper data not present")
def test_reads_the_paper_data():
    table = read_proxy_csvs(
        PAPER_DATA / "train_mixture_1m.csv", PAPER_DATA / "train_pile_loss_1m.csv"
    )
    assert table.weights.shape == (512, 17) and table.losses.shape == (512, 13)
    assert "metric/the_pile_pile_cc_val_loss" in table.targets
