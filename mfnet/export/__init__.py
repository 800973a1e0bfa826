"""Export of a trained MFNet to ONNX (and TensorRT): support encoder, prototype aggregator and
query decoder graphs, each verified against PyTorch, described by the runtime's manifest
(``mfnet_runtime.manifest``). The command: ``python -m mfnet.export onnx|trt|verify``."""
