"""Code rerun triggers whose coverage is measured, not guessed.

A tiny study that plans every rule of the workflow runs for real, each `blockpruner` command
recording the package files it read (BLOCKPRUNER_TRACE_FILES). The test then checks

1. workflow/code-files.yaml (command -> package files, what the rules' `code` params hash)
   equals what the commands really read: a stale table fails here;
2. for every package file, an edit to it makes exactly the rules whose commands read it
   report changed params (`snakemake --summary`), and no other rule;
3. a docstring or comment edit changes nothing.

Regenerate the table after moving code: BLOCKPRUNER_UPDATE_CODE_FILES=1 python -m pytest
tests/test_rerun_triggers.py (it writes workflow/code-files.yaml, then checks as above).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path

import yaml

from .conftest import ROOT, llama2_style_tokenizer, tiny_model
from .test_workflow import copy_workflow, run_snakemake

TABLE = "workflow/code-files.yaml"
PIQA = [("open a jar", "twist the lid", "hammer the lid", 0), ("dry wet hands", "use a towel", "use water", 0),
        ("cool soup", "wait a while", "add more heat", 0), ("light a room", "turn on a lamp", "close the door", 0)]
WINOGRANDE = [("Sam thanked Kim because _ had helped.", "Sam", "Kim", "2"),
              ("The cup fell off the shelf because _ was tilted.", "cup", "shelf", "2")]


def tiny_study(tmp: Path) -> tuple[Path, str]:
    """A copy of the workflow with a study that plans every rule once or twice: a tiny Llama,
    BlockPruner searched in two shards beside ShortGPT, LaCo and SliceGPT and a swap refinement
    of BlockPruner's set, a ratio target with
    a compensated variant of each search's pruning, every evaluation (two
    tasks: one with a YAML prompt, one with Python prompt functions), the analyses and the
    search-speed benchmark, and the GGUF export with its llama.cpp timing, all on local files."""
    from .test_evaluate import LINES

    model_dir = tmp / "tiny-llama"
    tok = llama2_style_tokenizer(model_dir, vocab_size=400)  # a vocabulary llama.cpp's converter reads (export-gguf)
    tiny_model("llama", num_hidden_layers=3, vocab_size=len(tok)).save_pretrained(model_dir)
    rng = random.Random(0)
    calib = tmp / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": " ".join(rng.choices(LINES, k=3))}) + "\n" for _ in range(8)))
    rows = tmp / "wikitext.rows.jsonl"
    rows.write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES * 3))
    piqa = tmp / "evals" / "piqa"
    piqa.mkdir(parents=True)
    (piqa / "valid.jsonl").write_text("".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b, _ in PIQA))
    (piqa / "valid-labels.lst").write_text("".join(f"{y}\n" for *_, y in PIQA))
    (tmp / "evals" / "winogrande").mkdir()
    (tmp / "evals" / "winogrande" / "dev.jsonl").write_text("".join(
        json.dumps({"sentence": s, "option1": a, "option2": b, "answer": y}) + "\n" for s, a, b, y in WINOGRANDE))
    main = copy_workflow(tmp / "wf")
    cfg = {
        "data_root": str(tmp), "device": "cpu", "gpu_slots": ".snakemake/gpu-slots",
        "models": {"tiny": {"source": str(model_dir), "dtype": "fp32"}},
        "calibration": {"c": {"path": str(calib), "nsamples": 6, "seed": 42, "seqlen": 16, "mode": "concat"}},
        "methods": {"bp": {"algorithm": "blockpruner"}, "sg": {"algorithm": "shortgpt"},
                    "lc": {"algorithm": "laco", "settings": {"merge_layers": 2, "lowest_layer": 0, "threshold": -1.0,
                                                            "samples": 1}},
                    "sl": {"algorithm": "slicegpt"},
                    "sw": {"refine": "swap", "from": "bp", "settings": {"rounds": 1}}},
        "search": {"max_k": 1, "shards": 2},
        "prunings": {"k": [], "ratio": [0.05], "compensate": ["none", "scale"]},
        "analyses": {"enabled": True, "bi_max_windows": 1},
        "benchmark": {"enabled": True, "k": 1, "methods": ["plain", "exact"], "max_windows": 2},
        "export": {"gguf": ["q8_0"], "speed": True},
        "evaluate": {"dense": False,  # the pruned variants' speed job loads the dense model too
                     "perplexity": {"enabled": True, "path": str(rows), "seqlen": 16, "max_windows": 2},
                     "tasks": {"enabled": True, "tasks": ["piqa", "winogrande"], "local_data": str(tmp / "evals"),
                               "limit": 4},
                     "speed": {"enabled": True, "prompt_tokens": 4, "new_tokens": 2, "repeats": 1, "warmup": 0}},
    }
    (main / ".test/rerun.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return main, ".test/rerun.yaml"


def traced_table(trace_dir: Path) -> dict[str, list[str]]:
    """command -> the package files any run of it read."""
    files = defaultdict(set)
    for f in trace_dir.glob("*.txt"):
        files[f.name.split(".")[0]] |= set(f.read_text().split())
    return {cmd: sorted(fs) for cmd, fs in sorted(files.items())}


def rule_commands(main: Path, configfile: str) -> dict[str, set[str]]:
    """Each rule's `blockpruner` commands, from the shell commands Snakemake recorded for a
    finished study (--detailed-summary)."""
    p = run_snakemake(main, "--detailed-summary", "--configfile", configfile)
    lines = [line.split("\t") for line in p.stdout.splitlines() if "\t" in line]
    head = lines[0]
    assert head[0] == "output_file", p.stdout[:2000]
    col = {name: i for i, name in enumerate(head)}
    commands = defaultdict(set)
    for row in lines[1:]:
        commands[row[col["rule"]]] |= set(re.findall(r"blockpruner\.cli ([a-z][a-z-]*)", row[col["shellcmd"]]))
    return dict(commands)


def changed_rules(main: Path, configfile: str) -> set[str]:
    """Rules with an output whose params changed since it was made (`--summary` status; the
    jobs after them are planned too, but their own params did not change)."""
    p = run_snakemake(main, "--summary", "--configfile", configfile)
    rows = [line.split("\t") for line in p.stdout.splitlines() if "\t" in line]
    col = {name: i for i, name in enumerate(rows[0])}
    return {r[col["rule"]] for r in rows[1:] if r[col["status"]] == "params changed"}


def test_code_rerun_triggers_cover_what_each_command_reads(tmp_path):
    from blockpruner.cli import COMMANDS

    main, cfg = tiny_study(tmp_path)
    update = os.environ.get("BLOCKPRUNER_UPDATE_CODE_FILES") == "1"
    if update:  # every command hashes nothing until the table is known
        (main / TABLE).write_text(yaml.safe_dump({c.name: [] for c in COMMANDS}))
    trace = tmp_path / "trace"
    env = {"BLOCKPRUNER_TRACE_FILES": str(trace),  # workflow/scripts/trace/sitecustomize.py records the reads
           "PYTHONPATH": os.pathsep.join([str(main / "workflow" / "scripts" / "trace"), os.environ.get("PYTHONPATH", "")])}
    run_snakemake(main, "--cores", "2", "--resources", "gpu=0", "--configfile", cfg, timeout=1200, env=env)
    commands_of = rule_commands(main, cfg)
    commands_of = {rule: cmds for rule, cmds in commands_of.items() if cmds}
    assert set(commands_of) == {"prepare_model", "sample_calibration", "search_step", "search_shard", "gather_step",
                                "tabulate_search", "refine_set", "materialize_model", "compress_model", "compensate_model",
                                "eval_perplexity", "eval_tasks", "measure_speed", "summarize", "analyze_study",
                                "analyze_bi", "benchmark_search", "export_gguf", "measure_speed_gguf",
                                "write_model_card"}, sorted(commands_of)
    table = traced_table(trace)
    assert set(table) == {c for cs in commands_of.values() for c in cs}, "a rule's command left no trace"
    if update:
        text = ("# blockpruner command -> the package files it reads (imports and data files), which the\n"
                "# rules' `code` params hash (workflow/rules/code.smk). Generated by tests/test_rerun_triggers.py:\n"
                "#   BLOCKPRUNER_UPDATE_CODE_FILES=1 python -m pytest tests/test_rerun_triggers.py\n")
        (ROOT / TABLE).write_text(text + yaml.safe_dump(table, sort_keys=True))
        (main / TABLE).write_text(text + yaml.safe_dump(table, sort_keys=True))
        run_snakemake(main, "--cores", "2", "--resources", "gpu=0", "--forceall", "--configfile", cfg, timeout=1200)
    recorded = yaml.safe_load((ROOT / TABLE).read_text())
    recorded = {c: files for c, files in recorded.items() if c in table}  # commands no rule runs (architectures, ...)
    assert recorded == table, (f"{TABLE} is stale (it must list what each command reads); regenerate it with "
                               "BLOCKPRUNER_UPDATE_CODE_FILES=1 python -m pytest tests/test_rerun_triggers.py")
    assert changed_rules(main, cfg) == set(), "the finished study reports changed params"

    package = main / "blockpruner"
    every_file = sorted(p.relative_to(package).as_posix() for p in package.rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
    read_by = defaultdict(set)  # package file -> rules whose commands read it
    for rule, cmds in commands_of.items():
        for c in cmds:
            for f in table[c]:
                read_by[f].add(rule)
    assert read_by["engine/forward.py"] >= {"search_step", "search_shard", "refine_set", "analyze_bi", "benchmark_search"}
    assert read_by["search/refine.py"] >= {"refine_set"}
    assert read_by["report/analyses.py"] >= {"analyze_study"}

    def edited(rel: str, text: str):
        path = package / rel
        original = path.read_bytes()
        path.write_bytes(original + text.encode())
        try:
            return changed_rules(main, cfg)
        finally:
            path.write_bytes(original)

    misses = {}
    for rel in sorted(read_by):  # each file some command reads: exactly its readers rerun
        probe = "\n_rerun_probe = 1\n" if rel.endswith(".py") else "\n# rerun probe\n"
        got = edited(rel, probe)
        if got != read_by[rel]:
            misses[rel] = {"expected": sorted(read_by[rel]), "planned": sorted(got)}
    assert not misses, misses
    unread = [package / rel for rel in every_file if rel not in read_by]
    originals = {p: p.read_bytes() for p in unread}
    try:  # files no command reads (e.g. the GPU slot wrapper, empty package docstrings) rerun nothing
        for p in unread:
            p.write_bytes(originals[p] + (b"\n_rerun_probe = 1\n" if p.suffix == ".py" else b"\n# rerun probe\n"))
        assert changed_rules(main, cfg) == set(), [str(p) for p in unread]
    finally:
        for p, data in originals.items():
            p.write_bytes(data)
    # docstrings and comments are not code
    path = package / "search" / "greedy.py"
    original = path.read_text()
    try:
        path.write_text(original.replace('"""Greedy block search', '"""Greedy block search (edited docstring)', 1)
                        + "\n# a comment\n")
        assert changed_rules(main, cfg) == set()
    finally:
        path.write_text(original)
