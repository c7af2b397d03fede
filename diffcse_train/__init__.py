"""diffcse_train: DiffCSE training with PyTorch and transformers."""

__version__ = "0.1.0"
