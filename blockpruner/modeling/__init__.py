"""The package's own model classes for the directories it writes, below every stage:
`pruned` (materialised directories) and `sliced` (SliceGPT), each a loader beside the
self-contained modeling file it ships (`pruned_modeling.py`, `sliced_modeling.py`). Those
directories are always loaded with these classes, never with the directory's Python."""
