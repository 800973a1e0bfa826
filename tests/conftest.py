"""Shared fixtures: a tiny CPU configuration of the default preset; exports of tiny models whose
labels vary (once per session); the compiled extension."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from mfnet.config import Config, preset

ROOT = Path(__file__).resolve().parents[1]
try:  # installed with mfnet (`pip install -e .`); from a bare checkout, take it from cuda_ext/
    import mfnet_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "cuda_ext"))


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    """The synthetic-cpu preset shrunk to run in about a second (PML on from the first epoch), on
    the CPU even where a GPU exists."""
    return preset("synthetic-cpu").replace(
        device="cpu",
        image_size=48,
        channels=16,
        epochs=1,
        episodes_per_epoch=16,
        batch_size=4,
        workers=0,
        pml_start_epoch=0,
        eval_runs=2,
        eval_episodes=6,
        eval_batch_size=3,
        out=str(tmp_path / "run"),
    )


@pytest.fixture(scope="session")
def varied_export(tmp_path_factory):
    """``get(way, shot=1, size=48, precisions=("fp32",))`` -> (engine_dir, checkpoint, manifest):
    the verified ONNX export of ``runtime_fixtures.varied_model`` (labels vary: every label on
    every checked query, no two maps alike), exported once per session and configuration."""
    from runtime_fixtures import export_varied

    cache: dict[tuple, tuple] = {}

    def get(way: int, shot: int = 1, size: int = 48, precisions: tuple[str, ...] = ("fp32",)):
        key = (way, shot, size, tuple(precisions))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"varied-w{way}s{shot}-{size}")
            cache[key] = export_varied(directory, way, shot, size, tuple(precisions))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def cuda_ext():
    """The compiled ``mfnet_ext`` library (``mfnet_ext.Extension``), built once into
    ``$MFNET_EXT_BUILD_DIR`` when set (benchmarks/gpu_check.sh builds there first, so nothing
    compiles twice), else ``<repo>/build/cuda_ext_test`` (kept between runs, keyed by the
    sources' digest).

    Without a CUDA toolkit (nvcc) or a CUDA build of torch the tests that need it are skipped,
    unless MFNET_REQUIRE_CUDA_EXT=1 (CI), where that is a failure. A compile error always fails.
    """
    import mfnet_ext

    required = os.environ.get("MFNET_REQUIRE_CUDA_EXT") == "1"
    home = mfnet_ext.cuda_home()
    missing = None
    if not torch.version.cuda:
        missing = f"torch {torch.__version__} is not a CUDA build"
    elif home is None or not Path(home, "bin", "nvcc").is_file():
        missing = f"no CUDA toolkit (CUDA_HOME={home!r} has no bin/nvcc)"
    if missing is not None:
        if required:
            pytest.fail(f"MFNET_REQUIRE_CUDA_EXT=1 but the extension cannot be built: {missing}")
        pytest.skip(f"the mfnet_ext extension cannot be built here: {missing}")
    root = os.environ.get("MFNET_EXT_BUILD_DIR") or ROOT / "build" / "cuda_ext_test"
    return mfnet_ext.load(compile=True, build_root=root)
