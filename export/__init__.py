"""Export: checkpoint → ONNX (with parity checks) → TensorRT engine."""

from .onnx import ONNX_OPSET, export_onnx, read_onnx_metadata

__all__ = ["ONNX_OPSET", "export_onnx", "read_onnx_metadata"]
