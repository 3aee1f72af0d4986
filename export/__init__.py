"""Export: checkpoint → ONNX (with parity checks) → TensorRT engine."""

from fgh_deploy.engines.onnx_format import read_onnx_metadata

from .onnx import ONNX_OPSET, export_onnx

__all__ = ["ONNX_OPSET", "export_onnx", "read_onnx_metadata"]
