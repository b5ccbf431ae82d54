"""files: the one atomic write and the one locked CSV appender."""

from __future__ import annotations

import pytest

from depthcompress.errors import TableError
from depthcompress.files import atomic_open, csv_appender, write_csv, write_json


def test_atomic_open_replaces_the_file_when_the_block_succeeds(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with atomic_open(path) as fh:
        fh.write("new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_open_keeps_the_old_file_and_no_temp_file_on_an_error(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(path, "wb") as fh:
        fh.write(b"half of the new")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_open_writes_nothing_on_an_error_when_there_was_no_file(tmp_path):
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "new.txt") as fh:
        fh.write("x")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_write_json_and_write_csv_go_through_the_atomic_write(tmp_path):
    write_json(tmp_path / "a.json", {"k": 1})
    write_csv(tmp_path / "a.csv", ("x", "y"), [(1, "2.5"), (3, "4")])
    assert (tmp_path / "a.json").read_text() == '{\n "k": 1\n}\n'
    assert (tmp_path / "a.csv").read_text() == "x,y\n1,2.5\n3,4\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.json"]


def test_csv_appender_writes_the_header_once(tmp_path):
    path = tmp_path / "rows.csv"
    with csv_appender(path, ("a", "b")) as append:
        append([1, 2])
    with csv_appender(path, ("a", "b")) as append:
        append([3, 4])
    assert path.read_text() == "a,b\n1,2\n3,4\n"


def test_csv_appender_refuses_a_second_writer_of_the_same_file(tmp_path):
    pytest.importorskip("fcntl")
    path = tmp_path / "rows.csv"
    with csv_appender(path, ("a",)) as append:
        append([1])
        refused = pytest.raises(TableError, match="another depthcompress run is writing")
        with refused, csv_appender(path, ("a",)):
            pass
        append([2])
    with csv_appender(path, ("a",)) as append:  # the lock is gone with the first writer
        append([3])
    assert path.read_text() == "a\n1\n2\n3\n"
