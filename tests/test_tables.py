"""The DP's tables: the reference CSV layouts, round trips, and clear errors naming file, line
and problem for malformed or inconsistent files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from depthcompress import Plan, TableError
from depthcompress.dp import extended_importance, solve
from depthcompress.errors import DepthCompressError, PlanError
from depthcompress.tables import (
    ExtendedImportanceTable,
    ImportanceTable,
    LatencyTable,
    OptimalLatencyTable,
    read_importance,
    read_latency,
)

REFERENCE = Path(__file__).resolve().parent / "data"
"""The published reference tables (Kim et al., ICML 2023), vendored: see data/README.md."""
TIME_CSV = "kim2023_mbv2_w1.0_rtx2080ti_trt_time.csv"
OPT_CSV = "kim2023_mbv2_w1.0_rtx2080ti_trt_opt_time.csv"

LATENCY = """id,st,end,time,stdev
0,0,1,1.5,0.1
1,0,2,2.0,0.2
2,1,2,1.0,0.1
3,2,3,0.5,0.05
"""
IMPORTANCE = """id,st,end,st_act,end_act,train_loss,val_acc
0,0,1,1,1,0.1,-0.5
1,0,2,1,1,0.2,-1.5
2,1,2,1,1,0.1,-0.25
3,1,2,1,0,0.1,-0.75
4,2,3,0,1,0.3,-0.5
5,2,3,1,1,0.3,-0.25
"""


def reference_path(name: str) -> Path:
    return REFERENCE / name


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_the_reference_tables():
    lat = LatencyTable.read_csv(reference_path(TIME_CSV))
    opt = OptimalLatencyTable.read_csv(reference_path(OPT_CSV))
    assert len(lat) == len(opt) == 171
    assert lat.num_positions == opt.num_positions == 50
    assert lat.blocks[:3] == ((0, 1), (0, 2), (0, 3))
    assert opt.breaks_of(0, 4) == (0, 1, 2, 4)
    singles = sum(lat.time_of(p - 1, p) for p in range(1, 51))
    assert singles == pytest.approx(33.67, abs=0.01)
    assert isinstance(read_latency(reference_path(OPT_CSV)), OptimalLatencyTable)
    assert isinstance(read_latency(reference_path(TIME_CSV)), LatencyTable)


def test_tables_round_trip(tmp_path):
    lat = LatencyTable.read_csv(reference_path(TIME_CSV))
    lat.write_csv(tmp_path / "t.csv")
    again = LatencyTable.read_csv(tmp_path / "t.csv")
    assert again.blocks == lat.blocks and (again.time == lat.time).all()
    assert (again.stdev == lat.stdev).all() and (again.ids == lat.ids).all()

    opt = OptimalLatencyTable.read_csv(reference_path(OPT_CSV))
    opt.write_csv(tmp_path / "o.csv")
    text = (tmp_path / "o.csv").read_text().splitlines()
    assert text[0] == "id,st,end,time,stdev,breaks"
    assert text[1] == '0,0,1,1.1677890269160272,0.014109617934365,"0,1"'
    again = OptimalLatencyTable.read_csv(tmp_path / "o.csv")
    assert again.breaks == opt.breaks and (again.time == opt.time).all()

    imp = ImportanceTable.read_csv(write(tmp_path, "i.csv", IMPORTANCE))
    imp.write_csv(tmp_path / "i2.csv")
    assert (tmp_path / "i2.csv").read_text().splitlines()[:2] == [
        "st,end,st_act,end_act,val_acc",
        "0,1,1,1,-0.5",
    ]
    again = ImportanceTable.read_csv(tmp_path / "i2.csv")
    assert again.keys == imp.keys and (again.score == imp.score).all()

    ext = extended_importance(imp, alpha=1.6)
    ext.write_csv(tmp_path / "e.csv")
    back = read_importance(tmp_path / "e.csv")
    assert isinstance(back, ExtendedImportanceTable)
    assert back.keys == ext.keys and (back.value == ext.value).all()
    assert back.breaks == ext.breaks


def test_importance_score_column_is_chosen_by_the_user(tmp_path):
    path = write(tmp_path, "imp.csv", IMPORTANCE)
    assert ImportanceTable.read_csv(path).score[0] == -0.5
    by_loss = ImportanceTable.read_csv(path, score="train_loss")
    assert by_loss.score_name == "train_loss" and by_loss.score[0] == 0.1
    with pytest.raises(TableError) as err:
        ImportanceTable.read_csv(path, score="val_top1")
    message = str(err.value)
    assert f"{path}:1" in message and "val_top1" in message
    assert "--score" in message and "train_loss, val_acc" in message


def test_reads_a_project_importance_table_with_extra_columns(tmp_path):
    text = "st,end,st_act,end_act,val_acc,val_loss,train_loss,steps,seconds\n"
    text += "0,1,1,1,-0.5,0.1,nan,0,0.5\n1,2,1,1,-0.25,0.1,nan,0,0.5\n"
    imp = ImportanceTable.read_csv(write(tmp_path, "imp.csv", text))
    assert imp.keys == ((0, 1, 1, 1), (1, 2, 1, 1))


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(TableError) as err:
        call(*args, **kwargs)
    return str(err.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("id,st,end,time\n0,0,1,1.0\n", r":1: missing column\(s\) stdev; .*id,st,end,time,stdev"),
        (LATENCY.replace("1,0,2,2.0", "1,0,2,nan"), r":3: time is nan"),
        (LATENCY.replace("1,0,2,2.0,0.2", "1,0,2,,0.2"), r":3: time is '', not a number"),
        (LATENCY.replace("1,0,2,2.0", "1,0,2,-2.0"), r":3: time is negative \(-2\); "),
        (LATENCY + "4,0,2,3.0,0.1\n", r":6: block \(st, end\) \(0, 2\) is listed twice .*:3\)"),
        (LATENCY.replace("3,2,3,", "2,2,3,"), r":5: id 2 is listed twice"),
        (LATENCY + "4,3,3,1.0,0.1\n", r":6: span st=3, end=3 refers to positions that do not"),
        (LATENCY + "4,-1,2,1.0,0.1\n", r":6: span st=-1, end=2"),
        (LATENCY.replace("2,1,2,1.0,0.1", "2,1,2,1.0"), r":4: no value for column stdev"),
        (LATENCY.replace("2,1,2,", "2,1,x,"), r":4: end is 'x', not an integer"),
        (LATENCY.replace("2,1,2,1.0,0.1\n", ""), r"single-conv block\(s\) \(1, 2\).*incomplete"),
        ("", r"the file is empty"),
        ("id,st,end,time,stdev\n", r"header but no rows"),
    ],
)
def test_malformed_latency_tables_name_file_line_and_problem(tmp_path, text, pattern):
    path = write(tmp_path, "lat.csv", text)
    message = error_of(LatencyTable.read_csv, path)
    assert str(path) in message
    assert re.search(pattern, message), message


def test_messages_show_numbers_not_numpy_reprs(tmp_path):
    """A value read into numpy appears as a plain number in the message, as in the file."""
    message = error_of(
        LatencyTable.read_csv, write(tmp_path, "lat.csv", LATENCY.replace("1,0,2,2.0", "1,0,2,-1"))
    )
    assert "negative (-1)" in message and "np." not in message, message
    with pytest.raises(DepthCompressError) as err:
        solve(
            LatencyTable.read_csv(write(tmp_path, "ok.csv", LATENCY)),
            ImportanceTable.read_csv(write(tmp_path, "imp.csv", IMPORTANCE)),
            np.float64(np.nan),
        )
    assert "got nan" in str(err.value) and "np." not in str(err.value), str(err.value)
    with pytest.raises(PlanError) as err:
        Plan(activations=[np.float64(1.0)], boundaries=[1])
    assert "got 1.0" in str(err.value) and "np." not in str(err.value), str(err.value)


def test_missing_file_is_named(tmp_path):
    assert "latency table" in error_of(LatencyTable.read_csv, tmp_path / "nope.csv")
    assert "nope.csv does not exist" in error_of(ImportanceTable.read_csv, tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("st,end,st_act,val_acc\n0,1,1,0.0\n", r":1: missing column\(s\) end_act"),
        (IMPORTANCE.replace("0,0,1,1,1,0.1,-0.5", "0,0,1,1,1,0.1,nan"), r":2: val_acc is nan"),
        (IMPORTANCE + "6,1,2,1,0,0.1,-0.5\n", r":8: extended block .*\(1, 2, 1, 0\).*:5\)"),
        (IMPORTANCE + "6,0,3,0,1,0.1,-0.5\n", r":8: st_act is 0 at position 0"),
        (IMPORTANCE + "6,1,3,2,1,0.1,-0.5\n", r":8: st_act is 2; flags are 0 or 1"),
        (IMPORTANCE + "6,3,1,1,1,0.1,-0.5\n", r":8: span st=3, end=1"),
    ],
)
def test_malformed_importance_tables_name_file_line_and_problem(tmp_path, text, pattern):
    path = write(tmp_path, "imp.csv", text)
    message = error_of(ImportanceTable.read_csv, path)
    assert str(path) in message
    assert re.search(pattern, message), message


def test_malformed_optimal_latency_breaks(tmp_path):
    text = 'id,st,end,time,stdev,breaks\n0,0,1,1.0,0.1,"0,1"\n1,1,2,1.0,0.1,"1,3"\n'
    path = write(tmp_path, "opt.csv", text)
    assert re.search(r":3: breaks 1,3 must run from st=1 to end=2", error_of(read_latency, path))
    path = write(tmp_path, "opt.csv", text.replace('"1,3"', '"1,a"'))
    assert re.search(r":3: breaks is '1,a', not a comma list", error_of(read_latency, path))


def test_latency_and_importance_over_different_positions(tmp_path):
    lat_path = write(tmp_path, "lat.csv", LATENCY)
    lat = LatencyTable.read_csv(lat_path)
    more = write(tmp_path, "imp.csv", IMPORTANCE + "6,3,4,1,1,0.1,-0.5\n")
    message = error_of(solve, lat, ImportanceTable.read_csv(more), 10.0)
    assert f"{more}:8" in message and str(lat_path) in message and "0..3" in message
    fewer = write(tmp_path, "imp2.csv", "".join(IMPORTANCE.splitlines(True)[:4]))
    message = error_of(solve, lat, ImportanceTable.read_csv(fewer), 10.0)
    assert str(fewer) in message and "different positions" in message
    missing = write(tmp_path, "imp3.csv", IMPORTANCE + "6,1,3,1,1,0.1,-0.5\n")
    message = error_of(solve, lat, ImportanceTable.read_csv(missing), 10.0)
    assert re.search(r"imp3\.csv:8: block \(1, 3\) has no row in the latency table", message)


def test_tables_are_read_only_data():
    lat = LatencyTable.from_rows([(0, 1, 1.0, 0.0), (1, 2, 2.0, 0.0)])
    with pytest.raises(ValueError, match="read-only"):
        lat.time[0] = 5.0
    with pytest.raises(AttributeError):
        lat.source = "x"  # type: ignore[misc]
    assert lat.time_of(1, 2) == 2.0 and lat.index[(1, 2)] == 1
    assert isinstance(lat.time, np.ndarray) and lat.time.dtype == np.float64
