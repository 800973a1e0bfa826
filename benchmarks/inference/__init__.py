"""The inference benchmark of MFNet: every inference path in one table, one run, one device.

Run it as ``python -m benchmarks.inference`` from the repository root or as
``python benchmarks/bench_inference.py``; ``--help`` describes the rows and the outputs.

Modules, in the order a run uses them:

- ``cli``: the command line, the task plan (what runs in which order under a time budget), main;
- ``variants``: the row catalogue (name, group, floor work, precision, phase) and tolerances;
- ``context``: the state of a run (``Env``, ``Budget``), the ``Prepared`` row contract,
  ``NotMeasured``, progress lines;
- ``workload``: the model, synthetic data, FP32 reference labels and FLOPs of one N;
- ``torch_rows``: the PyTorch rows (eager, AMP, channels_last, CUDA graph, torch.compile,
  naive N x 1-way, end to end, support encoding);
- ``deployment_rows``: the ONNX Runtime, TensorRT and runtime ``Segmenter`` rows, the ONNX
  export they share, the availability checks of their optional packages;
- ``roofline``: the measured ceilings and the floor of every row;
- ``rows``: running and recording one row (timing, memory, agreement, or why it did not run);
- ``targets``: speed-ups, multi-way vs naive comparisons, the DESIGN.md targets;
- ``report``: the JSON payload, the markdown tables, the chart, the README block.

Timing, statistics and the device / version description are ``benchmarks._common``'s, shared with
the other benchmarks.
"""
