"""Amazon 5-core reviews loader: both meta formats, bad lines, lenient mode."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from bstrec.data.amazon import load_amazon
from bstrec.data.loaders import available, load_dataset
from bstrec.data.schema import DataFormatError

REVIEWS = [
    {"reviewerID": "A1", "asin": "B001", "overall": 5.0, "unixReviewTime": 1400000000,
     "reviewText": "great", "helpful": [0, 0]},
    {"reviewerID": "A1", "asin": "B002", "overall": 3.0, "unixReviewTime": 1400000100},
    {"reviewerID": "A2", "asin": "B001", "overall": 4.0, "unixReviewTime": 1400000200,
     "style": {"Size:": " M"}},
    {"reviewerID": "A2", "asin": "B003", "overall": 1.0, "unixReviewTime": 1400000300},
]
# 2014 meta: Python literals (single quotes), categories = list of paths.
META_2014 = [
    "{'asin': 'B001', 'categories': [['Electronics', 'Audio', 'Headphones'], ['Sale']], "
    "'title': \"Bob's headphones\", 'salesRank': {'Electronics': 12}}",
    "{'asin': 'B002', 'categories': [['Electronics', 'Cables']], 'price': 3.5}",
]
# 2018 meta: strict JSON, category = one list.
META_2018 = [
    json.dumps({"asin": "B001", "category": ["Electronics", "Audio", "Headphones"]}),
    json.dumps({"asin": "B002", "category": []}),
    json.dumps({"asin": "B003", "category": ["Electronics", "Cables"], "title": "x"}),
]


def write(root: Path, name: str, lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode()
    path = root / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def reviews(root: Path, rows: list[dict[str, object]] | None = None,
            name: str = "Electronics_5.json") -> Path:
    return write(root, name, [json.dumps(r) for r in (rows or REVIEWS)])


def test_reviews_without_meta(tmp_path: Path) -> None:
    reviews(tmp_path)
    ds = load_amazon(tmp_path)
    assert ds.name == "amazon" and ds.feedback == "implicit"
    assert ds.events.schema["user_id"] == pl.String and ds.events.schema["item_id"] == pl.String
    assert ds.events.row(0) == ("A1", "B001", 1400000000, "review", 5.0, None)
    assert ds.items["item_id"].to_list() == ["B001", "B002", "B003"]
    assert ds.items["category"].null_count() == 3
    assert ds.users["user_id"].to_list() == ["A1", "A2"]
    assert ds.meta == {"reviews_file": "Electronics_5.json"}


def test_meta_2014_python_literals(tmp_path: Path) -> None:
    reviews(tmp_path, name="Electronics_5.json.gz")
    write(tmp_path, "meta_Electronics.json.gz", META_2014)
    ds = load_amazon(tmp_path)
    cats = dict(ds.items.select("item_id", "category").iter_rows())
    # Most specific entry of the FIRST path; B003 is not in meta -> null.
    assert cats == {"B001": "Headphones", "B002": "Cables", "B003": None}
    assert ds.meta["meta_file"] == "meta_Electronics.json.gz"


def test_meta_2018_json(tmp_path: Path) -> None:
    reviews(tmp_path)
    write(tmp_path, "meta_Electronics.json", META_2018)
    cats = dict(load_amazon(tmp_path).items.select("item_id", "category").iter_rows())
    assert cats == {"B001": "Headphones", "B002": None, "B003": "Cables"}


def test_meta_bad_line_names_file_and_line(tmp_path: Path) -> None:
    reviews(tmp_path)
    meta = write(tmp_path, "meta_Electronics.json", [*META_2014, "{'asin': 'B003', 'categ"])
    with pytest.raises(DataFormatError) as err:
        load_amazon(tmp_path)
    assert str(err.value).startswith(f"{meta}:3: neither JSON nor a Python literal")


def test_literal_eval_never_runs_code(tmp_path: Path) -> None:
    reviews(tmp_path)
    write(tmp_path, "meta_Electronics.json", ["{'asin': __import__('os').getcwd()}"])
    with pytest.raises(DataFormatError, match=r"meta_Electronics\.json:1: neither JSON"):
        load_amazon(tmp_path)


def test_invalid_json_review(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in REVIEWS]
    lines.insert(2, '{"reviewerID": "A3", "asin": ')
    path = write(tmp_path, "Books_5.json", lines)
    with pytest.raises(DataFormatError) as err:
        load_amazon(tmp_path)
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: invalid JSON: Expecting value")


@pytest.mark.parametrize(("bad", "problem"), [
    ({"reviewerID": "A3", "asin": "B9", "overall": 2.0}, "missing field 'unixReviewTime'"),
    ({"reviewerID": "A3", "overall": 2.0, "unixReviewTime": 1}, "missing field 'asin'"),
    ({"reviewerID": "A3", "asin": "B9", "overall": 2.0, "unixReviewTime": "soon"},
     "field 'unixReviewTime': 'soon' is not an integer"),
    ({"reviewerID": "A3", "asin": "B9", "overall": "good", "unixReviewTime": 5},
     "field 'overall': 'good' is not a number"),
])
def test_bad_review_fields(tmp_path: Path, bad: dict[str, object], problem: str) -> None:
    path = reviews(tmp_path, [*REVIEWS[:3], bad, REVIEWS[3]])
    with pytest.raises(DataFormatError) as err:
        load_amazon(tmp_path)
    assert str(err.value) == f"{path}:4: {problem}"


def test_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path, "x_5.json", [json.dumps(REVIEWS[0]), "[1, 2]"])
    with pytest.raises(DataFormatError, match=r"x_5\.json:2: not a JSON object but list"):
        load_amazon(tmp_path)
    assert path.exists()


def test_numeric_strings_are_accepted_on_the_slow_path(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        *REVIEWS, {"reviewerID": "A3", "asin": "B1", "overall": "4", "unixReviewTime": "7"}]
    reviews(tmp_path, rows)
    ds = load_amazon(tmp_path)
    assert ds.events.row(4) == ("A3", "B1", 7, "review", 4.0, None)


def test_lenient_skips_and_counts(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in REVIEWS]
    lines[1:1] = ["not json", json.dumps({"asin": "B1"}), ""]
    write(tmp_path, "Books_5.json", lines)
    write(tmp_path, "meta_Books.json", [*META_2014, "nonsense("])
    ds = load_amazon(tmp_path, strict=False)
    assert ds.events.height == 4
    assert ds.meta["skipped_rows"] == {"Books_5.json": 2, "meta_Books.json": 1}


def test_lenient_missing_field_on_the_fast_path(tmp_path: Path) -> None:
    reviews(tmp_path, [*REVIEWS, {"reviewerID": "A3", "asin": "B9", "overall": 2.0}])
    ds = load_amazon(tmp_path, strict=False)
    assert ds.events.height == 4
    assert ds.meta["skipped_rows"] == {"Electronics_5.json": 1}


def test_files_found_or_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no 5-core reviews file"):
        load_amazon(tmp_path)
    reviews(tmp_path)
    reviews(tmp_path, name="Books_5.json")
    with pytest.raises(FileNotFoundError, match="several reviews files"):
        load_amazon(tmp_path)


def test_registry(tmp_path: Path) -> None:
    reviews(tmp_path / "amazon")
    assert available("amazon", tmp_path)
    assert load_dataset("amazon", tmp_path).events.height == 4


def test_empty_reviews_file(tmp_path: Path) -> None:
    (tmp_path / "Books_5.json").write_bytes(b"\n")
    with pytest.raises(DataFormatError, match=r"Books_5\.json: empty file"):
        load_amazon(tmp_path, strict=False)
