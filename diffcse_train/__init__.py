"""diffcse_train: DiffCSE training with PyTorch and transformers.

The public surface, importable from the package itself:

    from diffcse_train import load_config, train            # diffcse-train (fit)
    from diffcse_train import TrainConfig                   # the typed, strict config
    from diffcse_train import FitSettings, fit_generator    # diffcse-train fit-generator
    from diffcse_train import DiffCSE                       # the objective, one nn.Module

Names are loaded on first use (PEP 562), so `import diffcse_train` stays cheap and does not
import torch until one of them is asked for, and the `diffcse-train` script (`main`) can say
what to install when the extra is missing.
"""

from __future__ import annotations

from diffcse_runtime.extras import entry_point, lazy_names

__version__ = "0.1.0"

_HOME = {
    "TrainConfig": "config",
    "load_config": "config",
    "train": "trainer",
    "TrainSummary": "trainer",
    "FitSettings": "generator",
    "fit_generator": "generator",
    "DiffCSE": "model",
}
__all__ = ["__version__", *_HOME]

main = entry_point("diffcse-train", "train", "diffcse_train.cli:main")  # the console script

__getattr__, __dir__ = lazy_names("diffcse_train", _HOME)
