"""The command lines of export/to_trt.py, benchmarks/bench_runtime.py and
benchmarks/count_flops.py, end to end at tiny sizes on the CPU."""

from __future__ import annotations

import json
import sys

import pytest

from tests.scripts import load_script


def test_to_trt_help_and_the_install_hint_without_tensorrt(
    varied_export, monkeypatch, capsys
) -> None:
    to_trt = load_script("export/to_trt.py")
    with pytest.raises(SystemExit) as exit_:
        to_trt.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--onnx-dir",
        "--fp16",
        "--precision",
        "--max-batch",
        "--opt-batch",
        "--workspace-gb",
    ):
        assert option in text
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing tensorrt now fails
    engines, _, _ = varied_export(2, 1)
    assert to_trt.main(["--onnx-dir", str(engines), "--fp16"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0], captured.err
    assert "pip install tensorrt" in lines[0] and "Traceback" not in captured.err
    assert not list(engines.glob("*.engine"))  # nothing was written


def test_bench_runtime_writes_its_json(varied_export, tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("onnxruntime")
    bench = load_script("benchmarks/bench_runtime.py")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)  # not the repository's results folder
    engines, checkpoint, _ = varied_export(2, 1)
    assert (
        bench.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--engines",
                str(engines),
                "--frame-size",
                "40",
                "56",
                "--warmup",
                "1",
                "--iterations",
                "3",
                "--name",
                "tiny",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["benchmark"] == "bench_runtime" and result["frame"] == [40, 56]
    assert result["runtime_backend"] == "onnxruntime-cpu (fp32)"
    assert result["model"] == {
        "backbone": "small",
        "way": 2,
        "shot": 1,
        "input_size": 48,
        "channels": 16,
    }
    assert set(result["results"]) == {
        "torch_full",
        "torch_cached",
        "runtime_segment",
        "runtime_decoder",
    }
    for stats in result["results"].values():
        assert (
            stats["iterations"] == 3
            and 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
        )
    assert f"wrote {tmp_path / 'tiny.json'}" in capsys.readouterr().out


def test_count_flops_writes_its_json(tmp_path, capsys) -> None:
    counter = load_script("benchmarks/count_flops.py")
    out = tmp_path / "flops.json"
    assert (
        counter.main(
            [
                "--backbone",
                "small",
                "--size",
                "48",
                "--channels",
                "16",
                "--ways",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["config"]["backbone"] == "small" and result["config"]["size"] == 48
    rows = {row["way"]: row for row in result["counts"]}
    assert set(rows) == {1, 2}  # the 1-way model is counted for the naive baseline
    for row in rows.values():
        assert row["folded"]["total"] > 0 and row["eager"]["total"] > 0
    # N x 1-way repeats the backbone: more work than one 2-way pass
    assert rows[2]["ratios"]["naive_cached / eager"] > 1
    assert "N=2:" in capsys.readouterr().out
