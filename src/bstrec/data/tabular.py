"""Any behaviour log in CSV or Parquet, mapped onto the canonical schema by column names.

The mapping names, for each canonical column, the source column that holds it::

    ColumnMapping(user_id="uid", item_id="iid", timestamp="ts", action="event")
    ColumnMapping.parse(["user_id=uid", "item_id=iid", "timestamp=ts"])   # the CLI form

Conversions: ids become Int64 when every value is an integer, else String; timestamps are unix
seconds (integers; Parquet floats are floored) or, with ``timestamp_format`` (strptime syntax)
or a datetime column, dates converted to seconds (a date without a zone is taken as UTC).
A row is bad when a mapped id, timestamp or action is empty or does not parse, or a value is not
a number. CSV without a header names its columns ``column_1``, ``column_2``, ...

CSV line numbers in errors are exact for files without quotes (read by :mod:`bstrec.data.reader`).
Files with a ``"`` go through Polars' quote-aware CSV parser; there a record is assumed to be one
line. Parquet errors name the 1-based row.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import polars as pl

from bstrec.data.reader import (
    LINE,
    Table,
    check_rows,
    decode,
    read_bytes,
    read_delimited,
    record_skips,
)
from bstrec.data.schema import (
    EVENT_SCHEMA,
    DataFormatError,
    Dataset,
    Feedback,
    items_from_events,
    normalize_events,
    users_from_events,
)

log = logging.getLogger(__name__)

Format = Literal["csv", "parquet"]
REQUIRED = ("user_id", "item_id", "timestamp")


@dataclass(frozen=True)
class ColumnMapping:
    """Source column name for each canonical column; None = not in the source."""

    user_id: str
    item_id: str
    timestamp: str
    action: str | None = None
    value: str | None = None
    event_id: str | None = None
    category: str | None = None

    @classmethod
    def parse(cls, pairs: list[str]) -> ColumnMapping:
        """Build from ``["user_id=uid", "item_id=iid", ...]`` (a pair may also hold several
        space-separated ``key=column`` items). Unknown or repeated keys are errors."""
        known = [f.name for f in fields(cls)]
        found: dict[str, str] = {}
        for item in (p for pair in pairs for p in pair.split()):
            key, sep, column = item.partition("=")
            key, column = key.strip(), column.strip()
            if not sep or not key or not column:
                raise ValueError(f"column mapping {item!r}: expected KEY=COLUMN, "
                                 f"e.g. user_id=uid")
            if key not in known:
                raise ValueError(f"column mapping: unknown key {key!r}; "
                                 f"known keys: {', '.join(known)}")
            if key in found:
                raise ValueError(f"column mapping: {key!r} given twice")
            found[key] = column
        missing = [k for k in REQUIRED if k not in found]
        if missing:
            raise ValueError(f"column mapping: missing {', '.join(missing)} "
                             f"(required: {', '.join(REQUIRED)})")
        return cls(**found)

    def mapped(self) -> dict[str, str]:
        """``{canonical: source}`` for the columns that are mapped."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


def _format_of(path: Path) -> Format:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in (".csv", ".tsv", ".txt"):
        return "csv"
    if suffixes and suffixes[-1] in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"{path}: cannot tell the format from the name; pass fmt='csv' or "
                     "fmt='parquet'")


def _read_csv(path: Path, separator: str, has_header: bool, strict: bool) -> Table:
    raw = read_bytes(path)
    if b'"' not in raw:
        return read_delimited(path, None, separator=separator, has_header=has_header,
                              strict=strict, data=raw)
    if len(separator.encode()) != 1:
        raise DataFormatError(path, f"quoted fields with the multi-byte separator {separator!r} "
                              "are not supported")
    data, bad = decode(path, raw, "utf-8", strict)
    if not data.strip():
        raise DataFormatError(path, "empty file")
    try:
        frame = pl.read_csv(io.BytesIO(data), separator=separator, has_header=has_header,
                            infer_schema=False, quote_char='"')
    except pl.exceptions.PolarsError as err:
        raise DataFormatError(path, f"cannot parse CSV: {err}") from err
    # A record = a line (blank lines come through as all-null rows), so the line number is the
    # record number plus the header line.
    frame = frame.with_row_index(LINE, offset=2 if has_header else 1)
    table = Table(path, frame, header=tuple(frame.columns[1:]))
    if bad:
        problem = pl.col(LINE).replace_strict(list(bad), list(bad.values()), default=None,
                                              return_dtype=pl.String)
        table = check_rows(table, [(problem.is_not_null(), problem)], strict=False)
    blank = pl.all_horizontal(pl.exclude(LINE).is_null())
    table.frame = table.frame.filter(~blank)
    if table.frame.is_empty():
        raise DataFormatError(path, "no data rows")
    return table


