"""Offline lm-eval task configs: the built-in tasks' prompts and metrics over local files.

Each `*_local.yaml` mirrors one built-in lm-evaluation-harness task (piqa, winogrande,
arc_easy, arc_challenge, openbookqa, hellaswag) but reads its data from a local folder
through `loaders.py`. The folder is given at run time as the TaskManager metadata key
`local_data` (lm-eval CLI: `--include_path blockpruner/eval/tasks --metadata '{"local_data": DIR}'`),
so the YAMLs never hold a machine-specific path. `blockpruner.evaluate` does this for you.
"""
