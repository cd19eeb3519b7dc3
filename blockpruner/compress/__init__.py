"""Compression methods that rewrite the model instead of removing blocks (SliceGPT, LaCo)."""
