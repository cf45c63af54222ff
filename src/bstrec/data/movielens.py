"""MovieLens 1M and 100K loaders (protocols P1 and P3 of PROTOCOL.md).

Both produce the same columns, so that every later stage treats them alike:

- events: ``user_id``, ``item_id`` (Int64), ``timestamp``, action ``"rating"``, value = rating.
- items: ``item_id``, ``title``, ``category`` (first genre), ``genres`` (List[String]),
  ``year`` (String, ``"unknown"`` when missing).
- users: ``user_id``, ``gender``, ``age`` (ML-1M's age-group code as a String), ``occupation``,
  ``zip``, ``zip1`` (first character of the zip code).

Events keep the file order; ordering by time is the samples' job.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from bstrec.data.reader import Field, Table, check_rows, read_delimited, record_skips
from bstrec.data.schema import DataFormatError, Dataset, normalize_events

USER_FEATURES = ("gender", "age", "occupation", "zip1")
ITEM_FEATURES = ("year",)
ITEM_MULTI_FEATURES = ("genres",)
# ML-1M's age groups, by lower bound; ML-100K's exact ages are mapped onto them.
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)

_RATING_FIELDS = (Field("user_id", pl.Int64), Field("item_id", pl.Int64),
                  Field("rating", pl.Float64), Field("timestamp", pl.Int64))


def _missing(root: Path, what: str, name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name}: {what} not found in {root}; download it with `bstrec data download {name}` "
        "or point --data-dir / BSTREC_DATA_DIR at the folder that holds it")


def find_ml1m_ratings(root: Path) -> Path:
    """The ML-1M ratings file in ``root``: ``ratings.dat``, ``ratings.dat.gz``, else the one
    ``ratings*.dat[.gz]`` there is (such as a partial copy)."""
    root = Path(root)
    for name in ("ratings.dat", "ratings.dat.gz"):
        if (root / name).is_file():
            return root / name
    found = sorted({*root.glob("ratings*.dat"), *root.glob("ratings*.dat.gz")})
    if len(found) == 1:
        return found[0]
    if not found:
        raise _missing(root, "ratings.dat", "ml-1m")
    raise FileNotFoundError(f"ml-1m: several ratings files in {root} "
                            f"({', '.join(p.name for p in found)}); keep one or name one "
                            "ratings.dat")


def find_ml100k_ratings(root: Path) -> Path:
    """``u.data`` or ``u.data.gz`` in ``root``."""
    for name in ("u.data", "u.data.gz"):
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise _missing(Path(root), "u.data", "ml-100k")


def has_movielens(name: str, root: Path) -> bool:
    """Whether ``root`` holds the files the loader of ``name`` needs."""
    root = Path(root)
    try:
        if name == "ml-1m":
            find_ml1m_ratings(root)
            return all((root / f).is_file() for f in ("movies.dat", "users.dat"))
        if name == "ml-100k":
            find_ml100k_ratings(root)
            return all((root / f).is_file() for f in ("u.item", "u.user", "u.genre"))
    except FileNotFoundError:
        return False
    raise ValueError(f"not a MovieLens dataset: {name!r}")


def _require(root: Path, name: str, dataset: str) -> Path:
    path = Path(root) / name
    if not path.is_file():
        raise _missing(Path(root), name, dataset)
    return path


def _events(ratings: Table) -> pl.DataFrame:
    return normalize_events(ratings.frame.select(
        "user_id", "item_id", "timestamp",
        pl.lit("rating").alias("action"), pl.col("rating").alias("value")))


def _zip1() -> pl.Expr:
    return pl.col("zip").str.slice(0, 1).alias("zip1")


def _unique_ids(table: Table, column: str, strict: bool) -> Table:
    """Reject a repeated id: a second row for the same movie or user is a broken file."""
    dup = pl.col(column).is_duplicated() & ~pl.col(column).is_first_distinct()
    return check_rows(table, [(dup, pl.concat_str(pl.lit(f"duplicate {column} "),
                                                  pl.col(column).cast(pl.String)))],
                      strict=strict)


def load_ml1m(root: Path, strict: bool = True) -> Dataset:
    """Load MovieLens 1M from ``root`` (``ratings*.dat[.gz]``, ``movies.dat``, ``users.dat``)."""
    root = Path(root)
    if not root.is_dir():
        raise _missing(root, "the folder", "ml-1m")
    ratings_path = find_ml1m_ratings(root)
    ratings = read_delimited(ratings_path, _RATING_FIELDS, separator="::", strict=strict)
    movies = read_delimited(
        _require(root, "movies.dat", "ml-1m"),
        [Field("item_id", pl.Int64), Field("title"), Field("genres", nullable=True)],
        separator="::", encoding="latin-1", strict=strict)
    movies = _unique_ids(movies, "item_id", strict)
    users = read_delimited(
        _require(root, "users.dat", "ml-1m"),
        [Field("user_id", pl.Int64), Field("gender"), Field("age", pl.Int64),
         Field("occupation", pl.Int64), Field("zip")],
        separator="::", strict=strict)
    users = _unique_ids(users, "user_id", strict)

    genres = pl.col("genres").str.split("|").fill_null(pl.lit([], dtype=pl.List(pl.String)))
    items = movies.frame.select(
        "item_id", "title",
        genres.list.first().alias("category"),
        genres.alias("genres"),
        # The LAST "(YYYY)": titles like "Associate, The (L'Associe)(1982)" hold other brackets.
        pl.col("title").str.extract_all(r"\(\d{4}\)").list.last().str.slice(1, 4)
        .fill_null("unknown").alias("year"),
    )
    user_frame = users.frame.select(
        "user_id", "gender", pl.col("age").cast(pl.String), pl.col("occupation").cast(pl.String),
        "zip", _zip1())
    meta: dict[str, object] = {"ratings_file": ratings_path.name}
    record_skips(meta, (ratings, movies, users), strict=strict)
    return Dataset(
        name="ml-1m", events=_events(ratings), items=items, users=user_frame,
        feedback="explicit", user_features=USER_FEATURES, item_features=ITEM_FEATURES,
        item_multi_features=ITEM_MULTI_FEATURES, meta=meta)


def age_group(age: pl.Expr) -> pl.Expr:
    """Map exact ages onto ML-1M's age-group codes ("1", "18", ..., "56") as Strings."""
    # Group index = how many lower bounds above the first the age reaches; under 1 -> group "1".
    index = pl.sum_horizontal([(age >= bound).cast(pl.Int8) for bound in AGE_GROUPS[1:]])
    return index.replace_strict(list(range(len(AGE_GROUPS))), [str(a) for a in AGE_GROUPS],
                                return_dtype=pl.String)


