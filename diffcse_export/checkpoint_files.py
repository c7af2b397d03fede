"""The training checkpoint's file names: the contract between diffcse-train and diffcse-export.

`diffcse-train` writes OUTPUT_DIR/best/ (a Hugging Face encoder folder plus the files below)
and `diffcse-export` reads it. Both import these names from here, one definition, torch-free,
as `model_dir.py` is for the model directory; diffcse_train/checkpoint.py documents the layout.
"""

from __future__ import annotations

BEST_SUBDIR = "best"  # the folder of a run that export reads
HEAD_FILE = "diffcse_head.json"  # projector kind, hidden size, pooling, normalize
PROJECTOR_FILE = "projector.safetensors"  # the training-time projector's weights
CONFIG_FILE = "train_config.yaml"  # the run's full config
PROJECTORS = ("batchnorm", "tanh", "none")  # projector kinds both sides understand
CHECKPOINT_TOOL = "diffcse-train"  # the tool best/'s and last/'s ownership manifests name
CHECKPOINT_WHAT = "a training checkpoint"
