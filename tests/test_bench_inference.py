"""benchmarks/bench_inference.py runs end to end on the CPU at a tiny size, so it cannot rot.

What is checked is the report, not the speed: every row of the table is either measured (with
positive timings, a floor fraction in (0, 1], label agreement where it applies) or says why not;
the targets are stated; the versions, the PNG chart and the markdown table are written. Kept
small to stay well under 30 s on two cores: small backbone, 48 x 48, C = 16, N in {1, 2}, B in
{1, 2}, two timed calls, one thread (an over-subscribed shared machine makes OpenMP's two-thread
barriers take milliseconds). torch.compile rows are skipped with --skip-variants (compiling takes
minutes on a CPU); ONNX rows run for N = 2 with FP32 graphs only (each export costs seconds);
the CUDA-only rows say "needs CUDA".
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_inference", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path, object]:
    bench = _load_bench()
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--device",
        "cpu",
        "--backbone",
        "small",
        "--size",
        "48",
        "--channels",
        "16",
        "--ways",
        "1,2",
        "--batches",
        "1,2",
        "--warmup",
        "1",
        "--iterations",
        "2",
        "--threads",
        "1",
        "--skip-variants",
        "*compile*",
        "--onnx-ways",
        "2",
        "--onnx-precisions",
        "fp32",
        "--out",
        str(out),
        "--engine-cache",
        str(out / "engines"),
    ]
    assert bench.main(argv) == 0
    payload = json.loads((out / "inference_cpu_48.json").read_text())
    return payload, out, bench


def test_every_row_is_measured_or_says_why(report) -> None:
    payload, _, bench = report
    rows = {(r["variant"], r["way"], r["batch"]): r for r in payload["rows"]}
    expected = {(v.name, w, b) for v in bench.VARIANTS for w in (1, 2) for b in (1, 2)}
    assert set(rows) == expected
    allowed = ("measured", "not measured: ", "not available: ", "skipped: ")
    for key, row in rows.items():
        assert row["status"].startswith(allowed), (key, row["status"], row.get("traceback"))
        assert not row["status"].startswith("failed"), (key, row.get("traceback"))
    measured = [r for r in rows.values() if r["status"] == "measured"]
    names = {r["variant"] for r in measured}
    # what a CPU run must measure: the paper's baseline, the decoders, naive, ONNX, end to end
    for name in (
        "full_eager_fp32",
        "naive_full_eager_fp32",
        "decoder_eager_fp32",
        "decoder_amp_fp16",
        "decoder_amp_bf16",
        "decoder_channels_last_fp16",
        "naive_decoder_eager_fp32",
        "ort_fp32",
        "e2e_torch",
        "e2e_runtime_ort",
    ):
        assert name in names, name
    if payload["availability"]["fast_decoder"] == "available":
        assert {"opt_eager_fp32", "opt_amp_fp16"} <= names
    else:
        assert rows[("opt_eager_fp32", 2, 1)]["status"].startswith("not available")
    for key in (("decoder_cudagraph_fp16", 2, 1), ("ort_fp32_cudagraph", 2, 1), ("trt_fp16", 2, 1)):
        assert rows[key]["status"] == "not measured: needs CUDA (this run is on the CPU)"
    assert rows[("decoder_compile_fp16", 2, 1)]["status"].startswith(
        "not measured: excluded by --variants"
    )
    assert rows[("ort_fp32", 1, 1)]["status"] == "not measured: N=1 not in --onnx-ways"
    assert rows[("ort_fp16", 2, 1)]["status"].startswith("not measured: fp16 graphs")


def test_measured_rows_have_timings_floors_and_agreement(report) -> None:
    payload, _, _ = report
    measured = [r for r in payload["rows"] if r["status"] == "measured"]
    assert len(measured) >= 30
    for row in measured:
        timing = row["timing"]
        assert timing["timer"] == "perf_counter"
        assert 0 < timing["p10_ms"] <= timing["median_ms"] <= timing["p90_ms"]
        assert timing["n"] >= 2
        assert row["frames_per_s"] == pytest.approx(1e3 * row["batch"] / timing["median_ms"])
        assert row["speedup_vs_full_eager"] > 0
        floor = row["floor"]
        assert floor["flops_per_frame"] > 0 and floor["bytes_per_call"] > 0
        assert 0 < floor["fraction"] <= 1, (row["variant"], floor)
        assert floor["bound"] in ("compute", "memory", "transfer")
        agreement = row["agreement"]
        if row["variant"].startswith("naive"):
            assert agreement["applies"] is False
        else:
            assert agreement["applies"] is True
            assert 0 <= agreement["identical_fraction"] <= 1
            assert agreement["threshold"] in (0.999, 0.995, 0.99)
            assert agreement["passed"] == (
                agreement["identical_fraction"] >= agreement["threshold"]
            )
    by_key = {(r["variant"], r["way"], r["batch"]): r for r in measured}
    # the same function: the full model, the FP32 decoders and ONNX Runtime FP32 agree exactly
    for name in (
        "full_eager_fp32",
        "decoder_eager_fp32",
        "ort_fp32",
        "e2e_runtime_ort",
        "e2e_torch",
    ):
        assert by_key[(name, 2, 1)]["agreement"]["identical_fraction"] >= 0.999, name
    # calibration makes the labels vary: agreement would otherwise be trivially perfect
    histogram = payload["model"]["per_way"]["2"]["flops_per_frame"]["reference_label_histogram"]
    assert sum(count > 0 for count in histogram) >= 2
    for comparison in payload["comparisons"]:
        assert comparison["ratio"] > 0
    assert any(
        c["naive"] == "naive_decoder_eager_fp32" and c["way"] == 2 for c in payload["comparisons"]
    )


def test_support_encoding_targets_versions_and_outputs(report) -> None:
    payload, out, _ = report
    supports = {(s["variant"], s["way"], s["shot"]): s for s in payload["support_encoding"]}
    for name in ("support_torch_fp32", "support_torch_amp_fp16"):
        for way in (1, 2):
            for shot in (1, 5):
                row = supports[(name, way, shot)]
                assert row["status"] == "measured" and row["timing"]["median_ms"] > 0
    assert supports[("support_runtime_ort", 2, 5)]["status"] == "measured"
    assert supports[("support_runtime_ort", 1, 1)]["status"].startswith("not measured")

    targets = payload["targets"]
    assert len(targets) == 6
    for target in targets:
        assert target["status"].startswith(("met", "not met", "not measured"))
        if target["value"] is not None:
            assert target["status"].startswith("not measured: the target is for an H100")
            assert math.isfinite(target["value"]) and target["value"] > 0
    assert payload["targets"][5]["status"] == "not measured: N=5 not in --ways"

    versions = payload["versions"]
    for package in ("python", "torch", "onnxruntime", "numpy"):
        assert versions[package]
    assert payload["device"]["device"] == "cpu" and payload["device"]["cpu"]
    assert payload["device"]["torch_threads"] == 1
    ceilings = payload["ceilings"]
    assert ceilings["matmul_tflops"]["fp32"] > 0
    assert ceilings["copy_gb_per_s"]["device_to_device"] > 0
    assert "random initialisation" in payload["model"]["weights"]

    png = out / "inference_cpu_48.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "inference_cpu_48.md").read_text()
    assert "| target | required | measured | status | row |" in markdown
    assert "`full_eager_fp32`" in markdown and "N=2 B=1" in markdown
    assert "not measured: needs CUDA" in markdown


def test_script_and_module_forms_are_one_command_line() -> None:
    """``python benchmarks/bench_inference.py`` (what the READMEs and gpu_check.sh run) and
    ``python -m benchmarks.inference`` (the package) take the same options."""
    root = BENCH.parents[1]
    helps = [
        subprocess.run(
            [sys.executable, *command, "--help"],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=300,
        )
        for command in ([str(BENCH)], ["-m", "benchmarks.inference"])
    ]
    for result in helps:
        assert result.returncode == 0, result.stderr
    options = [sorted(set(re.findall(r"--[a-z][a-z-]+", r.stdout))) for r in helps]
    assert options[0] == options[1]
    assert {"--device", "--variants", "--from-json", "--time-budget-s"} <= set(options[0])
    assert helps[1].stdout.startswith("usage: python -m benchmarks.inference")
