"""Stage 2: the block search -- exact scoring of candidates on the forward engine (`exact`),
the greedy step (`greedy`), the importance metrics of the baselines (`importance`) and the
baselines' steps (`baselines`)."""

HEAD_BOUND_COLUMNS = 4096  # default N of the LM-head bound: columns per window besides the window's targets
