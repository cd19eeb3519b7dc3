"""Stage 2: the block search -- one scoring engine (`scoring`), the greedy step (`greedy`),
the importance metrics of the baselines (`importance`) and the baselines' steps (`baselines`)."""
