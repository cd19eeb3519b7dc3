"""Stage 2: the block search -- exact scoring of candidates on the forward engine (`exact`),
the greedy step (`greedy`), the importance metrics of the baselines (`importance`), the
baselines' steps (`baselines`) and the refinement of a set at a fixed K (`refine`)."""

HEAD_BOUND_COLUMNS = 4096  # default N of the LM-head bound: columns per window besides the window's targets
# the workflow's methods.<name>.settings of a refinement, by its refine: value (`blockpruner refine` options)
REFINE_SETTINGS = {"swap": ("rounds", "mixed", "holdout_windows"),
                   "evolution": ("rounds", "holdout_windows", "offspring", "max_mutations", "selection", "seed")}
