"""The canonical schema every loader produces and every later stage reads.

Three tables, kept as Polars frames in memory and Parquet on disk:

- events: ``user_id``, ``item_id`` (both Int64 or String), ``timestamp`` (Int64, unix seconds),
  ``action`` (String: "rating", "pv", "buy", "cart", "fav", "review", "click", ...),
  ``value`` (Float64, nullable: the rating for explicit feedback), ``event_id`` (String, nullable).
- items: ``item_id``, ``category`` (String, nullable) and optional attributes.
- users: ``user_id`` and optional profile columns.

Which attribute and profile columns are model features is declared by the loader, which knows
their meaning, in ``user_features`` (categorical), ``item_features`` (categorical) and
``item_multi_features`` (list of strings, multi-hot).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from bstrec.data.io import atomic_dir

Feedback = Literal["explicit", "implicit"]

ID_DTYPES = (pl.Int64, pl.String)
EVENT_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "timestamp": pl.Int64,
    "action": pl.String,
    "value": pl.Float64,
    "event_id": pl.String,
}


class DataFormatError(ValueError):
    """Bad input data. ``str(err)`` names the file, the line (1-based) when known, and the problem."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def empty_events(id_dtype: type[pl.DataType] = pl.Int64) -> pl.DataFrame:
    return pl.DataFrame(
        schema={"user_id": id_dtype, "item_id": id_dtype, **EVENT_SCHEMA},
    )


def normalize_events(events: pl.DataFrame) -> pl.DataFrame:
    """Add the optional event columns when missing and order columns canonically."""
    exprs = []
    for name, dtype in EVENT_SCHEMA.items():
        if name in events.columns:
            exprs.append(pl.col(name).cast(dtype))
        elif name == "action":
            exprs.append(pl.lit("interaction", dtype=pl.String).alias(name))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
    return events.select(pl.col("user_id"), pl.col("item_id"), *exprs)


@dataclass
class Dataset:
    """One behaviour log in the canonical schema, with its item and user tables."""

    name: str
    events: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    feedback: Feedback = "explicit"
    user_features: tuple[str, ...] = ()
    item_features: tuple[str, ...] = ()
    item_multi_features: tuple[str, ...] = ()
    # JSON-serialisable notes from the loader, e.g. {"skipped_rows": {file: n}} in lenient mode.
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when a table breaks the canonical schema."""
        for table, cols in (
            ("events", ["user_id", "item_id", *EVENT_SCHEMA]),
            ("items", ["item_id", "category"]),
            ("users", ["user_id"]),
        ):
            frame: pl.DataFrame = getattr(self, table)
            missing = [c for c in cols if c not in frame.columns]
            if missing:
                raise ValueError(f"dataset {self.name!r}: {table} lacks columns {missing}")
        for table, col in (("events", "user_id"), ("events", "item_id"), ("items", "item_id"),
                           ("users", "user_id")):
            dtype = getattr(self, table).schema[col]
            if dtype not in ID_DTYPES:
                raise ValueError(f"dataset {self.name!r}: {table}.{col} is {dtype}, "
                                 "expected Int64 or String")
        if self.events.schema["timestamp"] != pl.Int64:
            raise ValueError(f"dataset {self.name!r}: events.timestamp must be Int64 seconds")
        if self.events.schema["user_id"] != self.users.schema["user_id"]:
            raise ValueError(f"dataset {self.name!r}: user_id dtypes differ between events and users")
        if self.events.schema["item_id"] != self.items.schema["item_id"]:
            raise ValueError(f"dataset {self.name!r}: item_id dtypes differ between events and items")
        for col in (*self.user_features,):
            if col not in self.users.columns:
                raise ValueError(f"dataset {self.name!r}: user feature {col!r} not in users")
        for col in (*self.item_features, *self.item_multi_features):
            if col not in self.items.columns:
                raise ValueError(f"dataset {self.name!r}: item feature {col!r} not in items")

    def summary(self) -> dict[str, int]:
        return {
            "events": self.events.height,
            "users": self.events["user_id"].n_unique(),
            "items": self.events["item_id"].n_unique(),
            "catalog": self.items.height,
        }

    def save(self, path: str | Path) -> Path:
        """Write the three tables as Parquet plus ``dataset.json``, atomically."""
        with atomic_dir(path) as tmp:
            self.events.write_parquet(tmp / "events.parquet")
            self.items.write_parquet(tmp / "items.parquet")
            self.users.write_parquet(tmp / "users.parquet")
            meta = {
                "name": self.name,
                "feedback": self.feedback,
                "user_features": list(self.user_features),
                "item_features": list(self.item_features),
                "item_multi_features": list(self.item_multi_features),
                "meta": self.meta,
            }
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        root = Path(path)
        meta = json.loads((root / "dataset.json").read_text())
        return cls(
            name=meta["name"],
            events=pl.read_parquet(root / "events.parquet"),
            items=pl.read_parquet(root / "items.parquet"),
            users=pl.read_parquet(root / "users.parquet"),
            feedback=meta["feedback"],
            user_features=tuple(meta["user_features"]),
            item_features=tuple(meta["item_features"]),
            item_multi_features=tuple(meta["item_multi_features"]),
            meta=meta.get("meta", {}),
        )


def items_from_events(events: pl.DataFrame, category: str | None = None) -> pl.DataFrame:
    """An item table for logs that ship none: each item with its most frequent category."""
    if category is None:
        return events.select("item_id").unique().sort("item_id").with_columns(
            pl.lit(None, dtype=pl.String).alias("category"))
    return (
        events.group_by("item_id", category).len()
        .sort(["item_id", "len", category], descending=[False, True, False])
        .group_by("item_id", maintain_order=True).first()
        .select("item_id", pl.col(category).cast(pl.String).alias("category"))
    )


def users_from_events(events: pl.DataFrame) -> pl.DataFrame:
    """A user table with no profile, for logs that ship none."""
    return events.select("user_id").unique().sort("user_id")
