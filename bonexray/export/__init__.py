"""Export of trained checkpoints to ONNX model files that carry their own contract."""
