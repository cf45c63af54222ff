"""Fast, strict reading of delimited text files, with errors that name the file and line.

Every text loader goes through here, so that each one reports bad input the same way:
``DataFormatError(path, problem, line=N)`` with N the 1-based line of the file (blank lines
included in the count, the header too). The work is vectorised with Polars: the file is read as
one string column (one row per line), split with ``str.split_exact``, checked and cast by
whole columns. Python only looks at individual rows once they are known to be bad.

Strict mode (the default) raises on the first bad line that a check finds. The checks run in
stages (encoding, then field counts and types, then the loader's own checks such as allowed
values), so an earlier line with a later-stage problem is reported once the file passes the
earlier stages. Lenient mode (``strict=False``) drops bad lines, counts them and keeps the first
problem, so that the loader can record the count in ``dataset.meta["skipped_rows"]`` (see
:func:`record_skips`). An empty file is an error in both modes: it is never what the caller
meant.
"""

from __future__ import annotations

import codecs
import gzip
import io
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from bstrec.data.schema import DataFormatError

log = logging.getLogger(__name__)

# Name of the column that carries each row's 1-based line number (or row number, see Table.unit).
LINE = "__line__"
_TEXT = "__text__"
_NFIELDS = "__nfields__"

DType = pl.DataType | type[pl.DataType]

# Bytes that never occur in text files of interest; one absent from the data is used as the
# "separator" when Polars reads each whole line as a single field.
_NO_SEP_CANDIDATES = tuple(bytes([b]) for b in range(32) if b not in b"\t\n\r")
_BAD_BYTE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class Field:
    """One column of a delimited file: its name, the dtype to cast to, and whether empty is ok."""

    name: str
    dtype: DType = pl.String
    nullable: bool = False  # an empty value becomes null instead of making the row bad


@dataclass
class Table:
    """Rows read from one file, with the bookkeeping of what lenient mode dropped.

    ``frame`` holds the typed columns plus :data:`LINE`. ``first_problem`` is
    ``(line, problem)`` of the earliest dropped row.
    """

    path: Path
    frame: pl.DataFrame
    skipped: int = 0
    first_problem: tuple[int, str] | None = None
    unit: str = "line"  # what LINE counts: "line" of a text file, "row" of a Parquet file
    header: tuple[str, ...] = field(default_factory=tuple)

    def where(self, number: int) -> str:
        return f"{self.unit} {number}"

    def error(self, number: int, problem: str) -> DataFormatError:
        if self.unit == "line":
            return DataFormatError(self.path, problem, line=number)
        return DataFormatError(self.path, f"{self.unit} {number}: {problem}")