def _read_parquet(path: Path) -> Table:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataFormatError(path, f"cannot read Parquet: {err}") from err
    if frame.is_empty():
        raise DataFormatError(path, "no rows")
    return Table(path, frame.with_row_index(LINE, offset=1), unit="row",
                 header=tuple(frame.columns))


def _is_text(dtype: pl.DataType) -> bool:
    return dtype == pl.String or dtype == pl.Categorical or dtype == pl.Enum


def _text(col: str, dtype: pl.DataType) -> pl.Expr:
    """The column as stripped String, empty -> null."""
    s = pl.col(col).cast(pl.String)
    if _is_text(dtype):
        s = s.str.strip_chars()
        s = pl.when(s == "").then(None).otherwise(s)
    return s


def _empty_check(canon: str, col: str, dtype: pl.DataType) -> tuple[pl.Expr, pl.Expr]:
    return _text(col, dtype).is_null(), pl.lit(f"column '{col}' ({canon}) is empty")


def _bad_value(col: str, what: str) -> pl.Expr:
    return pl.concat_str(pl.lit(f"column '{col}': '"), pl.col(col).cast(pl.String),
                         pl.lit(f"' is not {what}"))


def _timestamp(col: str, dtype: pl.DataType,
               timestamp_format: str | None) -> tuple[pl.Expr, list[tuple[pl.Expr, pl.Expr]]]:
    """Expression giving unix seconds, and the checks that make a row bad."""
    checks = [_empty_check("timestamp", col, dtype)]
    present = _text(col, dtype).is_not_null()
    if isinstance(dtype, pl.Datetime):
        return pl.col(col).dt.epoch("s"), checks
    if dtype == pl.Date:
        return pl.col(col).cast(pl.Datetime("us")).dt.epoch("s"), checks
    if dtype.is_integer():
        return pl.col(col).cast(pl.Int64), checks
    if dtype.is_float():
        return pl.col(col).floor().cast(pl.Int64, strict=False), checks
    if timestamp_format is not None:
        parsed = _text(col, dtype).str.strptime(pl.Datetime("us"), timestamp_format, strict=False)
        checks.append((present & parsed.is_null(),
                       _bad_value(col, f"a date in the format '{timestamp_format}'")))
        return parsed.dt.epoch("s"), checks
    seconds = _text(col, dtype).cast(pl.Int64, strict=False)
    checks.append((present & seconds.is_null(),
                   _bad_value(col, "an integer unix timestamp (for dates pass a "
                                   "timestamp format)")))
    return seconds, checks


def _id(frame: pl.DataFrame, col: str) -> pl.Expr:
    """Int64 when every value is an integer, else String (decided on the good rows)."""
    dtype = frame.schema[col]
    if dtype.is_integer():
        return pl.col(col).cast(pl.Int64)
    text = _text(col, dtype)
    if dtype.is_float() or not _is_text(dtype):
        return text
    as_int = frame.select(text.cast(pl.Int64, strict=False).is_null().any()).item()
    return text if as_int else text.cast(pl.Int64)


