"""Compress methods (SliceGPT, LaCo) in the workflow: planned without search steps, config
errors named before any job, and a tiny LaCo study run through Snakemake to the summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from .test_workflow import job_stats, run_snakemake, tiny_study

LACO = {"algorithm": "laco", "settings": {"merge_layers": 2, "lowest_layer": 0, "threshold": -1.0, "samples": 2}}


def with_wikitext(tmp_path: Path):
    """A config change: WikiText perplexity on a small local file (the CI study's shape)."""
    rows = tmp_path / "wiki.jsonl"
    words = "the actor starred in a play on television in 2006 and had a guest role".split()
    rows.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(12)))

    def change(c):
        c["evaluate"]["perplexity"] = {"enabled": True, "path": str(rows), "seqlen": 16, "max_windows": 2}

    return change


def plan(main: Path, cfg: str) -> tuple[dict, str]:
    p = run_snakemake(main, "-n", "--printshellcmds", "--configfile", cfg)
    out = p.stdout + p.stderr
    return job_stats(out), out


def test_dry_run_plans_compress_jobs_beside_the_search(tmp_path):
    def change(c):
        with_wikitext(tmp_path)(c)
        c["methods"] = {"blockpruner": {"algorithm": "blockpruner"}, "laco": LACO,
                        "slicegpt": {"algorithm": "slicegpt"}}
        c["prunings"] = {"k": [2], "ratio": [0.2]}

    main, cfg = tiny_study(tmp_path, "three", change)
    jobs, out = plan(main, cfg)
    # blockpruner: 2 steps, k2 and r0.2 materialised; laco and slicegpt: r0.2 only, no steps
    assert jobs["compress_model"] == 2 and jobs["materialize_model"] == 2, jobs
    assert jobs["search_step"] == 2 and jobs["tabulate_search"] == 1 and jobs["eval_perplexity"] == 4
    assert jobs["summarize"] == 1
    assert "compress --algorithm laco" in out and "compress --algorithm slicegpt" in out
    assert "results/pruned/tiny/c/laco/r0.2" in out and "results/search/tiny/c/laco" not in out
    assert "--settings '{\"lowest_layer\": 0, \"merge_layers\": 2, \"samples\": 2, \"threshold\": -1.0}'" in out
    summarize = next(line for line in out.splitlines() if "blockpruner.cli summarize" in line)
    assert "results/pruned/tiny/c/slicegpt/r0.2/manifest.json" in summarize  # its achieved ratio


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(prunings={"k": [2], "ratio": []}), "give prunings.ratio"),
    (lambda c: c["prunings"].update(ratio_of="no_embed"), "prunings.ratio_of: all"),
    (lambda c: c["methods"]["laco"]["settings"].update(merge_layer=3), "'merge_layer' was unexpected"),
    (lambda c: c["methods"].update(bp={"algorithm": "blockpruner", "settings": {"a": 1}}), "methods.bp.settings"),
])
def test_compress_config_errors_stop_before_any_job(tmp_path, change, message):
    def both(c):
        c["methods"] = {"laco": json.loads(json.dumps(LACO))}
        c["prunings"] = {"k": [], "ratio": [0.2]}
        change(c)

    main, cfg = tiny_study(tmp_path, "bad", both)
    p = run_snakemake(main, "-n", "--configfile", cfg, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and message in out, out
    assert "Job stats" not in out


def test_tiny_laco_study_runs_to_the_summary(tmp_path):
    def change(c):
        with_wikitext(tmp_path)(c)
        c["methods"] = {"laco": LACO}
        c["prunings"] = {"k": [], "ratio": [0.2]}

    main, cfg = tiny_study(tmp_path, "run", change)
    run_snakemake(main, "--cores", "2", "--resources", "gpu=0", "--configfile", cfg, timeout=600)
    manifest = json.loads((main / "results/pruned/tiny/c/laco/r0.2/manifest.json").read_text())
    rec = manifest
    assert rec["method"] == "laco" and rec["layers"] == 2 and rec["layers_removed"] == [2] and rec["ratio"] >= 0.2
    with open(main / "results/summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["pruning"], r["k"]) for r in rows] == [("laco", "r0.2", "")]
    assert float(rows[0]["ratio"]) == pytest.approx(rec["ratio"]) and math.isfinite(float(rows[0]["wikitext2_ppl"]))
    assert "laco" in (main / "results/summary.md").read_text()
    assert "Nothing to be done" in run_snakemake(main, "-n", "--configfile", cfg).stdout

    # the analyses read the compressed model beside the searches: ratio curves and budget matching
    from blockpruner.report.analyses import budget_table, metrics_vs_ratio

    matched = budget_table([main / "results"], 0.2)
    assert [(r["method"], r["k"], r["ratio"]) for r in matched] == [("laco", None, rec["ratio"])]
    assert budget_table([main / "results"], 0.3) == []  # LaCo reached 0.26 only
    curve = metrics_vs_ratio([main / "results"], tmp_path / "ratio.csv", tmp_path / "ratio.png")
    assert [(r["method"], r["ratio"]) for r in curve] == [("laco", rec["ratio"])] and curve[0]["wikitext2_ppl"] == float(rows[0]["wikitext2_ppl"])
