"""Training-free compensation of removed blocks, folded into kept blocks' weights (fit, fold, export)."""
