"""onnxcomq: COMQ post-training quantization for ONNX models."""

__version__ = "0.1.0"
