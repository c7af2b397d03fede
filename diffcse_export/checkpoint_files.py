"""The training checkpoint as diffcse-export reads it: the names diffcse-train writes to.

`diffcse-train` writes OUTPUT_DIR/best/ (a Hugging Face encoder folder plus the files below)
and `diffcse-export` reads it; diffcse_train/checkpoint.py documents the whole layout.

Why here: the checkpoint is export's input format, and imports go one way, training ->
export -> runtime. Export cannot import diffcse_train, and the runtime, which never reads a
checkpoint, should not own training facts; so the reader defines the names and the writer
imports them. The module is plain constants: importing it needs neither torch nor the
`export` extra (diffcse_export's own names load lazily).
"""

from __future__ import annotations

BEST_SUBDIR = "best"  # the folder of a run that export reads
HEAD_FILE = "diffcse_head.json"  # projector kind, hidden size, pooling, normalize
PROJECTOR_FILE = "projector.safetensors"  # the training-time projector's weights
CONFIG_FILE = "train_config.yaml"  # the run's full config (the model card reads it)
METRICS_FILE = "metrics.json"  # best/'s step and dev scores (the model card reads it)
PROJECTORS = ("batchnorm", "tanh", "none")  # projector kinds both sides understand
