"""The benchmarks of MFNet, run from the repository root (see benchmarks/README.md).

``bench_ops.py``, ``bench_runtime.py`` and ``count_flops.py`` are scripts; the inference table is
the package ``benchmarks.inference`` (``python -m benchmarks.inference``, or its script form
``python benchmarks/bench_inference.py``). ``_common`` holds the timing, statistics, device and
version helpers they share.
"""
