"""Export of a trained MFNet to ONNX (and TensorRT): support encoder, prototype aggregator and
query decoder graphs, each verified against PyTorch, described by a manifest."""
