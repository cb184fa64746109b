"""The retention benchmark measures what it says, at a small shape (benchmarks/lora_retention.py)."""

from __future__ import annotations

import pytest

from benchmarks.lora_retention import STRENGTHS, markdown, measure
from wanlora.weights.gguf import qtypes

pytestmark = pytest.mark.slow  # a benchmark run, at its smallest


def test_the_retention_table_measures_each_way_at_each_strength():
    table = measure(256, 512, rows=64, tokens=4, repeats=1, types=(qtypes.Q8_0, qtypes.Q4_K))
    rows = {(row.format, row.way): row for row in table}
    assert list(rows) == [
        ("bf16", "merge"),
        ("fp8 e4m3", "round to nearest"),
        ("fp8 e4m3", "stochastic"),
        *[(kind, way) for kind in ("Q8_0", "Q4_K") for way in ("requantize", "unfused", "promote bf16", "promote fp8")],
    ]
    for kind in ("Q8_0", "Q4_K"):
        for strength in STRENGTHS:
            kept, noise, psnr = rows[(kind, "unfused")].kept[strength]
            assert abs(kept - 1) < 1e-4 and noise < 1e-4 and psnr > 120  # the LoRA's part exact
            assert abs(rows[(kind, "promote bf16")].kept[strength][0] - 1) < 0.01
    # a file's W0 sits on its grid: rounding a small change to nearest gives most of it back; at 10% it stays
    assert rows[("Q4_K", "requantize")].kept[0.01][0] < 0.3 < 0.7 < rows[("Q4_K", "requantize")].kept[0.10][0]
    assert rows[("Q8_0", "requantize")].kept[0.10][0] > 0.95
    assert abs(rows[("fp8 e4m3", "stochastic")].kept[0.01][0] - 1) < abs(
        rows[("fp8 e4m3", "round to nearest")].kept[0.01][0] - 1
    )
    assert rows[("Q4_K", "requantize")].bytes_per_weight == 4.5 / 8
    assert rows[("Q4_K", "unfused")].bytes_per_weight == 4.5 / 8 + 32 * (256 + 512) * 2 / (256 * 512)
    lines = markdown(table).splitlines()
    assert len(lines) == 2 + len(table) and lines[0].startswith("| shape | format | way | bytes/weight | step ms")