def load_table(
    path: Path,
    mapping: ColumnMapping,
    *,
    fmt: Format | None = None,
    separator: str = ",",
    has_header: bool = True,
    strict: bool = True,
    feedback: Feedback = "implicit",
    timestamp_format: str | None = None,
) -> Dataset:
    """Load a CSV (``.gz`` too) or Parquet behaviour log through ``mapping``."""
    path = Path(path)
    fmt = fmt or _format_of(path)
    if fmt == "csv":
        table = _read_csv(path, separator, has_header, strict)
    elif fmt == "parquet":
        table = _read_parquet(path)
    else:
        raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    mapped = mapping.mapped()
    available = [c for c in table.frame.columns if c != LINE]
    missing = [f"{src!r} (for {canon})" for canon, src in mapped.items() if src not in available]
    if missing:
        raise DataFormatError(path, f"no column {', '.join(missing)}; the columns are: "
                              f"{', '.join(available)}")
    schema = table.frame.schema

    checks = [_empty_check(c, mapped[c], schema[mapped[c]]) for c in ("user_id", "item_id")]
    ts_expr, ts_checks = _timestamp(mapped["timestamp"], schema[mapped["timestamp"]],
                                    timestamp_format)
    checks += ts_checks
    if mapping.action is not None:
        checks.append(_empty_check("action", mapping.action, schema[mapping.action]))
    if mapping.value is not None:
        value = _text(mapping.value, schema[mapping.value]).cast(pl.Float64, strict=False)
        present = _text(mapping.value, schema[mapping.value]).is_not_null()
        checks.append((present & value.is_null(), _bad_value(mapping.value, "a number")))
    table = check_rows(table, checks, strict=strict)

    frame = table.frame
    cols = [_id(frame, mapping.user_id).alias("user_id"),
            _id(frame, mapping.item_id).alias("item_id"), ts_expr.alias("timestamp")]
    for canon in ("action", "value", "event_id", "category"):
        src = mapped.get(canon)
        if src is not None:
            expr = _text(src, schema[src])
            cols.append((expr.cast(pl.Float64) if canon == "value" else expr).alias(canon))
    frame = frame.select(cols)
    events = normalize_events(frame.drop("category", strict=False))
    median = events["timestamp"].median()
    if isinstance(median, int | float) and median > 1e11:
        log.warning("%s: timestamps look like milliseconds (median %s); bstrec expects seconds",
                    path, median)
    items = items_from_events(events)
    if mapping.category is not None:
        known = items_from_events(frame.filter(pl.col("category").is_not_null()), "category")
        items = items.drop("category").join(known, on="item_id", how="left",
                                            maintain_order="left")
    meta: dict[str, object] = {"source_file": path.name, "mapping": mapped}
    record_skips(meta, (table,), strict=strict)
    name = path.name.split(".")[0] or path.name
    return Dataset(name=name, events=events, items=items, users=users_from_events(events),
                   feedback=feedback, meta=meta)


