"""`seftc.export`: deployable artefacts from a (sparse) causal LM."""
from seftc.export.onnx import ExportResult, OnnxCausalLM, export_onnx

__all__ = ["ExportResult", "OnnxCausalLM", "export_onnx"]
