"""Compression methods that rewrite the model instead of removing blocks (SliceGPT, LaCo)."""

ALGORITHMS = ("slicegpt", "laco")  # one module each, with compress(model_dir, calib_dir, out_dir, ...)
