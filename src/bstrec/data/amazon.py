"""Amazon product reviews (McAuley et al., 2014 and 2018 releases), 5-core subsets.

Reviews: one JSON object a line (``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``;
other fields ignored) in ``<Category>_5.json[.gz]``. Metadata (optional):
``meta_<Category>.json[.gz]`` with ``asin`` and either ``categories`` (2014: a list of category
paths, each a list of strings, most general first) or ``category`` (2018: one list of strings).

The item's category is the most specific entry (the last) of the first path (2014) or of the
list (2018): the first path is the product's primary placement, and its last entry separates
products better than a top level such as "Electronics" that every item of a file shares.
(DIN's preprocessing takes the last entry of the LAST path instead; the first path is the
stable choice when a product is listed in several places.)

The 2014 meta files are Python dict literals, not JSON: each line is tried as JSON first and
then with ``ast.literal_eval`` (which evaluates literals only, never code).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from bstrec.data.reader import LINE, Table, check_rows, note_skipped, read_lines, record_skips
from bstrec.data.schema import Dataset, items_from_events, normalize_events, users_from_events

REVIEW_FIELDS: dict[str, pl.DataType | type[pl.DataType]] = {
    "reviewerID": pl.String, "asin": pl.String, "overall": pl.Float64, "unixReviewTime": pl.Int64,
}
_META_DTYPE = pl.Struct({"asin": pl.String, "categories": pl.List(pl.List(pl.String)),
                         "category": pl.List(pl.String)})

# A row converter returns the parsed row or raises _Bad with the problem.
Row = dict[str, Any]


class _Bad(Exception):
    pass


def _find_one(root: Path, patterns: tuple[str, ...], what: str) -> Path | None:
    found = sorted({p for pat in patterns for p in Path(root).glob(pat) if p.is_file()})
    if len(found) > 1:
        raise FileNotFoundError(f"amazon: several {what} files in {root} "
                                f"({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def find_amazon(root: Path) -> tuple[Path, Path | None]:
    """The reviews file (``*_5.json[.gz]``) and the optional meta file (``meta_*.json[.gz]``)."""
    root = Path(root)
    reviews = _find_one(root, ("*_5.json", "*_5.json.gz"), "reviews")
    if reviews is None:
        raise FileNotFoundError(
            f"amazon: no 5-core reviews file (*_5.json or *_5.json.gz) in {root}; get one "
            "from https://cseweb.ucsd.edu/~jmcauley/datasets.html (research use only)")
    return reviews, _find_one(root, ("meta_*.json", "meta_*.json.gz"), "meta")


def _parse_python(table: Table, convert: Callable[[Row], Row], schema: pl.Schema, *,
                  literal: bool, strict: bool) -> Table:
    """Parse line by line. Only runs when the vectorised parse failed, to find the bad lines
    (and for the 2014 meta files, whose lines are Python literals)."""
    rows: list[Row] = []
    bad: dict[int, str] = {}
    for line, text in table.frame.select(LINE, "text").iter_rows():
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                if not literal:
                    raise _Bad(f"invalid JSON: {err.msg} at column {err.colno}") from None
                try:
                    obj = ast.literal_eval(text)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    raise _Bad(f"neither JSON nor a Python literal: {err.msg} at column "
                               f"{err.colno}") from None
            if not isinstance(obj, dict):
                raise _Bad(f"not a JSON object but {type(obj).__name__}")
            row = convert(obj)
        except _Bad as problem:
            if strict:
                raise table.error(line, str(problem)) from None
            bad[line] = str(problem)
            continue
        row[LINE] = line
        rows.append(row)
    full = pl.Schema([(LINE, pl.UInt32), *schema.items()])
    frame = pl.DataFrame(rows, schema=full) if rows else pl.DataFrame(schema=full)
    return note_skipped(replace(table, frame=frame), bad)


def _number(obj: Row, key: str, integer: bool) -> float | int:
    """A number, or a string that holds one (the vectorised path rejects those, this accepts)."""
    if key not in obj or obj[key] is None:
        raise _Bad(f"missing field '{key}'")
    v = obj[key]
    if not isinstance(v, bool) and isinstance(v, int | float | str):
        try:
            if not integer:
                return float(v)
            # A float time is truncated, as the vectorised path does.
            return int(v.strip()) if isinstance(v, str) else int(v)
        except (ValueError, OverflowError):
            pass
    raise _Bad(f"field '{key}': {v!r} is not {'an integer' if integer else 'a number'}")


def _string(obj: Row, key: str) -> str:
    if key not in obj or obj[key] is None:
        raise _Bad(f"missing field '{key}'")
    v = obj[key]
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise _Bad(f"field '{key}': {v!r} is not a string")


def _review_row(obj: Row) -> Row:
    return {
        "reviewerID": _string(obj, "reviewerID"), "asin": _string(obj, "asin"),
        "overall": float(_number(obj, "overall", integer=False)),
        "unixReviewTime": int(_number(obj, "unixReviewTime", integer=True)),
    }


def _strings(v: object, key: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _Bad(f"field '{key}' is not a list of strings")
    return v


def _meta_row(obj: Row) -> Row:
    category: str | None = None
    paths = obj.get("categories")
    if paths is not None:
        if not isinstance(paths, list):
            raise _Bad("field 'categories' is not a list of category paths")
        checked = [_strings(p, "categories") for p in paths]
        if checked and checked[0]:
            category = checked[0][-1]
    flat = obj.get("category")
    if category is None and flat is not None:
        names = _strings(flat, "category")
        category = names[-1] if names else None
    return {"asin": _string(obj, "asin"), "category": category}


def _decode(table: Table, dtype: pl.Struct) -> pl.DataFrame | None:
    """Vectorised JSON decode; None when some line is not valid JSON of the right types."""
    try:
        return table.frame.select(LINE, pl.col("text").str.json_decode(dtype).alias("obj"))
    except (pl.exceptions.PolarsError, ValueError):
        return None


def _read_reviews(path: Path, strict: bool) -> Table:
    table = read_lines(path, strict=strict)
    decoded = _decode(table, pl.Struct(REVIEW_FIELDS))
    if decoded is None:
        return _parse_python(table, _review_row, pl.Schema(REVIEW_FIELDS), literal=False,
                             strict=strict)
    frame = decoded.with_columns(pl.col("obj").is_null().alias("__null__")).unnest("obj")
    checks = [(pl.col("__null__"), pl.lit("not a JSON object"))]
    checks += [(pl.col(k).is_null(), pl.lit(f"missing field '{k}'")) for k in REVIEW_FIELDS]
    table.frame = frame
    out = check_rows(table, checks, strict=strict)
    out.frame = out.frame.drop("__null__")
    return out


def _read_meta(path: Path, strict: bool) -> Table:
    table = read_lines(path, strict=strict)
    decoded = _decode(table, _META_DTYPE)
    if decoded is None:
        out = _parse_python(table, _meta_row, pl.Schema({"asin": pl.String, "category": pl.String}),
                            literal=True, strict=strict)
    else:
        obj = pl.col("obj")
        paths = obj.struct.field("categories")
        table.frame = decoded.select(
            LINE, obj.is_null().alias("__null__"), obj.struct.field("asin").alias("asin"),
            pl.coalesce(paths.list.first().list.last(),
                        obj.struct.field("category").list.last()).alias("category"))
        out = check_rows(table, [(pl.col("__null__"), pl.lit("not a JSON object")),
                                 (pl.col("asin").is_null(), pl.lit("missing field 'asin'"))],
                         strict=strict)
        out.frame = out.frame.drop("__null__")
    # A product listed twice keeps its first entry.
    out.frame = out.frame.unique("asin", keep="first", maintain_order=True)
    return out


def load_amazon(root: Path, strict: bool = True) -> Dataset:
    """Load an Amazon 5-core reviews file (and its meta file when present) from ``root``.

    The item table holds the reviewed items; their category comes from the meta file (null for
    an item the meta file lacks, or for all items when there is no meta file).
    """
    reviews_path, meta_path = find_amazon(root)
    reviews = _read_reviews(reviews_path, strict)
    events = normalize_events(reviews.frame.select(
        pl.col("reviewerID").alias("user_id"), pl.col("asin").alias("item_id"),
        pl.col("unixReviewTime").alias("timestamp"),
        pl.lit("review").alias("action"), pl.col("overall").alias("value")))
    tables = [reviews]
    meta: dict[str, object] = {"reviews_file": reviews_path.name}
    if meta_path is None:
        items = items_from_events(events)
    else:
        meta_table = _read_meta(meta_path, strict)
        tables.append(meta_table)
        meta["meta_file"] = meta_path.name
        items = (events.select("item_id").unique().sort("item_id")
                 .join(meta_table.frame.select(pl.col("asin").alias("item_id"), "category"),
                       on="item_id", how="left", maintain_order="left"))
    record_skips(meta, tables, strict=strict)
    return Dataset(name="amazon", events=events, items=items, users=users_from_events(events),
                   feedback="implicit", meta=meta)
