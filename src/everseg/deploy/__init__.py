"""Deploying a model outside eager PyTorch: ONNX files, ONNX Runtime, int8 quantisation."""

from everseg.deploy.onnx import ExportReport, OnnxModelError, OnnxSegmenter, export_onnx, load_onnx_model, read_metadata

__all__ = ["ExportReport", "OnnxModelError", "OnnxSegmenter", "export_onnx", "load_onnx_model", "read_metadata"]
