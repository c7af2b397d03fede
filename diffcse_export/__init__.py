"""diffcse_export: a checkpoint -> validated ONNX model directories of its pooled vector.

    from diffcse_export import ExportOptions, export_model
    reports = export_model("runs/demo/best", "models/demo", ExportOptions(quantize="int8"))

Needs the `export` extra (torch, transformers, onnx, onnxscript); the model directories it
writes need only `diffcse_runtime`.
"""

from diffcse_export.errors import ExportError, ValidationError
from diffcse_export.pipeline import ExportOptions, export_model, target_dirs
from diffcse_export.validate import Thresholds, VariantReport, format_table

__all__ = [
    "ExportError",
    "ExportOptions",
    "Thresholds",
    "ValidationError",
    "VariantReport",
    "export_model",
    "format_table",
    "target_dirs",
]
