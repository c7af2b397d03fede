"""diffcse_runtime: serve DiffCSE sentence embeddings with onnxruntime, no torch needed."""

from diffcse_runtime.encoder import Encoder, similarity
from diffcse_runtime.errors import DataFormatError, DiffcseError, ModelDirError
from diffcse_runtime.model_dir import ModelMeta, load_metadata, write_metadata

__version__ = "0.1.0"
__all__ = [
    "DataFormatError",
    "DiffcseError",
    "Encoder",
    "ModelDirError",
    "ModelMeta",
    "load_metadata",
    "similarity",
    "write_metadata",
]
