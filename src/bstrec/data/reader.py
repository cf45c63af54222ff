"""Fast, strict reading of delimited text files, with errors that name the file and line.

Every text loader goes through here, so that each one reports bad input the same way:
``DataFormatError(path, problem, line=N)`` with N the 1-based line of the file (blank lines
included in the count, the header too). The work is vectorised with Polars: the file is read as
one string column (one row per line), split with ``str.split_exact``, checked and cast by
whole columns. Python only looks at individual rows once they are known to be bad.

Strict mode (the default) raises on the first bad line. Lenient mode (``strict=False``) drops
bad lines, counts them and keeps the first problem, so that the loader can record the count in
``dataset.meta["skipped_rows"]`` (see :func:`record_skips`). An empty file is an error in
both modes: it is never what the caller meant.
"""

from __future__ import annotations

import codecs
import gzip
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

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
_NO_SEP_CANDIDATES = tuple(bytes([b]) for b in (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16,
                                                 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                                 29, 30, 31))
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

    def without_line(self) -> pl.DataFrame:
        return self.frame.drop(LINE)


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
    end = -1
    for _ in range(max_lines):
        end = data.find(b"\n", end + 1)
        if end < 0:
            return data
    return data[: end + 1]


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
               max_lines: int | None = None) -> Table:
    """The non-blank lines of a text file as a frame ``(LINE, text)``.

    Handles ``.gz``, ``\\r\\n`` line ends and a UTF-8 byte-order mark. Raises
    DataFormatError for an empty file (only blank lines counts as empty) in both modes.
    """
    path = Path(path)
    raw = read_bytes(path, max_lines)
    data, bad = decode(path, raw, encoding, strict)
    if not data.strip():
        raise DataFormatError(path, "empty file")
    sep = next((c for c in _NO_SEP_CANDIDATES if c not in data), None)
    if sep is None:
        raise DataFormatError(path, "binary content: every control character occurs in it")
    # Polars reads each line as one field: an empty line becomes null (so row index + 1 stays
    # the line number), a trailing "\r" is dropped, nothing is unquoted.
    frame = pl.read_csv(
        io.BytesIO(data), has_header=False, separator=sep.decode(), quote_char=None,
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
                   max_lines: int | None = None) -> Table:
    """Read a delimited file (any separator, ``"::"`` included; no quoting) into typed columns.

    ``fields=None`` takes the names from the header, all as String. A row is bad when it has
    the wrong number of fields, an empty value in a non-nullable column, or a value that does
    not parse as its column's dtype. Numeric values may carry surrounding spaces.
    """
    table = read_lines(path, encoding=encoding, strict=strict, max_lines=max_lines)
    header: tuple[str, ...] = ()
    if has_header:
        first = table.frame.row(0, named=True)
        header = tuple(h.strip() for h in first["text"].split(separator))
        table.frame = table.frame.slice(1)
        if table.frame.is_empty():
            raise DataFormatError(path, "no data rows after the header", line=first[LINE])
    if fields is None:
        if not has_header:
            raise ValueError("read_delimited: fields=None needs has_header=True")
        fields = [Field(h, pl.String, nullable=True) for h in header]
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
    typed: list[pl.Expr] = []
    checks: list[tuple[pl.Expr, pl.Expr]] = [
        (pl.col(_NFIELDS) != n,
         pl.concat_str(pl.lit(f"expected {n} fields, got "), pl.col(_NFIELDS).cast(pl.String))),
    ]
    for f, r in zip(fields, raw, strict=True):
        value = pl.col(r)
        if f.dtype != pl.String:
            value = value.str.strip_chars()  # " 5" is still a number
        empty = value.is_null() | (value == "")
        value = pl.when(empty).then(None).otherwise(value)
        if not f.nullable:
            checks.append((empty, pl.lit(f"column '{f.name}' is empty")))
        if f.dtype == pl.String:
            typed.append(value.alias(f.name))
            continue
        typed.append(value.cast(f.dtype, strict=False).alias(f.name))
        kind = "an integer" if f.dtype.is_integer() else "a number"
        checks.append((~empty & pl.col(f.name).is_null(),
                       pl.concat_str(pl.lit(f"column '{f.name}': '"), pl.col(r),
                                     pl.lit(f"' is not {kind}"))))
    frame = frame.with_columns(typed)
    table = check_rows(replace(table, frame=frame, header=header), checks, strict=strict)
    table.frame = table.frame.select(LINE, *names)
    return table


def check_rows(table: Table, checks: Sequence[tuple[pl.Expr, pl.Expr]], *,
               strict: bool) -> Table:
    """Apply ``(is_bad, message)`` checks to every row: raise (strict) or drop and count.

    The first check that fires names a row's problem. Both expressions are evaluated over the
    whole frame; messages are only built for the bad rows.
    """
    if not checks or table.frame.is_empty():
        return table
    bad_mask = pl.any_horizontal([c.fill_null(False) for c, _ in checks])
    bad = table.frame.filter(bad_mask)
    if bad.is_empty():
        return table
    problems = bad.select(
        LINE,
        pl.coalesce([pl.when(c.fill_null(False)).then(m) for c, m in checks]).alias("problem"),
    ).sort(LINE)
    if strict:
        line, problem = problems.row(0)
        raise table.error(int(line), str(problem))
    kept = table.frame.filter(~bad_mask)
    out = _merge_skips(table, problems)
    out.frame = kept
    _fail_if_all_bad(out)
    return out


def _drop(table: Table, problems: pl.DataFrame) -> Table:
    """Drop the rows whose LINE is in ``problems`` (``LINE``, ``problem``) and count them."""
    out = _merge_skips(table, problems.sort(LINE))
    out.frame = table.frame.join(problems.select(LINE), on=LINE, how="anti")
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