def scan_table(
    path: Path,
    mapping: ColumnMapping,
    *,
    fmt: Format | None = None,
    separator: str = ",",
    has_header: bool = True,
    strict: bool = True,
    feedback: Feedback = "implicit",
    timestamp_format: str | None = None,
) -> ScannedLog:
    """``load_table`` without loading the log: the same events, item and user tables, meta and
    bad-row checks, as Polars' streaming engine computes them over a lazily scanned file, so a
    log larger than memory can be written to the canonical layout (``ScannedLog.save``).

    CSV: one record a line, a one-byte separator, no ``.gz`` (Polars scans plain files only);
    errors name the line as if the file held no blank line.
    """
    path = Path(path)
    fmt = fmt or _format_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "csv":
        if path.suffix == ".gz" or len(separator.encode()) != 1:
            raise DataFormatError(path, "the out-of-core reader needs an uncompressed CSV with a "
                                  "one-byte separator; decompress it, or build in memory")
        lf = pl.scan_csv(path, separator=separator, has_header=has_header, infer_schema=False,
                         quote_char='"')
        first = 2 if has_header else 1
    elif fmt == "parquet":
        lf = pl.scan_parquet(path)
        first = 1
    else:
        raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    unit = "line" if fmt == "csv" else "row"
    try:
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataFormatError(path, f"cannot read {fmt}: {err}") from err
    mapped = mapping.mapped()
    missing = [f"{src!r} (for {canon})" for canon, src in mapped.items() if src not in schema]
    if missing:
        raise DataFormatError(path, f"no column {', '.join(missing)}; the columns are: "
                              f"{', '.join(schema.names())}")

    checks = [_empty_check(c, mapped[c], schema[mapped[c]]) for c in ("user_id", "item_id")]
    ts_expr, ts_checks = _timestamp(mapped["timestamp"], schema[mapped["timestamp"]],
                                    timestamp_format)
    checks += ts_checks
    if mapping.action is not None:
        checks.append(_empty_check("action", mapping.action, schema[mapping.action]))
    if mapping.value is not None:
        value = _text(mapping.value, schema[mapping.value]).cast(pl.Float64, strict=False)
        present = _text(mapping.value, schema[mapping.value]).is_not_null()
        checks.append((present & value.is_null(), _bad_value(mapping.value, "a number")))
    is_bad = pl.any_horizontal([c.fill_null(False) for c, _ in checks])
    problem = pl.coalesce([pl.when(c.fill_null(False)).then(msg) for c, msg in checks])
    bad = (lf.with_row_index(LINE, offset=first).filter(is_bad)
           .select(LINE, problem.alias("problem")))
    n_rows = int(lf.select(pl.len()).collect(engine="streaming").item())
    if n_rows == 0:
        raise DataFormatError(path, "no data rows" if fmt == "csv" else "no rows")
    first_bad = bad.head(1).collect(engine="streaming")
    meta: dict[str, object] = {"source_file": path.name, "mapping": mapped}
    if first_bad.height:
        line, message = first_bad.row(0)
        where = f"{unit} {line}: " if unit == "row" else ""
        if strict:
            raise DataFormatError(path, f"{where}{message}", line=line if unit == "line" else None)
        skipped = int(bad.select(pl.len()).collect(engine="streaming").item())
        if skipped == n_rows:
            raise DataFormatError(path, f"no valid rows: all {skipped} rows are bad (first: "
                                  f"{unit} {line}: {message})")
        log.warning("%s: skipped %d bad rows (first: %s %d: %s)", path, skipped, unit, line,
                    message)
        meta["skipped_rows"] = {path.name: skipped}
        lf = lf.filter(~is_bad)
    elif not strict:
        meta["skipped_rows"] = {path.name: 0}

    def id_expr(col: str) -> pl.Expr:
        # Int64 when every (good) value is an integer, else String: as load_table decides
        dtype = schema[col]
        if dtype.is_integer():
            return pl.col(col).cast(pl.Int64)
        text = _text(col, dtype)
        if dtype.is_float() or not _is_text(dtype):
            return text
        not_int = lf.select(text.cast(pl.Int64, strict=False).is_null().any()
                            ).collect(engine="streaming").item()
        return text if not_int else text.cast(pl.Int64)

    cols = [id_expr(mapping.user_id).alias("user_id"), id_expr(mapping.item_id).alias("item_id"),
            ts_expr.alias("timestamp")]
    for canon in ("action", "value", "event_id"):
        src = mapped.get(canon)
        cols.append(((_text(src, schema[src]).cast(pl.Float64) if canon == "value"
                      else _text(src, schema[src])) if src is not None
                     else pl.lit("interaction" if canon == "action" else None))
                    .cast(EVENT_SCHEMA[canon]).alias(canon))
    events = lf.select(cols)
    # items_from_events and users_from_events, as streaming aggregations
    ids = {c: events.select(pl.col(c).unique()).collect(engine="streaming").sort(c)
           for c in ("user_id", "item_id")}
    items = ids["item_id"].with_columns(pl.lit(None, dtype=pl.String).alias("category"))
    if mapping.category is not None:
        known = (lf.select(cols[1], _text(mapping.category, schema[mapping.category])
                           .alias("category")).filter(pl.col("category").is_not_null())
                 .group_by("item_id", "category").len().collect(engine="streaming")
                 .sort(["item_id", "len", "category"], descending=[False, True, False])
                 .group_by("item_id", maintain_order=True).first().select("item_id", "category"))
        items = items.drop("category").join(known, on="item_id", how="left",
                                            maintain_order="left")
    users = ids["user_id"]
    name = path.name.split(".")[0] or path.name
    return ScannedLog(name, feedback, events, items, users, meta)


@dataclass(frozen=True)
class ScannedLog:
    """A log read by ``scan_table``: lazy events, small item and user tables."""

    name: str
    feedback: Feedback
    events: pl.LazyFrame
    items: pl.DataFrame
    users: pl.DataFrame
    meta: dict[str, object]

    def save(self, folder: Path) -> Path:
        """The ``Dataset.save`` layout, the events streamed to Parquet (never all in memory)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.events.sink_parquet(folder / "events.parquet")
        self.items.write_parquet(folder / "items.parquet")
        self.users.write_parquet(folder / "users.parquet")
        (folder / "dataset.json").write_text(json.dumps({
            "name": self.name, "feedback": self.feedback, "user_features": [],
            "item_features": [], "item_multi_features": [], "meta": self.meta}, indent=2))
        return folder