def read_bytes(path: Path, max_lines: int | None = None) -> bytes:
    """The file's bytes, gunzipped when the name ends in ``.gz``; at most ``max_lines`` lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            if max_lines is None:
                return fh.read()
            # Stream so that a few lines of a multi-gigabyte log never load the whole file.
            chunks: list[bytes] = []
            seen = 0
            while seen < max_lines:
                chunk = fh.read(1 << 22)
                if not chunk:
                    break
                seen += chunk.count(b"\n")
                chunks.append(chunk)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataFormatError(path, f"cannot read file: {err}") from err
    data = b"".join(chunks)
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    return data if len(newlines) < max_lines else data[: int(newlines[max_lines - 1]) + 1]


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def decode(path: Path, data: bytes, encoding: str, strict: bool) -> tuple[bytes, dict[int, str]]:
    """Validate ``data`` in ``encoding``; return it as UTF-8 bytes and the bad lines' problems.

    Strict mode raises at the first bad byte. Lenient mode returns ``{line: problem}`` for
    every line that holds a bad byte (those lines still appear in the bytes, with a
    replacement character, and must be dropped by the caller).
    """
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        if strict:
            line = data.count(b"\n", 0, err.start) + 1
            col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
            problem = (f"invalid {encoding} byte 0x{data[err.start]:02x} at column {col} "
                       f"(byte offset {err.start}): is the file in another encoding?")
            raise DataFormatError(path, problem, line=line) from None
        # Only the error path pays for this: one regex scan, then one step per bad line.
        text = data.decode(encoding, "surrogateescape")
        bad: dict[int, str] = {}
        line, prev, pos = 1, 0, 0
        while (m := _BAD_BYTE.search(text, pos)) is not None:
            line += text.count("\n", prev, m.start())
            prev = m.start()
            start = text.rfind("\n", 0, m.start()) + 1
            byte = ord(m.group()) - 0xDC00
            bad[line] = f"invalid {encoding} byte 0x{byte:02x} at column {m.start() - start + 1}"
            nl = text.find("\n", m.start())
            if nl < 0:
                break
            pos = nl + 1
        return text.encode("utf-8", "replace"), bad
    if _is_utf8(encoding):
        return data, {}
    return text.encode("utf-8"), {}


def read_lines(path: Path, *, encoding: str = "utf-8", strict: bool = True,
               max_lines: int | None = None, data: bytes | None = None) -> Table:
    """The non-blank lines of a text file as a frame ``(LINE, text)``.

    Handles ``.gz``, ``\\r\\n`` line ends and a UTF-8 byte-order mark. Raises
    DataFormatError for an empty file (only blank lines counts as empty) in both modes.
    ``data``: the file's (uncompressed) bytes when the caller has already read them.
    """
    path = Path(path)
    raw = read_bytes(path, max_lines) if data is None else data
    utf8, bad = decode(path, raw, encoding, strict)
    if not utf8.strip():
        raise DataFormatError(path, "empty file")
    sep = next((c for c in _NO_SEP_CANDIDATES if c not in utf8), None)
    if sep is None:
        raise DataFormatError(path, "binary content: every control character occurs in it")
    # Polars reads each line as one field: an empty line becomes null (so row index + 1 stays
    # the line number), a trailing "\r" is dropped, nothing is unquoted.
    frame = pl.read_csv(
        io.BytesIO(utf8), has_header=False, separator=sep.decode(), quote_char=None,
        new_columns=[_TEXT], schema={_TEXT: pl.String}, comment_prefix=None,
    ).with_row_index(LINE, offset=1)
    table = Table(path, frame)
    if bad:
        table = _drop(table, pl.DataFrame({LINE: list(bad), "problem": list(bad.values())},
                                          schema={LINE: pl.UInt32, "problem": pl.String}))
    if table.frame[_TEXT].null_count():  # blank lines; the check is free, the filter is not
        table.frame = table.frame.filter(pl.col(_TEXT).is_not_null())
    table.frame = table.frame.rename({_TEXT: "text"})
    if table.frame.is_empty() and not table.skipped:
        raise DataFormatError(path, "empty file")
    _fail_if_all_bad(table)
    return table


def read_delimited(path: Path, fields: Sequence[Field] | None, *, separator: str,
                   encoding: str = "utf-8", strict: bool = True, has_header: bool = False,
                   max_lines: int | None = None, data: bytes | None = None) -> Table:
    """Read a delimited file (any separator, ``"::"`` included; no quoting) into typed columns.

    ``fields=None`` reads every column as String, named from the header, or ``column_1``,
    ``column_2``, ... (as many as the widest line has) without one. A row is bad when it has
    the wrong number of fields, an empty value in a non-nullable column, or a value that does
    not parse as its column's dtype. Numeric values may carry surrounding spaces.
    """
    table = read_lines(path, encoding=encoding, strict=strict, max_lines=max_lines, data=data)
    header: tuple[str, ...] = ()
    if has_header:
        first = table.frame.row(0, named=True)
        header = tuple(h.strip() for h in first["text"].split(separator))
        table.frame = table.frame.slice(1)
        if table.frame.is_empty():
            raise DataFormatError(path, "no data rows after the header", line=first[LINE])
    if fields is None and has_header:
        fields = [Field(h, pl.String, nullable=True) for h in header]
    elif fields is None:
        # No header: as many String columns as the widest line, named like Polars names them.
        widest = table.frame.select(pl.col("text").str.count_matches(separator, literal=True)
                                    .max()).item()
        fields = [Field(f"column_{i + 1}", pl.String, nullable=True)
                  for i in range(int(widest) + 1)]
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise DataFormatError(path, f"duplicate column names {names}")
    n = len(fields)
    raw = [f"__raw{i}__" for i in range(n)]
    text = pl.col("text")
    frame = table.frame.select(
        LINE,
        (text.str.count_matches(separator, literal=True) + 1).alias(_NFIELDS),
        text.str.split_exact(separator, n - 1).struct.rename_fields(raw).alias("__parts__"),
    ).unnest("__parts__")
    # Eager, column by column: the common case (clean data) costs one cast per column, and
    # the masks of a check are only computed when a cheap null count says something is off.
    typed: list[pl.Series] = []
    masks: list[pl.Series] = []
    messages: list[pl.Expr] = []

    def flag(mask: pl.Series, message: pl.Expr) -> None:
        if mask.any():
            masks.append(mask.alias(f"__bad{len(masks)}__"))
            messages.append(message)

    nfields = frame[_NFIELDS]
    flag(nfields != n,
         pl.concat_str(pl.lit(f"expected {n} fields, got "), pl.col(_NFIELDS).cast(pl.String)))
    for f, r in zip(fields, raw, strict=True):
        value = frame[r]
        empty_msg = pl.lit(f"column '{f.name}' is empty")
        if f.dtype == pl.String:
            empty = value.is_null() | (value == "")
            if empty.any():
                value = pl.select(pl.when(empty).then(None).otherwise(value)).to_series()
                if not f.nullable:
                    flag(empty, empty_msg)
            typed.append(value.alias(f.name))
            continue
        cast = value.cast(f.dtype, strict=False)
        if cast.null_count():  # empty, padded with spaces (" 5" is still a number), or bad
            stripped = value.str.strip_chars()
            empty = stripped.is_null() | (stripped == "")
            cast = stripped.cast(f.dtype, strict=False)
            if not f.nullable:
                flag(empty, empty_msg)
            kind = "an integer" if f.dtype.is_integer() else "a number"
            flag(~empty & cast.is_null(),
                 pl.concat_str(pl.lit(f"column '{f.name}': '"), pl.col(r),
                               pl.lit(f"' is not {kind}")))
        typed.append(cast.alias(f.name))
    frame = frame.with_columns(typed + masks)
    checks = [(pl.col(m.name), msg) for m, msg in zip(masks, messages, strict=True)]
    table = check_rows(replace(table, frame=frame, header=header), checks, strict=strict)
    table.frame = table.frame.select(LINE, *names)
    return table


def check_rows(table: Table, checks: Sequence[tuple[pl.Expr, pl.Expr]], *,
               strict: bool) -> Table:
    """Apply ``(is_bad, message)`` checks to every row: raise (strict) or drop and count.

    The first check that fires names a row's problem. The checks are evaluated over the whole
    frame (so they may use window expressions such as ``is_duplicated``); the messages only for
    the bad rows, so they must be row-wise.
    """
    if not checks or table.frame.is_empty():
        return table
    masks = [f"__bad{i}__" for i in range(len(checks))]
    flagged = table.frame.with_columns(
        [c.fill_null(False).alias(m) for (c, _), m in zip(checks, masks, strict=True)])
    bad_mask = pl.any_horizontal(masks)
    bad = flagged.filter(bad_mask)
    if bad.is_empty():
        return table
    problems = bad.select(
        LINE,
        pl.coalesce([pl.when(pl.col(m)).then(msg)
                     for (_, msg), m in zip(checks, masks, strict=True)]).alias("problem"),
    ).sort(LINE)
    if strict:
        line, problem = problems.row(0)
        raise table.error(int(line), str(problem))
    kept = flagged.filter(~bad_mask).drop(masks)
    out = _merge_skips(table, problems)
    out.frame = kept
    _fail_if_all_bad(out)
    return out


def _drop(table: Table, problems: pl.DataFrame) -> Table:
    """Drop the rows whose LINE is in ``problems`` (``LINE``, ``problem``) and count them."""
    out = _merge_skips(table, problems.sort(LINE))
    out.frame = table.frame.join(problems.select(LINE), on=LINE, how="anti")
    return out


def note_skipped(table: Table, problems: Mapping[int, str]) -> Table:
    """Count rows the caller already left out of ``table.frame`` (``{line: problem}``).

    Raises DataFormatError when nothing is left.
    """
    if not problems:
        return table
    frame = pl.DataFrame({LINE: list(problems), "problem": list(problems.values())},
                         schema={LINE: pl.UInt32, "problem": pl.String}).sort(LINE)
    out = _merge_skips(table, frame)
    _fail_if_all_bad(out)
    return out


def _merge_skips(table: Table, problems: pl.DataFrame) -> Table:
    first = problems.row(0)
    candidate = (int(first[0]), str(first[1]))
    best = candidate if table.first_problem is None else min(table.first_problem, candidate)
    return replace(table, skipped=table.skipped + problems.height, first_problem=best)


def _fail_if_all_bad(table: Table) -> None:
    if table.frame.is_empty() and table.skipped and table.first_problem is not None:
        line, problem = table.first_problem
        raise DataFormatError(
            table.path, f"no valid rows: all {table.skipped} rows are bad "
            f"(first: {table.where(line)}: {problem})")


def record_skips(meta: dict[str, object], tables: Iterable[Table], *, strict: bool) -> None:
    """In lenient mode, note ``{file name: rows skipped}`` in ``meta["skipped_rows"]``.

    Every file read is listed (0 included) so that a reader can tell "checked, clean" from
    "not checked"; one warning line per file with skips names the count and first problem.
    """
    if strict:
        return
    raw = meta.setdefault("skipped_rows", {})
    assert isinstance(raw, dict)
    for t in tables:
        raw[t.path.name] = raw.get(t.path.name, 0) + t.skipped
        if t.skipped and t.first_problem is not None:
            line, problem = t.first_problem
            log.warning("%s: skipped %d bad rows (first: %s: %s)",
                        t.path, t.skipped, t.where(line), problem)
