"""Taobao UserBehavior loader on a small fixture."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from bstrec.data.loaders import available, load_dataset
from bstrec.data.schema import DataFormatError
from bstrec.data.taobao import load_taobao

ROWS = (
    "1,2268318,2520377,pv,1511544070\n"
    "1,2333346,2520771,pv,1511561733\n"
    "1,2268318,2520377,buy,1511572885\n"
    "2,3830808,4181361,cart,1511593493\n"
    "2,2333346,2520771,fav,1511596146\n"
)


def folder(tmp_path: Path, text: str = ROWS, name: str = "UserBehavior.csv") -> Path:
    root = tmp_path / "taobao"
    root.mkdir(parents=True)
    data = text.encode()
    (root / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return root


def test_loads_events_items_users(tmp_path: Path) -> None:
    ds = load_taobao(folder(tmp_path))
    assert ds.name == "taobao" and ds.feedback == "implicit"
    assert ds.events.columns == ["user_id", "item_id", "timestamp", "action", "value", "event_id"]
    assert ds.events.row(2) == (1, 2268318, 1511572885, "buy", None, None)
    assert ds.events["action"].to_list() == ["pv", "pv", "buy", "cart", "fav"]
    assert ds.items.schema["category"] == pl.String
    assert dict(ds.items.select("item_id", "category").iter_rows()) == {
        2268318: "2520377", 2333346: "2520771", 3830808: "4181361"}
    assert ds.users["user_id"].to_list() == [1, 2]


def test_gzip_and_max_rows(tmp_path: Path) -> None:
    ds = load_taobao(folder(tmp_path, name="UserBehavior.csv.gz"), max_rows=2)
    assert ds.events.height == 2 and ds.meta["max_rows"] == 2


def test_unknown_behavior_is_a_bad_row(tmp_path: Path) -> None:
    root = folder(tmp_path, ROWS + "3,1,1,click,1511596146\n")
    with pytest.raises(DataFormatError) as err:
        load_taobao(root)
    assert str(err.value) == (f"{root / 'UserBehavior.csv'}:6: column 'behavior_type': 'click' "
                              "is not one of pv, buy, cart, fav")
    ds = load_taobao(root, strict=False)
    assert ds.events.height == 5
    assert ds.meta["skipped_rows"] == {"UserBehavior.csv": 1}


def test_non_numeric_timestamp_and_short_row(tmp_path: Path) -> None:
    root = folder(tmp_path, ROWS + "3,1,1,pv,15115961x6\n")
    with pytest.raises(DataFormatError, match=r"UserBehavior\.csv:6: column 'timestamp': "
                                              r"'15115961x6' is not an integer"):
        load_taobao(root)
    root2 = folder(tmp_path / "b", "3,1,1,pv\n" + ROWS)
    with pytest.raises(DataFormatError, match=r"UserBehavior\.csv:1: expected 5 fields, got 4"):
        load_taobao(root2)


def test_missing_file_and_registry(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"UserBehavior\.csv"):
        load_taobao(tmp_path)
    folder(tmp_path)
    assert available("taobao", tmp_path)
    assert load_dataset("taobao", tmp_path, max_rows=3).events.height == 3
