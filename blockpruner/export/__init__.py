"""Stage 3: a pruned model as a directory of its own (`materialize`), its modeling code, and the
Nemotron-NAS serving layout (`decilm`)."""
