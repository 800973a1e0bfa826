"""benchmarks/bench_ops.py runs end to end on the CPU at tiny sizes and writes its JSON."""

from __future__ import annotations

import json

from tests.scripts import load_script

SCRIPT = "benchmarks/bench_ops.py"


def test_bench_ops_on_cpu_writes_the_json(cuda_ext, tmp_path):
    bench = load_script(SCRIPT)
    code = bench.main(
        [
            "--device",
            "cpu",
            "--channels",
            "5",
            "--feature-size",
            "7",
            "--mask-size",
            "19",
            "--batches",
            "2",
            "--ways",
            "1,2",
            "--shots",
            "1",
            "--dtypes",
            "float32,bfloat16",
            "--sampler-batches",
            "2",
            "--sampler-ways",
            "2",
            "--sampler-size",
            "8",
            "--warmup",
            "1",
            "--iterations",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "bench_ops_cpu.json").read_text())
    assert result["benchmark"] == "bench_ops" and result["device"]["device"] == "cpu"
    assert "torch" in result["versions"] and "origin" in result["extension"]
    pooling = result["pooling"]
    assert len(pooling) == 2 * 2 * 2  # dtypes x ways x passes
    for row in pooling:
        assert row["pass"] in ("forward", "forward_backward")
        assert row["M"] == row["batch"] * row["way"] * row["shot"]
        for impl in ("reference", "kernel"):
            stats = row[impl]
            assert stats["timer"] == "perf_counter" and stats["n"] == 3
            assert stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
        assert row["speedup"] > 0
        assert row["max_abs_diff"] < (1e-5 if row["dtype"] == "float32" else 5e-2)
        assert ("meets_target" in row) == (row["pass"] == "forward_backward")
    (sampler,) = result["sampler"]
    assert sampler["op"] == "sample_triplets" and sampler["speedup"] > 0
    assert sampler["kernel"]["n"] == 3 and sampler["target_speedup"] == 20.0
    summary = result["summary"]
    assert summary["pooling_forward_backward"]["rows"] == 4 and summary["sampler"]["rows"] == 1