def _ml100k_genres(root: Path) -> list[str]:
    """Genre names from ``u.genre`` (``name|index``), in flag order.

    Always strict: u.genre defines the layout of u.item, so a bad line there is never skipped.
    """
    table = read_delimited(_require(root, "u.genre", "ml-100k"),
                           [Field("genre"), Field("index", pl.Int64)],
                           separator="|", strict=True)
    frame = table.frame.sort("index")
    if frame["index"].to_list() != list(range(frame.height)):
        raise DataFormatError(table.path, "genre indexes must be 0, 1, ..., n-1, got "
                              f"{frame['index'].to_list()}")
    return [str(g) for g in frame["genre"].to_list()]


def load_ml100k(root: Path, strict: bool = True) -> Dataset:
    """Load MovieLens 100K from ``root`` (``u.data[.gz]``, ``u.item``, ``u.user``, ``u.genre``)."""
    root = Path(root)
    if not root.is_dir():
        raise _missing(root, "the folder", "ml-100k")
    ratings_path = find_ml100k_ratings(root)
    ratings = read_delimited(ratings_path, _RATING_FIELDS, separator="\t", strict=strict)
    genre_names = _ml100k_genres(root)
    flags = [f"__g{i}__" for i in range(len(genre_names))]
    movies = read_delimited(
        _require(root, "u.item", "ml-100k"),
        [Field("item_id", pl.Int64), Field("title"), Field("release_date", nullable=True),
         Field("video_release_date", nullable=True), Field("url", nullable=True),
         *(Field(f, pl.Int64) for f in flags)],
        separator="|", encoding="latin-1", strict=strict)
    movies = check_rows(movies, [
        (~pl.col(f).is_in([0, 1]),
         pl.concat_str(pl.lit(f"genre flag '{g}' is "), pl.col(f).cast(pl.String),
                       pl.lit(", expected 0 or 1")))
        for f, g in zip(flags, genre_names, strict=True)], strict=strict)
    movies = _unique_ids(movies, "item_id", strict)
    users = read_delimited(
        _require(root, "u.user", "ml-100k"),
        [Field("user_id", pl.Int64), Field("age", pl.Int64), Field("gender"),
         Field("occupation"), Field("zip")],
        separator="|", strict=strict)
    users = _unique_ids(users, "user_id", strict)

    genres = pl.concat_list([pl.when(pl.col(f) == 1).then(pl.lit(g))
                             for f, g in zip(flags, genre_names, strict=True)]).list.drop_nulls()
    items = movies.frame.select(
        "item_id", "title",
        genres.list.first().alias("category"),  # flag order: "unknown" counts as a genre
        genres.alias("genres"),
        pl.col("release_date").str.extract(r"(\d{4})\s*$").fill_null("unknown").alias("year"),
    )
    user_frame = users.frame.select(
        "user_id", "gender", age_group(pl.col("age")).alias("age"), "occupation", "zip", _zip1())
    meta: dict[str, object] = {"ratings_file": ratings_path.name}
    record_skips(meta, (ratings, movies, users), strict=strict)
    return Dataset(
        name="ml-100k", events=_events(ratings), items=items, users=user_frame,
        feedback="explicit", user_features=USER_FEATURES, item_features=ITEM_FEATURES,
        item_multi_features=ITEM_MULTI_FEATURES, meta=meta)
