"""The delimited-text reader: types, line numbers, every error kind, lenient bookkeeping."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bstrec.data.reader import LINE, Field, read_delimited, read_lines, record_skips
from bstrec.data.schema import DataFormatError

RATINGS = [Field("user", pl.Int64), Field("item", pl.Int64), Field("rating", pl.Float64),
           Field("timestamp", pl.Int64)]


def write(path: Path, data: bytes | str) -> Path:
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def test_reads_typed_columns_with_a_multi_character_separator(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat", "1::10::5::978300760\n2::20::3.5::978300761\n")
    table = read_delimited(path, RATINGS, separator="::")
    assert table.frame.drop(LINE).to_dicts() == [
        {"user": 1, "item": 10, "rating": 5.0, "timestamp": 978300760},
        {"user": 2, "item": 20, "rating": 3.5, "timestamp": 978300761},
    ]
    assert table.frame.schema["timestamp"] == pl.Int64
    assert table.skipped == 0


def test_gzip_is_transparent(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat.gz", "1::10::5::978300760\n")
    assert read_delimited(path, RATINGS, separator="::").frame["item"].to_list() == [10]


def test_blank_lines_crlf_and_missing_final_newline_keep_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat", "\r\n1::1::5::1\r\n\r\n2::2::4::2\r\n\n3::x::4::3")
    with pytest.raises(DataFormatError) as err:
        read_delimited(path, RATINGS, separator="::")
    assert str(err.value) == f"{path}:6: column 'item': 'x' is not an integer"
    assert err.value.line == 6
    table = read_delimited(path, RATINGS, separator="::", strict=False)
    assert table.frame[LINE].to_list() == [2, 4]
    assert table.frame["timestamp"].to_list() == [1, 2]  # no "\r" left on the last field


def test_wrong_field_count_names_file_line_and_counts(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat", "1::1::5::1\n2::2::4\n")
    with pytest.raises(DataFormatError) as err:
        read_delimited(path, RATINGS, separator="::")
    assert str(err.value) == f"{path}:2: expected 4 fields, got 3"
    path = write(tmp_path / "s.dat", "1::1::5::1\n1::1::5::1\n1::1::5::1::9\n")
    with pytest.raises(DataFormatError, match=r"s\.dat:3: expected 4 fields, got 5"):
        read_delimited(path, RATINGS, separator="::")


def test_non_numeric_value_names_the_column_and_value(tmp_path: Path) -> None:
    path = write(tmp_path / "r.tsv", "1\t1\t5\t874965758\n1\t2\t4\t87496575x\n")
    with pytest.raises(DataFormatError) as err:
        read_delimited(path, RATINGS, separator="\t")
    assert str(err.value) == f"{path}:2: column 'timestamp': '87496575x' is not an integer"
    path = write(tmp_path / "f.tsv", "1\t1\tfive\t874965758\n")
    with pytest.raises(DataFormatError, match=r"f\.tsv:1: column 'rating': 'five' is not a num"):
        read_delimited(path, RATINGS, separator="\t")


def test_empty_value_in_a_required_column(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat", "1::1::5::1\n1::::5::1\n")
    with pytest.raises(DataFormatError, match=r"r\.dat:2: column 'item' is empty"):
        read_delimited(path, RATINGS, separator="::")


def test_nullable_column_gives_null(tmp_path: Path) -> None:
    path = write(tmp_path / "u.item", "1|Toy Story||x\n")
    fields = [Field("id", pl.Int64), Field("title"), Field("date", nullable=True), Field("url")]
    table = read_delimited(path, fields, separator="|")
    assert table.frame.row(0, named=True)["date"] is None


def test_numbers_may_carry_spaces(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "1, 2 ,5,  7\n")
    frame = read_delimited(path, RATINGS, separator=",").frame
    assert frame.row(0)[1:] == (1, 2, 5.0, 7)


def test_bad_encoding_names_the_line_and_byte(tmp_path: Path) -> None:
    path = write(tmp_path / "m.dat", b"1::Toy Story (1995)\n\n2::Mis\xe9rables (1995)\n")
    fields = [Field("id", pl.Int64), Field("title")]
    with pytest.raises(DataFormatError) as err:
        read_delimited(path, fields, separator="::")
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: invalid utf-8 byte 0xe9 at column 7")
    titles = read_delimited(path, fields, separator="::", encoding="latin-1").frame["title"]
    assert titles.to_list() == ["Toy Story (1995)", "Misérables (1995)"]


def test_bad_encoding_in_a_gzip_file(tmp_path: Path) -> None:
    path = write(tmp_path / "m.dat.gz", b"1::a\n2::\xff\xfe\n")
    with pytest.raises(DataFormatError, match=r"m\.dat\.gz:2: invalid utf-8 byte 0xff"):
        read_delimited(path, [Field("id", pl.Int64), Field("t")], separator="::")


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n\n  \n"])
@pytest.mark.parametrize("strict", [True, False])
def test_empty_file_is_an_error_in_both_modes(tmp_path: Path, content: bytes,
                                              strict: bool) -> None:
    path = write(tmp_path / "r.dat", content)
    with pytest.raises(DataFormatError) as err:
        read_delimited(path, RATINGS, separator="::", strict=strict)
    assert str(err.value) == f"{path}: empty file"


def test_empty_gzip_file(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat.gz", b"")
    with pytest.raises(DataFormatError, match="empty file"):
        read_lines(path)


def test_not_gzip_although_named_gz(tmp_path: Path) -> None:
    path = tmp_path / "r.dat.gz"
    path.write_bytes(b"1::1::5::1\n")
    with pytest.raises(DataFormatError, match="cannot read file"):
        read_lines(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_lines(tmp_path / "nope.dat")


def test_lenient_mode_skips_counts_and_keeps_the_first_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat", b"1::1::5::1\n1::1\n\n2::2::4::x\n3::\xff::4::3\n4::4::4::4\n")
    table = read_delimited(path, RATINGS, separator="::", strict=False)
    assert table.frame["user"].to_list() == [1, 4]
    assert table.skipped == 3
    assert table.first_problem == (2, "expected 4 fields, got 2")


def test_lenient_first_problem_may_be_an_encoding_error(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat", b"1::\xff::5::1\n1::1\n2::2::4::2\n")
    table = read_delimited(path, RATINGS, separator="::", strict=False)
    assert table.skipped == 2
    assert table.first_problem is not None
    assert table.first_problem[0] == 1
    assert table.first_problem[1].startswith("invalid utf-8 byte 0xff")


def test_lenient_with_every_row_bad_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "r.dat", "1::1\n2::2\n")
    with pytest.raises(DataFormatError, match=r"no valid rows: all 2 rows are bad \(first: "
                                              r"line 1: expected 4 fields, got 2\)"):
        read_delimited(path, RATINGS, separator="::", strict=False)


def test_record_skips_writes_meta_and_one_warning(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    bad = write(tmp_path / "bad.dat", "1::1::5::1\nx::1::5::1\n1::1\n")
    good = write(tmp_path / "good.dat", "1::1::5::1\n")
    tables = [read_delimited(p, RATINGS, separator="::", strict=False) for p in (bad, good)]
    meta: dict[str, object] = {}
    with caplog.at_level(logging.WARNING, logger="bstrec.data.reader"):
        record_skips(meta, tables, strict=False)
    assert meta == {"skipped_rows": {"bad.dat": 2, "good.dat": 0}}
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage() == (
        f"{bad}: skipped 2 bad rows (first: line 2: column 'user': 'x' is not an integer)")
    strict_meta: dict[str, object] = {}
    record_skips(strict_meta, tables, strict=True)
    assert strict_meta == {}


def test_header_and_fields_from_it(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "uid,iid,ts\n1,2,3\n\n4,5\n")
    with pytest.raises(DataFormatError, match=r"t\.csv:4: expected 3 fields, got 2"):
        read_delimited(path, None, separator=",", has_header=True)
    table = read_delimited(path, None, separator=",", has_header=True, strict=False)
    assert table.header == ("uid", "iid", "ts")
    assert table.frame.drop(LINE).rows() == [("1", "2", "3")]


def test_header_only_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "uid,iid,ts\n")
    with pytest.raises(DataFormatError, match="no data rows after the header"):
        read_delimited(path, None, separator=",", has_header=True)


def test_max_lines_reads_only_the_first_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv.gz", "".join(f"{i},1,1,1\n" for i in range(1000)) + "x\n")
    table = read_delimited(path, RATINGS, separator=",", max_lines=10)
    assert table.frame["user"].to_list() == list(range(10))


def test_utf8_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", b"\xef\xbb\xbf1,2,3,4\n")
    assert read_delimited(path, RATINGS, separator=",").frame["user"].to_list() == [1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["row", "blank", "crlf"]), min_size=1, max_size=30),
       st.data())
def test_reported_line_is_the_line_of_the_bad_row(tmp_path_factory: pytest.TempPathFactory,
                                                   kinds: list[str], data: st.DataObject) -> None:
    lines = ["1,2,3,4\r" if k == "crlf" else "" if k == "blank" else "1,2,3,4" for k in kinds]
    bad = data.draw(st.integers(0, len(lines)))
    lines.insert(bad, "1,2,oops,4")
    path = write(tmp_path_factory.mktemp("h") / "r.csv", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as err:
        read_delimited(path, RATINGS, separator=",")
    assert err.value.line == bad + 1
