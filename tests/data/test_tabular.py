"""Generic CSV / Parquet logs through a column mapping."""

from __future__ import annotations

import gzip
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from bstrec.data.loaders import available, load_dataset
from bstrec.data.schema import DataFormatError
from bstrec.data.tabular import ColumnMapping, load_table

MAP = ColumnMapping(user_id="uid", item_id="iid", timestamp="ts")


def write(path: Path, text: str) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_mapping_parse() -> None:
    m = ColumnMapping.parse(["user_id=uid item_id=iid", "timestamp=ts", "value=rating"])
    assert m == ColumnMapping(user_id="uid", item_id="iid", timestamp="ts", value="rating")
    assert m.mapped() == {"user_id": "uid", "item_id": "iid", "timestamp": "ts",
                          "value": "rating"}
    with pytest.raises(ValueError, match="unknown key 'user'; known keys: user_id, item_id"):
        ColumnMapping.parse(["user=uid", "item_id=iid", "timestamp=ts"])
    with pytest.raises(ValueError, match="missing timestamp"):
        ColumnMapping.parse(["user_id=uid", "item_id=iid"])
    with pytest.raises(ValueError, match="expected KEY=COLUMN"):
        ColumnMapping.parse(["user_id", "item_id=iid", "timestamp=ts"])
    with pytest.raises(ValueError, match="given twice"):
        ColumnMapping.parse(["user_id=a", "user_id=b", "item_id=iid", "timestamp=ts"])


def test_csv_with_integer_ids_and_all_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,iid,ts,kind,score,eid,cat\n"
                                       "1,10,100,click,,e1,shoes\n"
                                       "2,11,101,buy,2.5,e2,\n"
                                       "1,11,102,click,1,e3,hats\n")
    mapping = ColumnMapping(user_id="uid", item_id="iid", timestamp="ts", action="kind",
                            value="score", event_id="eid", category="cat")
    ds = load_table(path, mapping)
    assert ds.name == "log" and ds.feedback == "implicit"
    assert ds.events.schema["user_id"] == pl.Int64 and ds.events.schema["item_id"] == pl.Int64
    assert ds.events.rows() == [(1, 10, 100, "click", None, "e1"), (2, 11, 101, "buy", 2.5, "e2"),
                                (1, 11, 102, "click", 1.0, "e3")]
    assert dict(ds.items.iter_rows()) == {10: "shoes", 11: "hats"}
    assert ds.users["user_id"].to_list() == [1, 2]


def test_string_ids_and_default_action(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv.gz", "uid,iid,ts\nu1,10,100\nu2,B0X,101\n")
    ds = load_table(path, MAP, feedback="explicit")
    assert ds.events.schema["user_id"] == pl.String and ds.events.schema["item_id"] == pl.String
    assert ds.events["action"].to_list() == ["interaction", "interaction"]
    assert ds.feedback == "explicit" and ds.name == "log"


def test_timestamp_format(tmp_path: Path) -> None:
    path = write(tmp_path / "log.tsv", "uid\tiid\tts\n1\t2\t2020-01-01 00:00:01\n"
                                       "1\t3\t2020-01-01T01:00:00+01:00\n")
    with pytest.raises(DataFormatError) as err:
        load_table(path, MAP, fmt="csv", separator="\t", timestamp_format="%Y-%m-%d %H:%M:%S")
    assert str(err.value) == (f"{path}:3: column 'ts': '2020-01-01T01:00:00+01:00' is not a "
                              "date in the format '%Y-%m-%d %H:%M:%S'")
    write(path, "uid\tiid\tts\n1\t2\t2020-01-01 00:00:01\n")
    ds = load_table(path, MAP, fmt="csv", separator="\t", timestamp_format="%Y-%m-%d %H:%M:%S")
    assert ds.events["timestamp"].to_list() == [1577836801]


def test_dates_without_format_are_an_error_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,iid,ts\n1,2,3\n1,2,2020-01-01\n")
    with pytest.raises(DataFormatError, match=r"log\.csv:3: column 'ts': '2020-01-01' is not an "
                                              r"integer unix timestamp \(for dates pass"):
        load_table(path, MAP)


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user,iid,ts\n1,2,3\n")
    with pytest.raises(DataFormatError) as err:
        load_table(path, MAP)
    assert str(err.value) == (f"{path}: no column 'uid' (for user_id); the columns are: "
                              "user, iid, ts")


def test_bad_rows_strict_and_lenient(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,iid,ts,score\n1,2,3,4\n\n,2,3,4\n1,2,3,x\n1,2\n"
                                       "5,6,7,8\n")
    mapping = ColumnMapping(user_id="uid", item_id="iid", timestamp="ts", value="score")
    # Strict: the file's shape is checked before the mapped values.
    with pytest.raises(DataFormatError) as err:
        load_table(path, mapping)
    assert str(err.value) == f"{path}:6: expected 4 fields, got 2"
    write(path, "uid,iid,ts,score\n1,2,3,4\n\n,2,3,4\n1,2,3,x\n")
    with pytest.raises(DataFormatError) as err:
        load_table(path, mapping)
    assert str(err.value) == f"{path}:4: column 'uid' (user_id) is empty"
    write(path, "uid,iid,ts,score\n1,2,3,4\n\n,2,3,4\n1,2,3,x\n1,2\n5,6,7,8\n")
    ds = load_table(path, mapping, strict=False)
    assert ds.events["user_id"].to_list() == [1, 5]
    assert ds.meta["skipped_rows"] == {"log.csv": 3}


def test_quoted_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", 'uid,iid,ts,title\n1,2,3,"a, b"\n"7",8,9,c\n'
                                     '1,2,x,"d"\n')
    with pytest.raises(DataFormatError, match=r"q\.csv:4: column 'ts': 'x' is not an integer"):
        load_table(path, MAP)
    write(path, 'uid,iid,ts,title\n1,2,3,"a, b"\n"7",8,9,c\n')
    ds = load_table(path, MAP)
    assert ds.events.select("user_id", "item_id", "timestamp").rows() == [(1, 2, 3), (7, 8, 9)]


