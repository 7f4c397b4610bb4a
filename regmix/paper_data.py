"""CSV interchange in the RegMix paper's format: mixtures and losses files paired by `index`.

The mixtures file has an `index` column and one column per domain (weights >= 0, rows summing to
1); the losses file has an `index` column and one column per target (e.g. a validation loss).
Every malformed input raises `DataError` naming the file, the line or column, and the fix.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from regmix.errors import DataError
from regmix.files import replacing
from regmix.regression.saved import ROW_SUM_TOLERANCE

INDEX_COLUMN = "index"
# Larger cells are no loss or weight (a loss of 1e308 overflows every squared error, and a fit
# on it is nan): refused, as a cell that is not finite is.
MAX_ABS_VALUE = 1e6


@dataclass
class ProxyTable:
    """Mixtures and (optionally) the losses measured on them, paired row by row."""

    index: np.ndarray  # (n,) int
    domains: list[str]  # mixture columns
    weights: np.ndarray  # (n, d) float, rows sum to 1
    targets: list[str]  # loss columns; empty when no losses file was read
    losses: np.ndarray  # (n, t); NaN where a cell is empty or not a number
    losses_path: Path | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # loss column -> its first bad cell


@dataclass
class _Csv:
    """One numeric CSV: its `index` column and the other columns as a float matrix."""

    path: Path
    index: np.ndarray
    columns: list[str]
    values: np.ndarray
    unreadable: dict[str, str] = field(default_factory=dict)  # column -> why a cell is not a value


def _parse_index(path: Path, line: int, cell: str) -> int:
    """An `index` cell as an exact integer (as a float, 2**53 + 1 would become 2**53)."""
    try:
        value = int(cell)
    except ValueError:
        try:  # "3.0", as spreadsheets write whole numbers
            number = float(cell)
        except ValueError:
            number = math.nan
        if not number.is_integer():
            raise DataError(f"{path}, line {line}: index '{cell}' is not an integer") from None
        if abs(number) >= 2**53:  # past 2**53 a float no longer holds every integer
            raise DataError(f"{path}, line {line}: index '{cell}' is too large to read exactly "
                            "as a decimal; write it as an integer (no '.', no exponent)") from None
        value = int(number)
    if not -(2**63) <= value < 2**63:
        raise DataError(f"{path}, line {line}: index {cell} is out of range; use integers "
                        f"below 2**63")
    return value


def _read_numeric_csv(path: Path, missing_ok: bool = False) -> _Csv:
    """`missing_ok`: cells outside the index that are empty or not finite numbers read as NaN,
    for columns the caller may not use (a losses file's unused targets, or a run-name column);
    `_Csv.unreadable` keeps the first such non-empty cell's complaint per column. Otherwise any
    such cell is an error."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a CSV file; give the file's path")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:  # utf-8-sig: spreadsheet programs start their "CSV UTF-8" files with a byte-order mark
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 CSV") from None
    except csv.Error as e:  # e.g. a JSON file given by mistake: one huge "field"
        raise DataError(f"{path}: not a CSV file ({e}); give a comma-separated file with an "
                        f"'{INDEX_COLUMN}' column") from None
    if not rows:
        raise DataError(f"{path}: the file is empty; expected a header line with '{INDEX_COLUMN}'")
    header = [name.strip() for name in rows[0]]
    if INDEX_COLUMN not in header:
        if len(header) == 1 and (separator := next((c for c in ";\t|" if c in header[0]), None)):
            raise DataError(f"{path}, line 1: the header is one column separated by "
                            f"{separator!r}; save the file with commas between columns")
        raise DataError(
            f"{path}, line 1: no '{INDEX_COLUMN}' column in the header {header}; "
            f"add an '{INDEX_COLUMN}' column that pairs mixtures with losses"
        )
    if "" in header:
        raise DataError(f"{path}, line 1: column {header.index('') + 1} has no name (a trailing "
                        "comma?); name it or remove it")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}, line 1: duplicate column names {duplicated}; rename them")
    numbered = enumerate(rows[1:], start=2)
    body = [(line, row) for line, row in numbered if any(cell.strip() for cell in row)]
    if not body:
        raise DataError(f"{path}: no data rows below the header")
    index_at = header.index(INDEX_COLUMN)
    index = np.empty(len(body), dtype=np.int64)
    values = np.empty((len(body), len(header)))
    unreadable: dict[str, str] = {}
    for i, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise DataError(
                f"{path}, line {line}: {len(row)} cells but the header has {len(header)} columns"
            )
        index[i] = _parse_index(path, line, row[index_at].strip())
        for j, cell in enumerate(row):
            if j == index_at:
                continue
            if not cell.strip():
                if missing_ok:
                    values[i, j] = math.nan
                    continue
                raise DataError(f"{path}, line {line}, column '{header[j]}': the cell is empty; "
                                "fill it in or drop the row")
            try:
                values[i, j] = float(cell)
                problem = ""
                if not np.isfinite(values[i, j]):
                    problem = "is not finite; drop the row or re-measure it"
                elif abs(values[i, j]) > MAX_ABS_VALUE:
                    problem = (f"is beyond ±{MAX_ABS_VALUE:g}, not a loss or weight (an "
                               "overflow?); drop the row or re-measure it")
            except ValueError:
                problem = "is not a number"
            if problem:
                complaint = f"{path}, line {line}, column '{header[j]}': '{cell}' {problem}"
                if not missing_ok:
                    raise DataError(complaint)
                values[i, j] = math.nan
                unreadable.setdefault(header[j], complaint)
    seen: dict[int, int] = {}
    for (line, _), value in zip(body, index.tolist(), strict=True):
        if value in seen:
            raise DataError(
                f"{path}, line {line}: duplicate index {value} (first on line {seen[value]}); "
                "every row needs its own index"
            )
        seen[value] = line
    columns = [name for name in header if name != INDEX_COLUMN]
    return _Csv(path, index, columns, np.delete(values, index_at, axis=1), unreadable)


