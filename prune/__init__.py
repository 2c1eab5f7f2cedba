"""MaskPrune: learnable masks that prune Hugging Face models while their weights stay frozen."""
from prune.runs.loading import load_model

__all__ = ["load_model"]