def test_headerless_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "h.csv", "1;2;3\n4;5;6\n")
    mapping = ColumnMapping(user_id="column_1", item_id="column_2", timestamp="column_3")
    ds = load_table(path, mapping, separator=";", has_header=False)
    assert ds.events.select("user_id", "item_id", "timestamp").rows() == [(1, 2, 3), (4, 5, 6)]


def test_bad_encoding_and_empty_csv(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(b"uid,iid,ts\n1,2,3\n\xff,2,3\n")
    with pytest.raises(DataFormatError, match=r"e\.csv:3: invalid utf-8 byte 0xff"):
        load_table(path, MAP)
    path.write_bytes(b"")
    with pytest.raises(DataFormatError, match="empty file"):
        load_table(path, MAP, strict=False)


def test_parquet_with_datetime_and_string_ids(tmp_path: Path) -> None:
    frame = pl.DataFrame({
        "uid": ["a", "b"], "iid": [10, 11],
        "ts": [datetime(2020, 1, 1, 0, 0, 1), datetime(2020, 1, 1, 0, 0, 2)],
    })
    path = tmp_path / "log.parquet"
    frame.write_parquet(path)
    ds = load_table(path, MAP)
    assert ds.events.rows() == [("a", 10, 1577836801, "interaction", None, None),
                                ("b", 11, 1577836802, "interaction", None, None)]


def test_parquet_bad_row_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pl.DataFrame({"uid": [1, None, 3], "iid": [1, 2, 3], "ts": [1, 2, 3]}).write_parquet(path)
    with pytest.raises(DataFormatError) as err:
        load_table(path, MAP)
    assert str(err.value) == f"{path}: row 2: column 'uid' (user_id) is empty"
    assert load_table(path, MAP, strict=False).meta["skipped_rows"] == {"log.parquet": 1}


def test_unknown_suffix_needs_fmt(tmp_path: Path) -> None:
    path = write(tmp_path / "log.data", "uid,iid,ts\n1,2,3\n")
    with pytest.raises(ValueError, match="pass fmt="):
        load_table(path, MAP)
    assert load_table(path, MAP, fmt="csv").events.height == 1


def test_registry(tmp_path: Path) -> None:
    path = write(tmp_path / "log.txt", "uid|iid|ts\n1|2|3\n")
    assert available("csv", None, path)
    ds = load_dataset("csv", None, input_path=path, mapping=MAP, separator="|")
    assert ds.events.height == 1
    with pytest.raises(ValueError, match="unknown options sep "):
        load_dataset("csv", None, input_path=path, mapping=MAP, sep="|")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset("parquet", None, input_path=tmp_path / "x.parquet", mapping=MAP)


def test_quoted_csv_lenient_drops_bad_encoding_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes(b'uid,iid,ts,t\n1,2,3,"a"\n\n\xff,2,3,"b"\n4,5,6,"c"\n')
    with pytest.raises(DataFormatError, match=r"q\.csv:4: invalid utf-8 byte 0xff"):
        load_table(path, MAP)
    ds = load_table(path, MAP, strict=False)
    assert ds.events["user_id"].to_list() == [1, 4]
    assert ds.meta["skipped_rows"] == {"q.csv": 1}