def _check_mixtures(mixtures: _Csv) -> np.ndarray:
    """Return the weights with rows renormalised, after checking they are a mixture."""
    path, weights = mixtures.path, mixtures.values
    if not mixtures.columns:
        raise DataError(f"{path}: no domain columns beside '{INDEX_COLUMN}'")
    negative_row, negative_col = np.nonzero(weights < 0)
    if negative_row.size:
        i, j = negative_row[0], negative_col[0]
        raise DataError(
            f"{path}, index {mixtures.index[i]}, column '{mixtures.columns[j]}': "
            f"negative weight {weights[i, j]}; weights must be >= 0"
        )
    sums = weights.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE)
    if off.size:
        i = off[0]
        if np.abs(sums - 100.0).max() <= 100 * ROW_SUM_TOLERANCE:  # every row: percentages
            hint = " (percentages? divide every weight by 100)"
        else:
            hint = " (is this the losses file? check --mixtures and --losses)" if sums[i] > 2 else ""
        raise DataError(
            f"{path}, index {mixtures.index[i]}: weights sum to {sums[i]:.6g}, not 1{hint} "
            f"(tolerance {ROW_SUM_TOLERANCE}); {off.size} row(s) are off. Normalise each row, "
            "or check for a missing domain column"
        )
    if len(mixtures.columns) < 2:  # every row is 1.0: nothing to mix, nothing to learn
        raise DataError(f"{path}: one domain column ({mixtures.columns[0]!r}) beside "
                        f"'{INDEX_COLUMN}'; a mixture needs at least 2 domains")
    return weights / sums[:, None]


def _pair(mixtures: _Csv, losses: _Csv) -> np.ndarray:
    """Return the losses reordered to the mixtures' rows, after checking the indices match."""
    only_mixtures = sorted(set(mixtures.index.tolist()) - set(losses.index.tolist()))
    only_losses = sorted(set(losses.index.tolist()) - set(mixtures.index.tolist()))
    if only_mixtures or only_losses:
        raise DataError(
            f"{mixtures.path} and {losses.path}: the '{INDEX_COLUMN}' columns differ; "
            f"only in mixtures: {only_mixtures[:10]}, only in losses: {only_losses[:10]}. "
            "Each mixture needs exactly one losses row with the same index"
        )
    row_of = {value: row for row, value in enumerate(losses.index.tolist())}
    return losses.values[[row_of[value] for value in mixtures.index.tolist()]]


