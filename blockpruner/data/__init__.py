"""Stage 1: model sources -> prepared directories, and calibration samples -> token windows."""
