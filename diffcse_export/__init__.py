"""diffcse_export: a checkpoint -> validated ONNX model directories of its pooled vector.

    from diffcse_export import ExportOptions, export_model
    reports = export_model("runs/demo/best", "models/demo", ExportOptions(quantize="int8"))

Needs the `export` extra (torch, transformers, onnx, onnxscript); the model directories it
writes need only `diffcse_runtime`. Names load on first use (PEP 562), so the
`diffcse-export` script (`main`) can say what to install when the extra is missing.
"""

from __future__ import annotations

from diffcse_runtime.extras import entry_point, lazy_names

_HOME = {
    "ExportError": "errors",
    "ValidationError": "errors",
    "ExportOptions": "pipeline",
    "export_model": "pipeline",
    "target_dirs": "pipeline",
    "Thresholds": "validate",
    "VariantReport": "validate",
    "format_table": "validate",
}
__all__ = sorted(_HOME)

main = entry_point("diffcse-export", "export", "diffcse_export.cli:main")

__getattr__, __dir__ = lazy_names("diffcse_export", _HOME)