def read_proxy_csvs(mixtures_csv: Path, losses_csv: Path | None = None,
                    domains: list[str] | None = None) -> ProxyTable:
    """Read a mixtures CSV and, for fitting, the losses CSV measured on those mixtures.

    With `domains` (what a model was fitted on), the mixtures must have exactly those columns,
    in any order; that is checked first, as a missing column would otherwise show up as rows
    that do not sum to 1. Loss cells may be empty: only the columns a target uses must be
    complete (`resolve_target` checks them)."""
    mixtures = _read_numeric_csv(mixtures_csv)
    if domains is not None and sorted(mixtures.columns) != sorted(domains):
        missing = sorted(set(domains) - set(mixtures.columns))
        extra = sorted(set(mixtures.columns) - set(domains))
        raise DataError(f"{mixtures.path}: the domain columns differ from the model's; missing "
                        f"{missing}, not in the model {extra}. Give the columns {domains}")
    weights = _check_mixtures(mixtures)
    if losses_csv is None:
        no_losses = np.empty((len(weights), 0))
        return ProxyTable(mixtures.index, mixtures.columns, weights, [], no_losses)
    losses = _read_numeric_csv(losses_csv, missing_ok=True)
    if not losses.columns:
        raise DataError(f"{losses.path}: no loss columns beside '{INDEX_COLUMN}'")
    paired = _pair(mixtures, losses)
    # A regression over d domains needs more rows than domains to say anything about each.
    if len(weights) <= len(mixtures.columns):
        raise DataError(
            f"{mixtures.path}: {len(weights)} rows for {len(mixtures.columns)} domains; "
            f"fitting needs at least {len(mixtures.columns) + 1} measured mixtures"
        )
    return ProxyTable(mixtures.index, mixtures.columns, weights, losses.columns, paired,
                      losses.path, losses.unreadable)


def target_name(spec: str | dict[str, float]) -> str:
    """A target's name: its column, or `weighted_mean(column:share,...)` with the columns sorted
    and the shares summing to 1, so that `a=1,b=1` and `b=0.5,a=0.5` name one target."""
    if isinstance(spec, str):
        return spec
    total = sum(spec.values())
    if total <= 0:
        raise DataError(f"target weights {spec} must be >= 0 and not all zero")
    return "weighted_mean(" + ",".join(f"{n}:{spec[n] / total:g}" for n in sorted(spec)) + ")"


def resolve_target(
    table: ProxyTable, spec: str | dict[str, float]
) -> tuple[str, np.ndarray, np.ndarray]:
    """Return (name, loss columns, shares) of a target, its values being columns @ shares: one
    loss column, or a weighted mean of several."""
    weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    if not weights:
        raise DataError("empty target spec; name a loss column or give {column: weight}")
    unknown = [name for name in weights if name not in table.targets]
    if unknown:
        raise DataError(f"unknown target column(s) {unknown}; available: {table.targets}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise DataError(f"target weights {weights} must be >= 0 and not all zero")
    bad = [table.unreadable[name] for name in weights if name in table.unreadable]
    if bad:
        raise DataError(bad[0])
    columns = table.losses[:, [table.targets.index(n) for n in weights]]
    missing_row, missing_column = np.nonzero(np.isnan(columns))
    if missing_row.size:
        raise DataError(f"{table.losses_path}: the row with index {table.index[missing_row[0]]} has no "
                        f"value in column '{list(weights)[missing_column[0]]}' "
                        f"({missing_row.size} empty cell(s) in the target's columns); fill them "
                        "in or drop those rows from both files")
    shares = np.array(list(weights.values()), dtype=float)
    if isinstance(spec, str):
        return spec, columns, shares
    return target_name(spec), columns, shares / shares.sum()


def write_predictions_csv(
    path: Path, index: np.ndarray, names: list[str], predictions: np.ndarray,
    labels: dict[str, list[str]] | None = None,
) -> None:
    """Write predictions in the losses-file format: `index`, the `labels` columns (text, such
    as a run's name: fitting skips them), then one column per name."""
    predictions = np.asarray(predictions, dtype=float).reshape(len(index), -1)
    if predictions.shape[1] != len(names):
        raise ValueError(f"{len(names)} names for {predictions.shape[1]} prediction columns")
    labels = labels or {}
    with replacing(path) as partial, partial.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([INDEX_COLUMN, *labels, *names])
        label_rows = list(zip(*labels.values(), strict=True)) if labels else [()] * len(predictions)
        for value, label, row in zip(np.asarray(index).tolist(), label_rows,
                                     predictions.tolist(), strict=True):
            writer.writerow([value, *label, *(repr(x) for x in row)])
