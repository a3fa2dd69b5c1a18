"""Deployable artefacts from a (sparse) causal LM; `seftc.export(...)` calls
`seftc.export.onnx.export_onnx`."""
from seftc._callable import make_callable

make_callable(__name__, "seftc.export.onnx:export_onnx")
