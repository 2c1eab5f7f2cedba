"""MaskPrune: learnable masks that prune Hugging Face models while their weights stay frozen."""
