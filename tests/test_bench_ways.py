"""benchmarks/bench_ways.py trains a way-flexible and dedicated models at a tiny size, scores
them at several n (the 2-way model in groups too) and writes its JSON and table."""

from __future__ import annotations

import json

from tests.scripts import load_script

TINY = (
    "--episodes-per-epoch 16 --batch-size 4 --pml-start-epoch 0 --visuals 0 --workers 0 "
    "--image-size 48"
)


def test_ways_benchmark_runs_at_a_tiny_size(tmp_path, capsys) -> None:
    bench = load_script("benchmarks/bench_ways.py")
    argv = [
        "--epochs", "1", "--max-way", "3", "--ways", "1", "--grouped", "3",
        "--eval-runs", "1", "--eval-episodes", "6", "--train-args", TINY, "--out", str(tmp_path),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    payload = json.loads((tmp_path / "ways_synthetic.json").read_text())
    results = payload["results"]
    assert set(results["dedicated"]) == {"1"} and set(results["flexible"]) == {"1"}
    assert set(results["grouped"]) == {"3"}
    assert "--group-classes" in results["grouped"]["3"]["command"]
    assert "--max-way 3" in payload["training"]["flexible"]["command"]
    for row in (results["dedicated"]["1"], results["flexible"]["1"], results["grouped"]["3"]):
        assert all(0.0 <= row[f"{m}_mean"] <= 1.0 for m in ("miou_star", "miou", "fbiou"))
    table = capsys.readouterr().out
    assert "| 1 | " in table and "| 3 | - | - | " in table
