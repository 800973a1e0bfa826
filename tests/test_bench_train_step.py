"""benchmarks/bench_train_step.py times both memory layouts on the same batches and writes its
JSON."""

from __future__ import annotations

import json

from tests.scripts import load_script


def test_bench_train_step_times_both_layouts_and_writes_the_json(tmp_path, capsys):
    bench = load_script("benchmarks/bench_train_step.py")
    code = bench.main(
        ["--rounds", "2", "--steps", "2", "--warmup", "1", "--image-size", "48"]
        + ["--out", str(tmp_path)]
    )
    assert code == 0
    (path,) = tmp_path.glob("train_step_*.json")
    payload = json.loads(path.read_text())
    layouts = payload["layouts"]
    assert set(layouts) == {"channels_last", "contiguous"}
    for cell in layouts.values():
        assert cell["n"] == 4 and 0 < cell["p10_ms"] <= cell["median_ms"] <= cell["p90_ms"]
    assert layouts["contiguous"]["ratio_to_contiguous"] == 1.0
    assert payload["settings"]["threads"] == 1 and payload["versions"]["torch"]
    assert "| channels_last |" in capsys.readouterr().out
    assert bench.main(["--steps", "0", "--out", str(tmp_path)]) == 2
