"""Taobao UserBehavior loader (Tianchi dataset 649, the log used by the BST paper's authors).

``UserBehavior.csv[.gz]``: no header, ``user_id,item_id,category_id,behavior_type,timestamp``
with behavior_type one of pv (page view), buy, cart, fav. The full file has about 100 million
lines (3.5 GB): pass ``max_rows`` to read only the first lines while exploring.

The Tianchi log carries no prices. Where the folder also holds ``item_prices.csv`` (header
``item_id,price``; ``bstrec.data.synthetic.write_taobao_log`` writes one), the item table gets
a ``price`` column (null for items it does not list), read by the revenue objective.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from bstrec.data.reader import Field, check_rows, read_delimited, record_skips
from bstrec.data.schema import Dataset, items_from_events, normalize_events, users_from_events

BEHAVIORS = ("pv", "buy", "cart", "fav")
FILENAMES = ("UserBehavior.csv", "UserBehavior.csv.gz")
PRICE_FILE = "item_prices.csv"


def find_taobao(root: Path) -> Path:
    """The UserBehavior file in ``root``."""
    for name in FILENAMES:
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise FileNotFoundError(
        f"taobao: neither {' nor '.join(FILENAMES)} in {root}; get UserBehavior.csv from "
        "https://tianchi.aliyun.com/dataset/649 (research use only) and put it there")


def load_taobao(root: Path, strict: bool = True, max_rows: int | None = None) -> Dataset:
    """Load the Taobao UserBehavior log from ``root``; ``max_rows`` = first lines only."""
    path = find_taobao(root)
    if max_rows is not None and max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    table = read_delimited(
        path,
        [Field("user_id", pl.Int64), Field("item_id", pl.Int64),
         Field("category_id", pl.Int64), Field("behavior_type"), Field("timestamp", pl.Int64)],
        separator=",", strict=strict, max_lines=max_rows)
    table = check_rows(table, [(
        ~pl.col("behavior_type").is_in(BEHAVIORS),
        pl.concat_str(pl.lit("column 'behavior_type': '"), pl.col("behavior_type"),
                      pl.lit(f"' is not one of {', '.join(BEHAVIORS)}")),
    )], strict=strict)
    frame = table.frame.rename({"behavior_type": "action"})
    events = normalize_events(frame)
    items = items_from_events(frame, "category_id")
    meta: dict[str, object] = {"events_file": path.name}
    prices = Path(root) / PRICE_FILE
    if prices.is_file():
        price = pl.read_csv(prices, schema={"item_id": pl.Int64, "price": pl.Float64})
        if price["item_id"].is_duplicated().any():
            raise ValueError(f"{prices}: an item_id is listed more than once")
        items = items.join(price, on="item_id", how="left", maintain_order="left")
        meta["prices_file"] = PRICE_FILE
    if max_rows is not None:
        meta["max_rows"] = max_rows
    record_skips(meta, (table,), strict=strict)
    return Dataset(
        name="taobao", events=events,
        items=items,
        users=users_from_events(events),
        feedback="implicit", meta=meta)
