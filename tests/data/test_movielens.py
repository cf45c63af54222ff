"""MovieLens loaders on tiny fixtures and, when present, on the real files; and the registry."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from bstrec.data.loaders import DATASETS, available, load_dataset, resolve_data_dir
from bstrec.data.movielens import AGE_GROUPS, age_group, load_ml1m, load_ml100k
from bstrec.data.schema import DataFormatError, Dataset


def test_ml1m_tables(ml1m_dir: Path) -> None:
    ds = load_ml1m(ml1m_dir)
    assert ds.name == "ml-1m" and ds.feedback == "explicit"
    assert ds.user_features == ("gender", "age", "occupation", "zip1")
    assert ds.item_features == ("year",) and ds.item_multi_features == ("genres",)
    assert ds.events.schema == pl.Schema({
        "user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "action": pl.String,
        "value": pl.Float64, "event_id": pl.String})
    assert ds.events.row(0) == (1, 1, 978300760, "rating", 5.0, None)
    assert ds.events.height == 4
    items = {r["item_id"]: r for r in ds.items.to_dicts()}
    assert items[1]["category"] == "Animation"
    assert items[1]["genres"] == ["Animation", "Children's", "Comedy"]
    assert items[1001]["year"] == "1982"  # "(L'Associe)(1982)": the last (YYYY), no space
    assert items[2]["title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert items[3]["year"] == "unknown"
    users = {r["user_id"]: r for r in ds.users.to_dicts()}
    assert users[1] == {"user_id": 1, "gender": "F", "age": "1", "occupation": "10",
                        "zip": "48067", "zip1": "4"}
    assert users[3]["zip1"] == "V"
    assert ds.meta == {"ratings_file": "ratings.dat"}


def test_ml1m_prefers_the_full_ratings_file(tmp_path: Path, writers: Any) -> None:
    root = writers.ml1m(tmp_path / "ml-1m", "ratings_first2_users1-1.dat.gz")
    ds = load_ml1m(root)
    assert ds.meta["ratings_file"] == "ratings_first2_users1-1.dat.gz"
    assert ds.events.height == 4
    writers.text(root / "ratings.dat.gz", "1::1::4::1\n")
    assert load_ml1m(root).meta["ratings_file"] == "ratings.dat.gz"
    writers.text(root / "ratings.dat", "1::1::4::1\n2::2::2::2\n")
    ds = load_ml1m(root)
    assert ds.meta["ratings_file"] == "ratings.dat" and ds.events.height == 2


def test_ml1m_two_partial_ratings_files_are_ambiguous(tmp_path: Path,
                                                      writers: Any) -> None:
    root = writers.ml1m(tmp_path / "ml-1m", "ratings_a.dat")
    writers.text(root / "ratings_b.dat.gz", "1::1::4::1\n")
    with pytest.raises(FileNotFoundError, match="several ratings files"):
        load_ml1m(root)


def test_ml1m_missing_files_suggest_the_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bstrec data download ml-1m"):
        load_ml1m(tmp_path / "nowhere")
    (tmp_path / "ml-1m").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ratings\.dat not found"):
        load_ml1m(tmp_path / "ml-1m")


def test_ml1m_strict_error_names_file_and_line(ml1m_dir: Path) -> None:
    (ml1m_dir / "ratings.dat").write_text("1::1::5::978300760\n\n1::2::5::97830076O\n")
    with pytest.raises(DataFormatError) as err:
        load_ml1m(ml1m_dir)
    assert str(err.value) == (f"{ml1m_dir / 'ratings.dat'}:3: column 'timestamp': '97830076O' "
                              "is not an integer")


def test_ml1m_users_must_be_utf8(ml1m_dir: Path) -> None:
    (ml1m_dir / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::7\xe9072\n")
    with pytest.raises(DataFormatError, match=r"users\.dat:2: invalid utf-8 byte 0xe9"):
        load_ml1m(ml1m_dir)


def test_ml1m_duplicate_movie_is_an_error(ml1m_dir: Path) -> None:
    with (ml1m_dir / "movies.dat").open("ab") as fh:
        fh.write(b"1::Toy Story again (1995)::Comedy\n")
    with pytest.raises(DataFormatError, match=r"movies\.dat:5: duplicate item_id 1"):
        load_ml1m(ml1m_dir)


def test_ml1m_lenient_records_skipped_rows(ml1m_dir: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    (ml1m_dir / "ratings.dat").write_text("1::1::5::1\n1::2::5\nx::1::1::1\n2::2::4::2\n")
    with caplog.at_level(logging.WARNING):
        ds = load_ml1m(ml1m_dir, strict=False)
    assert ds.events["user_id"].to_list() == [1, 2]
    assert ds.meta["skipped_rows"] == {"ratings.dat": 2, "movies.dat": 0, "users.dat": 0}
    assert [r.getMessage() for r in caplog.records] == [
        f"{ml1m_dir / 'ratings.dat'}: skipped 2 bad rows (first: line 2: expected 4 fields, "
        "got 3)"]


def test_ml100k_tables(ml100k_dir: Path) -> None:
    ds = load_ml100k(ml100k_dir)
    assert ds.name == "ml-100k" and ds.feedback == "explicit"
    assert ds.events.height == 4
    assert ds.events.row(0) == (1, 1, 874965758, "rating", 5.0, None)
    items = {r["item_id"]: r for r in ds.items.to_dicts()}
    assert items[1]["genres"] == ["Animation", "Comedy"] and items[1]["category"] == "Animation"
    assert items[1]["year"] == "1995"
    assert items[2]["title"] == "Misérables, Les (1995)"
    assert items[3] == {"item_id": 3, "title": "unknown", "category": "unknown",
                        "genres": ["unknown"], "year": "unknown"}
    users = {r["user_id"]: r for r in ds.users.to_dicts()}
    assert users[1] == {"user_id": 1, "gender": "M", "age": "18", "occupation": "technician",
                        "zip": "85711", "zip1": "8"}
    assert users[2]["age"] == "50" and users[3]["age"] == "1" and users[3]["zip1"] == "T"
    assert ds.users.columns == ["user_id", "gender", "age", "occupation", "zip", "zip1"]
    assert ds.meta == {"ratings_file": "u.data"}


def test_ml100k_reads_gzipped_ratings(tmp_path: Path, writers: Any) -> None:
    root = writers.ml100k(tmp_path / "ml-100k", "u.data.gz")
    ds = load_ml100k(root)
    assert ds.events.height == 4 and ds.meta["ratings_file"] == "u.data.gz"


def test_ml100k_bad_genre_flag(ml100k_dir: Path) -> None:
    text = (ml100k_dir / "u.item").read_bytes().replace(b"|0|0|0|0\n", b"|0|0|0|2\n", 1)
    (ml100k_dir / "u.item").write_bytes(text)
    with pytest.raises(DataFormatError, match=r"u\.item:1: genre flag 'Western' is 2"):
        load_ml100k(ml100k_dir)


def test_ml100k_wrong_field_count_in_u_item(ml100k_dir: Path) -> None:
    with (ml100k_dir / "u.item").open("ab") as fh:
        fh.write(b"4|Broken (1996)|01-Jan-1996||http://x|0|1\n")
    with pytest.raises(DataFormatError) as err:
        load_ml100k(ml100k_dir)
    assert str(err.value) == f"{ml100k_dir / 'u.item'}:4: expected 24 fields, got 7"


def test_age_groups_match_ml1m_codes() -> None:
    ages = [7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73]
    got = pl.DataFrame({"a": ages}).select(age_group(pl.col("a")))["a"].to_list()
    assert got == ["1", "1", "18", "18", "25", "25", "35", "35", "45", "45", "50", "50", "56",
                   "56"]
    assert set(got) == {str(a) for a in AGE_GROUPS}


# --- the registry -------------------------------------------------------------------------


def test_registry_loads_from_data_dir_and_env(ml1m_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = ml1m_dir.parent
    assert "ml-1m" in DATASETS
    assert load_dataset("ml-1m", root).events.height == 4
    assert available("ml-1m", root) and not available("ml-100k", root)
    monkeypatch.setenv("BSTREC_DATA_DIR", str(root))
    assert resolve_data_dir(None) == root
    assert resolve_data_dir(Path("/elsewhere")) == Path("/elsewhere")
    assert load_dataset("ml-1m", None).name == "ml-1m"
    monkeypatch.delenv("BSTREC_DATA_DIR")
    assert resolve_data_dir(None) is None


def test_registry_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BSTREC_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="unknown dataset 'ml-20m'; choose from ml-1m, ml-100k"):
        load_dataset("ml-20m", tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("ml-100k", tmp_path)
    assert str(tmp_path / "ml-100k") in str(err.value)
    assert "bstrec data download ml-100k" in str(err.value)
    with pytest.raises(FileNotFoundError, match="BSTREC_DATA_DIR"):
        load_dataset("ml-1m", None)
    with pytest.raises(ValueError, match="unknown options max_row"):
        load_dataset("taobao", tmp_path, max_row=3)
    with pytest.raises(ValueError, match="needs input_path and a column mapping"):
        load_dataset("csv", tmp_path)
    assert available("synthetic-order", None)
    assert not available("csv", None)


def test_saved_dataset_round_trips(ml100k_dir: Path, tmp_path: Path) -> None:
    ds = load_ml100k(ml100k_dir)
    back = Dataset.load(ds.save(tmp_path / "out"))
    assert back.items.equals(ds.items) and back.users.equals(ds.users)


# --- the real files -----------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_ml1m(real_ml1m: Path) -> None:
    ds = load_ml1m(real_ml1m)
    assert (ds.events.height, ds.items.height, ds.users.height) == (487_650, 3_883, 6_040)
    assert ds.items.filter(pl.col("item_id") == 1001)["year"].item() == "1982"
    user1 = ds.users.filter(pl.col("user_id") == 1).row(0, named=True)
    assert (user1["gender"], user1["age"], user1["occupation"], user1["zip1"]) == \
        ("F", "1", "10", "4")
    assert ds.items["category"].n_unique() == 18
    assert (ds.items["year"] == "unknown").sum() == 0
    assert ds.events["value"].value_counts().sort("value")["count"].to_list() == \
        [27_472, 53_838, 127_216, 170_579, 108_545]
    assert ds.events["timestamp"].min() == 970_620_734
    assert set(ds.users["age"].unique()) == {str(a) for a in AGE_GROUPS}


@pytest.mark.shared_data
def test_real_ml100k(real_ml100k: Path) -> None:
    ds = load_ml100k(real_ml100k)
    assert (ds.events.height, ds.items.height, ds.users.height) == (100_000, 1_682, 943)
    assert ds.events["user_id"].n_unique() == 943
    assert ds.items.filter(pl.col("item_id") == 267)["year"].item() == "unknown"
    assert ds.items.filter(pl.col("item_id") == 1)["category"].item() == "Animation"
    assert set(ds.users["age"].unique()) == {str(a) for a in AGE_GROUPS}


@pytest.mark.shared_data
def test_real_ml1m_from_a_gzipped_full_name(real_ml1m: Path, tmp_path: Path) -> None:
    """The loader reads the real partial file whatever it is called (copied to tmp only)."""
    root = tmp_path / "ml-1m"
    root.mkdir()
    for name in ("movies.dat", "users.dat"):
        shutil.copy(real_ml1m / name, root / name)
    src = next(real_ml1m.glob("ratings*.dat*"))
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as fh:
        head = b"".join(next(fh) for _ in range(1000))
    (root / "ratings.dat.gz").write_bytes(gzip.compress(head))
    ds = load_ml1m(root)
    assert ds.events.height == 1000 and ds.meta["ratings_file"] == "ratings.dat.gz"


def test_registry_generates_synthetic_order() -> None:
    ds = load_dataset("synthetic-order", None, n_users=5, seed=1)
    assert ds.users.height == 5 and ds.events.height > 0
