"""What the benchmark scripts share (benchmarks/common.py): the per-round
rows, the columns their tables print and the JSON they write."""

import json
import os

import keras
import tensorflow as tf

from benchmarks import common


def _rows():
    times = {"sgd": [2.0, 4.0, 3.0], "clars": [3.0, 5.0, 6.0]}
    cpu_times = {"sgd": [1.0, 1.0, 1.0], "clars": [2.0, 2.0, 2.0]}
    shares = {"sgd": [0.5, 0.9, 0.7], "clars": [0.4, 0.8, 0.6]}
    return common.per_round_rows(times, cpu_times, shares, "sgd")


def test_rows_hold_the_ratio_to_the_unit_in_the_same_round():
    rows = _rows()
    assert rows["clars"] == {"seconds": [3.0, 5.0, 6.0],
                             "cpu_seconds": [2.0, 2.0, 2.0],
                             "cpu_share": [0.4, 0.8, 0.6],
                             "ratios": [1.5, 1.25, 2.0]}
    assert rows["sgd"]["ratios"] == [1.0, 1.0, 1.0]


def test_ratio_columns_print_median_range_and_cpu_share():
    # Widths 6, 5..<5 and 5, as under the tables' headers.
    assert common.ratio_columns(_rows()["clars"]) == (
        "  1.50  1.25..2.00   0.60")


def test_results_are_written_beside_the_environment(tmp_path):
    path = tmp_path / "out.json"
    common.write_results(str(path), {"batch_size": 64}, candidates=_rows())
    written = json.loads(path.read_text())
    assert written["candidates"] == _rows()
    environment = written["environment"]
    assert environment["batch_size"] == 64
    assert environment["tensorflow"] == tf.__version__
    assert environment["keras"] == keras.__version__
    assert environment["cpu_count"] == os.cpu_count()
