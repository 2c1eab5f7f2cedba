"""Mask kinds, one module each, and the machinery they share (wrapping, target selection, saving)."""
