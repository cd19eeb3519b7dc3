"""The Snakemake workflow: config checks, lint, the rerun behaviour (dry runs), the GPU slot
allocator and the summary.

The dry-run tests work in a copy of the workflow in a temporary folder (the CI study reads the
demo data bundle inside it) and outputs marked up to date with `snakemake --touch`, so
that each test sees exactly which jobs Snakemake would run after one change. The end-to-end
run on the real Gemma 3 270M is `test_e2e_ci_study` (minutes; `-m 'not e2e'` leaves it out).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, tiny_model
from .references import reference_model, reference_piqa_acc_norm, reference_wikitext_ppl

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
WORKFLOW_FILES = ["Snakefile", "config.yaml", "workflow", "config", "envs", "profiles", ".test", "blockpruner"]
TEST_CONFIG = ".test/config.yaml"


# ---------------------------------------------------------------- helpers


def run_snakemake(cwd: Path, *args: str, check: bool = True, timeout: int = 300,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE")} | (env or {})
    p = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
                             f"{failed_job_logs(cwd, p.stderr)}")
    return p


def failed_job_logs(cwd: Path, stderr: str) -> str:
    """The ends of the logs of the jobs that failed (Snakemake names them under `log:`), which the
    tail of Snakemake's own output may have cut."""
    text = ""
    for name in dict.fromkeys(re.findall(r"^\s*log: (\S+) \(check log file", stderr, flags=re.M)):
        log = cwd / name
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(missing)"
        text += f"\n--- {name} ---\n{tail}"
    return text


def copy_workflow(dest: Path, whole_study: bool = False, messages: bool = True) -> Path:
    """A copy of the workflow (and package, which the code hashes read) at dest/main; the CI
    study reads the demo data bundle inside it (workflow/resources/demo), nothing beside it.

    whole_study=False trims the CI study to its one BlockPruner method and no analyses, so that
    the dry runs' job counts below read as the pipeline's stages (the ShortGPT baseline and the
    analyses run for real in test_e2e_ci_study, with whole_study=True).
    messages=False drops the rules' `message:` lines, which Snakemake prints instead of each
    job's rule, wildcards and resources: dry runs then show what the scheduler would get."""
    main = dest / "main"
    main.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, main / name, ignore=shutil.ignore_patterns("__pycache__", "results", "logs"))
        elif src.exists():
            shutil.copy2(src, main / name)
    if not messages:
        for smk in (main / "workflow" / "rules").glob("*.smk"):
            smk.write_text(re.sub(r"^    message:\n(?:        .*\n)+", "", smk.read_text(), flags=re.M))
    if not whole_study:
        cfg = yaml.safe_load((main / TEST_CONFIG).read_text())
        cfg["methods"] = {"blockpruner": cfg["methods"]["blockpruner"]}
        cfg["analyses"]["enabled"] = False
        (main / TEST_CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return main


def write_config(main: Path, name: str, change) -> str:
    """A variant of the CI config: `change(cfg)` edits the loaded dict; returns its path."""
    cfg = yaml.safe_load((main / TEST_CONFIG).read_text())
    change(cfg)
    path = main / ".test" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path.relative_to(main))


def planned(main: Path, configfile: str = TEST_CONFIG, *extra: str) -> Counter:
    """Jobs per rule that a dry run would execute (empty when all is up to date)."""
    p = run_snakemake(main, "-n", "--quiet", "rules", "--configfile", configfile, *extra)
    return job_stats(p.stdout + p.stderr)


def job_stats(out: str) -> Counter:
    """The "Job stats" table of a dry run's output, as jobs per rule."""
    if "Nothing to be done" in out:
        return Counter()
    m = re.search(r"Job stats:\njob\s+count\n[-\s]+\n(.*?)\ntotal\s+\d+", out, re.S)
    assert m, out
    return Counter({rule: int(n) for rule, n in (line.split() for line in m.group(1).strip().splitlines())})


def mark_up_to_date(main: Path, configfile: str = TEST_CONFIG) -> None:
    """Create every output of the study as an empty file and record Snakemake's metadata
    (params, code, inputs) for it with --touch, as if the whole study had run."""
    p = run_snakemake(main, "-n", "--summary", "--configfile", configfile)
    lines = [line.split("\t") for line in p.stdout.splitlines() if "\t" in line]
    assert lines and lines[0][0] == "output_file", p.stdout
    for row in lines[1:]:
        out = main / row[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    run_snakemake(main, "--touch", "--forceall", "--cores", "1", "--configfile", configfile)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A copy of the workflow with nothing run (for tests that only read its dry runs)."""
    return copy_workflow(tmp_path_factory.mktemp("fresh"), messages=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The CI study, all of it marked as done."""
    main = copy_workflow(tmp_path_factory.mktemp("wf"))
    mark_up_to_date(main)
    return main


CI_ALL = {"prepare_model": 1, "sample_calibration": 1, "search_step": 2, "tabulate_search": 1, "materialize_model": 2,
          "eval_perplexity": 3, "eval_tasks": 3, "measure_speed": 3, "summarize": 1, "all": 1}


# ---------------------------------------------------------------- dry runs, lint, config


def test_dry_run_ci_study_plans_every_stage(fresh):
    assert planned(fresh) == Counter(CI_ALL)


@pytest.fixture(scope="module")
def paper_slurm_plan(fresh) -> str:
    """The paper study's dry run through the SLURM profile (one DAG of ~1,000 jobs, read by
    two tests: its job counts and the resources the profile sends)."""
    p = run_snakemake(fresh, "--profile", "profiles/slurm", "-n", "--configfile", "config/paper.yaml")
    return p.stdout + p.stderr


def test_dry_run_default_and_paper_configs(fresh, paper_slurm_plan):
    demo = planned(fresh, "config.yaml")
    # demo: K = 1, 3 and a ratio target resolved from steps 1..3
    assert demo["search_step"] == 3 and demo["materialize_model"] == 3 and demo["eval_tasks"] == 4
    paper = job_stats(paper_slurm_plan)
    assert paper["prepare_model"] == 6 and paper["search_step"] == 6 * 32


def test_lint(tmp_path):
    """`snakemake --lint` finds nothing; on findings, fail with what lint said."""
    p = run_snakemake(copy_workflow(tmp_path), "--lint", "--configfile", TEST_CONFIG, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Congratulations" in out, out


def test_slurm_profile_requests_gpus_only_for_gpu_rules(paper_slurm_plan):
    resources = {m.group(1): m.group(2)
                 for m in re.finditer(r"rule (\w+):\n(?:    .*\n)*?    resources: (.*)", paper_slurm_plan)}
    # the study gives GPU counts, memory and run times; the profile adds partition and account
    # (its GPU-model block is commented out: tests/test_slurm.py checks it switched on)
    assert "gpu=1" in resources["search_step"] and "gpu_model" not in resources["search_step"]
    assert "mem_mb=128000" in resources["search_step"] and "runtime=720" in resources["search_step"]
    assert "gpu=0" in resources["sample_calibration"] and "gpu_model" not in resources["sample_calibration"]
    assert "slurm_partition=cpu" in resources["sample_calibration"]


@pytest.mark.parametrize("change, key, message", [
    (lambda c: c["calibration"]["alpaca"].update(nsamples=-1), "['calibration']['alpaca']['nsamples']", "less than the minimum"),
    (lambda c: c["calibration"]["alpaca"].update(nsample=16), "['calibration']['alpaca']", "'nsample' was unexpected"),
    (lambda c: c["prunings"].update(ratio=[1.5]), "['prunings']['ratio'][0]", "maximum"),
    (lambda c: c.update(modles=c.pop("models")), "", "'modles' was unexpected"),
    (lambda c: c["calibration"]["alpaca"].update(path="alpaca/missing.json"), "calibration.alpaca.path", "file not found"),
])
def test_config_violation_stops_before_any_job(fresh, change, key, message):
    cfg = write_config(fresh, f"bad-{abs(hash(key + message))}", change)
    p = run_snakemake(fresh, "-n", "--configfile", cfg, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert key in out and message in out, out
    assert "Job stats" not in out and "rule prepare_model" not in out


# ---------------------------------------------------------------- rerun only what changed


def test_up_to_date_study_plans_nothing(study):
    assert planned(study) == Counter()


def test_task_list_change_reruns_only_task_evaluation(study):
    cfg = write_config(study, "tasks", lambda c: c["evaluate"]["tasks"].update(tasks=["piqa", "arc_easy"]))
    assert planned(study, cfg) == Counter({"eval_tasks": 3, "summarize": 1, "all": 1})


def test_nsamples_change_reruns_calibration_search_and_after(study):
    cfg = write_config(study, "nsamples", lambda c: c["calibration"]["alpaca"].update(nsamples=5))
    plan = planned(study, cfg)
    # the dense model's evaluations and the prepared model stay
    assert plan == Counter({"sample_calibration": 1, "search_step": 2, "tabulate_search": 1, "materialize_model": 2,
                            "eval_perplexity": 2, "eval_tasks": 2, "measure_speed": 2, "summarize": 1, "all": 1})


def test_larger_k_reuses_existing_steps(study):
    cfg = write_config(study, "k3", lambda c: c["prunings"].update(k=[1, 2, 3]))
    plan = planned(study, cfg)
    assert plan == Counter({"search_step": 1, "tabulate_search": 1, "materialize_model": 1, "eval_perplexity": 1,
                            "eval_tasks": 1, "measure_speed": 1, "summarize": 1, "all": 1})
    p = run_snakemake(study, "-n", "--printshellcmds", "--configfile", cfg)
    out = p.stdout + p.stderr
    assert "--out results/search/gemma3-270m/alpaca/blockpruner/step_3.json" in out
    assert "--out results/search/gemma3-270m/alpaca/blockpruner/step_2.json" not in out


def test_ratio_target_resolves_from_existing_steps(study):
    """A ratio target within search.max_k = 2 adds a materialisation and its evaluations only."""
    cfg = write_config(study, "ratio", lambda c: c["prunings"].update(ratio=[0.01]))
    assert planned(study, cfg) == Counter({"materialize_model": 1, "eval_perplexity": 1, "eval_tasks": 1,
                                           "measure_speed": 1, "summarize": 1, "all": 1})
    p = run_snakemake(study, "-n", "--printshellcmds", "--configfile", cfg)
    steps = " ".join(f"results/search/gemma3-270m/alpaca/blockpruner/step_{k}.json" for k in (1, 2))
    assert f"cli materialize --model results/models/gemma3-270m --ratio 0.01 --steps {steps} --out" in p.stdout + p.stderr


def test_speed_settings_change_reruns_only_speed(study):
    cfg = write_config(study, "speed", lambda c: c["evaluate"]["speed"].update(repeats=3))
    assert planned(study, cfg) == Counter({"measure_speed": 3, "summarize": 1, "all": 1})


def test_device_and_resources_are_not_rerun_triggers(study):
    def change(c):
        c["device"] = "auto"
        c["resources"]["search_step"] = {"gpu": 1, "mem_mb": 9000}
    assert planned(study, write_config(study, "device", change)) == Counter()


# ---------------------------------------------------------------- GPU slots


def gpu_job(slots: Path, devices: str, n: int, out: Path, hold: float = 1.0) -> subprocess.Popen:
    script = f"import os, time; open({str(out)!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + str(time.time())); time.sleep({hold})"
    return subprocess.Popen([sys.executable, "-m", "blockpruner.gpus", "--slots-dir", str(slots), "--devices", devices,
                             str(n), "--", sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "BLOCKPRUNER_GPU_ALLOCATOR")})


def test_concurrent_gpu_jobs_get_distinct_devices(tmp_path):
    slots = tmp_path / "slots"
    jobs = [gpu_job(slots, "0,1,2", 1, tmp_path / f"job{i}.txt", hold=1.5) for i in range(3)]
    for j in jobs:
        assert j.wait(timeout=60) == 0, j.stderr.read()
    seen = [(tmp_path / f"job{i}.txt").read_text().split()[0] for i in range(3)]
    assert sorted(seen) == ["0", "1", "2"]


def test_gpu_jobs_wait_for_a_free_slot(tmp_path):
    """Two 1-GPU jobs on one slot run one after the other; a 2-GPU job takes both of two."""
    slots = tmp_path / "slots"
    a = gpu_job(slots, "7", 1, tmp_path / "a.txt", hold=1.5)
    time.sleep(0.5)
    b = gpu_job(slots, "7", 1, tmp_path / "b.txt", hold=0.0)
    assert a.wait(timeout=60) == 0 and b.wait(timeout=60) == 0
    ta, tb = ((tmp_path / f).read_text().split() for f in ("a.txt", "b.txt"))
    assert ta[0] == tb[0] == "7"
    assert float(tb[1]) >= float(ta[1]) + 1.4  # b started only after a released the slot
    c = gpu_job(slots, "3,4", 2, tmp_path / "c.txt", hold=0.0)
    assert c.wait(timeout=60) == 0
    assert (tmp_path / "c.txt").read_text().split()[0] == "3,4"


def test_gpu_wrapper_cpu_and_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BLOCKPRUNER_GPU_ALLOCATOR"}
    show = [sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"]
    wrap = [sys.executable, "-m", "blockpruner.gpus", "--slots-dir", str(tmp_path)]
    p = subprocess.run([*wrap, "0", "--", *show], cwd=ROOT, capture_output=True, text=True, env=env | {"CUDA_VISIBLE_DEVICES": "0"})
    assert p.stdout.strip() == "''"  # gpu=0: no device, the command runs on the CPU
    p = subprocess.run([*wrap, "1", "--", *show], cwd=ROOT, capture_output=True, text=True,
                       env=env | {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "5"})
    assert p.stdout.strip() == "'5'"  # SLURM assigned the device: left alone
    p = subprocess.run([*wrap, "--devices", "0", "2", "--", *show], cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "needs 2 GPU(s) but 1 are available" in p.stderr
    p = subprocess.run([*wrap, "0", "--", sys.executable, "-c", "raise SystemExit(3)"], cwd=ROOT, env=env)
    assert p.returncode == 3  # the command's exit status comes through


# ---------------------------------------------------------------- summary


def fake_study(root: Path) -> list[Path]:
    """Step and evaluation artifacts of a tiny made-up study, in the workflow's layout."""
    from blockpruner.artifacts import write_json
    from blockpruner.steps import FORMAT

    files, removed = [], []
    for k, block in enumerate(["attn.5", "mlp.3", "attn.7"], 1):
        removed = removed + [block]
        files.append(root / f"search/m/alp/bp/step_{k}.json")
        write_json(files[-1], {
            "k": k, "removed_block": block, "ppl": 10.0 + k, "removed": removed,
            "attn_removed": sum(b.startswith("attn") for b in removed), "mlp_removed": sum(b.startswith("mlp") for b in removed),
            "params": {"total": 1000, "removed": 20 * k, "remaining": 1000 - 20 * k, "ratio": 0.02 * k,
                       "total_no_embed": 500, "ratio_no_embed": 0.04 * k},
            "settings": {}, "inputs": {}, "timing": {"elapsed_s": 1.0}}, FORMAT)
    for i, variant in enumerate(["dense", "alp/bp/k1", "alp/bp/k3", "alp/bp/r0.05"]):
        base = root / "eval/m" / variant
        write_json(base / "ppl.json", {"ppl": 20.0 + i, "tokens": 100, "windows": 2, "numerics": "official-bf16"},
                   "blockpruner.eval_ppl/1")
        write_json(base / "tasks.json", {"tasks": {"piqa": {"metric": "acc_norm", "value": 0.7 - i / 100},
                                                   "arc_easy": {"metric": "acc_norm", "value": 0.5}},
                                         "average": 0.6 - i / 200, "lm_eval_version": "0.4.13", "add_bos_token": "no",
                                         "numerics": "official-bf16"}, "blockpruner.eval_tasks/1")
        dense = variant == "dense"
        write_json(base / "speed.json", {"model": {"gen_mean_s": 1.0, "tokens_per_s": 100.0 + i, "kv_bytes_per_token": 10,
                                                   "peak_mem_bytes": 1, "params": 1000 - 20 * i},
                                         "baseline": None if dense else {"gen_mean_s": 1.1},
                                         "speedup": None if dense else 1.1, "kv_cache_reduction": None if dense else 0.25},
                   "blockpruner.speed/1")
        files += [base / "ppl.json", base / "tasks.json", base / "speed.json"]
    return files


def test_summarize_builds_table_and_plots(tmp_path):
    from blockpruner.cli import main

    files = fake_study(tmp_path / "results")
    out = tmp_path / "out"
    rc = main(["summarize", "--csv", str(out / "summary.csv"), "--markdown", str(out / "summary.md"),
               "--plot-ppl", str(out / "p.png"), "--plot-accuracy", str(out / "a.png"), "--plot-blocks", str(out / "b.png"),
               *map(str, files)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["pruning"] for r in rows] == ["dense", "k1", "k3", "r0.05"]
    by = {r["pruning"]: r for r in rows}
    assert by["dense"]["k"] == "0" and by["dense"]["speedup"] == ""
    assert by["k3"]["k"] == "3" and by["k3"]["attn_removed"] == "2" and by["k3"]["mlp_removed"] == "1"
    assert by["r0.05"]["k"] == "3" and math.isclose(float(by["r0.05"]["ratio"]), 0.06)  # smallest K reaching 5%
    assert float(by["k1"]["piqa"]) == pytest.approx(0.69) and float(by["k1"]["speedup"]) == pytest.approx(1.1)
    md = (out / "summary.md").read_text()
    assert "| m | bp | alp | k3 | 3 (2+1) | 6.00% | 22.00 | 68.00 | 50.00 |" in md
    assert "Evaluated with: zero-shot accuracies from lm-eval 0.4.13 with BOS no" in md and "numerics official-bf16." in md
    matched = md.split("## Matched budgets (Table 1's rule)")[1]
    assert "| m | ≥ 5.00% | bp | 3 | 6.00% | 23.00 | 58.50 |" in matched and "k1" not in matched
    for png in ("p.png", "a.png", "b.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_summarize_refuses_edited_artifacts(tmp_path, capsys):
    from blockpruner.cli import main

    files = fake_study(tmp_path / "results")
    ppl = next(f for f in files if f.name == "ppl.json")
    ppl.write_text(ppl.read_text().replace('"ppl": 20.0', '"ppl": 2.0'))
    rc = main(["summarize", "--csv", str(tmp_path / "s.csv"), "--markdown", str(tmp_path / "s.md"), *map(str, files)])
    assert rc == 2 and "checksum mismatch" in capsys.readouterr().err


def test_sequence_csv(tmp_path):
    from blockpruner.cli import main

    steps = [f for f in fake_study(tmp_path / "results") if f.name.startswith("step_")]
    assert main(["sequence", "--out", str(tmp_path / "seq.csv"), *map(str, steps)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "seq.csv")))
    assert [(r["k"], r["removed_block"], r["block_type"], r["layer"]) for r in rows] == [
        ("1", "attn.5", "attn", "5"), ("2", "mlp.3", "mlp", "3"), ("3", "attn.7", "attn", "7")]
    assert main(["sequence", "--out", str(tmp_path / "bad.csv"), str(steps[0]), str(steps[2])]) == 2  # gap


# ---------------------------------------------------------------- end to end (real model)


@pytest.mark.e2e
@pytest.mark.gemma
def test_e2e_ci_study(tmp_path):
    """`snakemake --cores 2 --resources gpu=0 --configfile .test/config.yaml` on Gemma 3 270M
    and the demo data bundle; a prepared model in BLOCKPRUNER_GEMMA_DIR is reused (saves ~3 min).
    With BLOCKPRUNER_E2E_DIR the study runs there (emptied first) and is kept: CI compares
    the same study run through SLURM with it (.ci/slurm, BLOCKPRUNER_REFERENCE)."""
    if os.environ.get("BLOCKPRUNER_E2E_DIR"):
        tmp_path = Path(os.environ["BLOCKPRUNER_E2E_DIR"]).resolve()
        shutil.rmtree(tmp_path, ignore_errors=True)
        tmp_path.mkdir(parents=True)
    main = copy_workflow(tmp_path, whole_study=True)
    prepared = os.environ.get("BLOCKPRUNER_GEMMA_DIR")
    if prepared and (Path(prepared) / "manifest.json").exists():
        dest = main / "results/models/gemma3-270m"
        dest.mkdir(parents=True)
        for f in Path(prepared).iterdir():
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)
    run_snakemake(main, "--cores", "2", "--resources", "gpu=0", "--configfile", TEST_CONFIG, timeout=3600)
    rows = list(csv.DictReader(open(main / "results/summary.csv")))
    assert [(r["method"], r["pruning"], r["k"]) for r in rows] == [
        ("dense", "dense", "0"), ("blockpruner", "k1", "1"), ("blockpruner", "k2", "2"),
        ("shortgpt", "k1", "1"), ("shortgpt", "k2", "2")]
    shortgpt = rows[3:]
    rows = rows[:3]
    for r in shortgpt:  # a layer per step: two blocks, a larger ratio than one block
        assert int(r["attn_removed"]) == int(r["mlp_removed"]) == int(r["k"])
        assert float(r["ratio"]) > float(rows[int(r["k"])]["ratio"])
    for kind in ("ratio", "attention", "time"):  # the comparison analyses
        table = list(csv.DictReader(open(main / f"results/analyses/{kind}.csv")))
        assert {r["method"] for r in table} == {"blockpruner", "shortgpt"}
        assert (main / f"results/analyses/{kind}.png").stat().st_size > 10_000
    bi = list(csv.DictReader(open(main / "results/analyses/gemma3-270m/alpaca/bi_layer_vs_block.csv")))
    assert len(bi) == 18
    # WikiText-2 perplexity and PIQA accuracy recomputed without the package's evaluation code
    # (transformers' loss, and lm-eval's acc_norm by hand), and the speed figures from the timings
    rows_text = [json.loads(line)["text"] for line in open(main / "workflow/resources/demo/wikitext2/test.rows.jsonl")]
    docs = [json.loads(line) for line in open(main / "workflow/resources/demo/evals/piqa/valid.jsonl")]
    labels = [int(x) for x in (main / "workflow/resources/demo/evals/piqa/valid-labels.lst").read_text().split()]
    for r in rows + shortgpt:
        model_dir = main / ("results/models/gemma3-270m" if r["method"] == "dense"
                            else f"results/pruned/gemma3-270m/alpaca/{r['method']}/{r['pruning']}")
        model, tok = reference_model(model_dir)
        ppl = reference_wikitext_ppl(model, tok, rows_text, seqlen=256, windows=2)
        assert float(r["wikitext2_ppl"]) == pytest.approx(ppl, rel=1e-5), r
        if r in rows:
            assert float(r["piqa"]) == float(r["average"]) == reference_piqa_acc_norm(model, tok, docs[:10], labels[:10])
            where = "dense" if r["method"] == "dense" else f"{r['calib']}/{r['method']}/{r['pruning']}"
            speed = json.load(open(main / f"results/eval/gemma3-270m/{where}/speed.json"))
            new_tokens = speed["settings"]["new_tokens"]
            assert float(r["tokens_per_s"]) == pytest.approx(new_tokens / statistics.median(speed["model"]["gen_s"]), rel=1e-9)
            if r["method"] != "dense":
                baseline = new_tokens / statistics.median(speed["baseline"]["gen_s"])
                assert float(r["speedup"]) == pytest.approx(float(r["tokens_per_s"]) / baseline, rel=1e-9)
    assert 0 < float(rows[1]["ratio"]) < float(rows[2]["ratio"]) < 0.1
    for r in rows[1:]:  # every layer of Gemma 3 270M caches the same width: the cache shrinks by removed attention
        assert float(r["kv_cache_reduction"]) == pytest.approx(int(r["attn_removed"]) / 18, abs=1e-12)
    seq = list(csv.DictReader(open(main / "results/search/gemma3-270m/alpaca/blockpruner/sequence.csv")))
    assert [r["k"] for r in seq] == ["1", "2"]
    assert planned(main) == Counter()  # a second run has nothing to do


# ---------------------------------------------------------------- sharded and screened steps


def tiny_study(tmp_path: Path, name: str, change=None) -> tuple[Path, str]:
    """A copy of the workflow with a study of a tiny random Llama (saved as a local model
    directory) and a small local calibration file: search only, K = 2."""
    from .test_evaluate import tiny_tokenizer

    model_dir = tmp_path / "tiny-llama"
    if not model_dir.exists():
        tiny_model("llama", num_hidden_layers=3).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "calib.jsonl"
    if not data.exists():
        words = "the actor starred in a play on television in 2006 and had a guest role".split()
        rng = random.Random(0)
        data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=24))}) + "\n" for _ in range(8)))
    main = copy_workflow(tmp_path / name)
    cfg = {
        "data_root": str(tmp_path), "device": "cpu", "gpu_slots": ".snakemake/gpu-slots",
        "models": {"tiny": {"source": str(model_dir), "dtype": "fp32"}},
        "calibration": {"c": {"path": str(data), "nsamples": 6, "seed": 42, "seqlen": 16, "mode": "concat"}},
        "methods": {"blockpruner": {"algorithm": "blockpruner"}},
        "search": {"max_k": 2},
        "prunings": {"k": [2], "ratio": []},
        "evaluate": {"dense": False, "perplexity": {"enabled": False}, "tasks": {"enabled": False},
                     "speed": {"enabled": False}},
    }
    if change:
        change(cfg)
    (main / ".test/tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return main, ".test/tiny.yaml"


def test_sharded_search_equals_unsharded(tmp_path, monkeypatch):
    """search.shards: 2 plans two search_shard jobs per step and a gather_step; run for step 1,
    the gathered artifact equals an unsharded `blockpruner step` on the same prepared model and
    calibration (apart from cost, timing and the shard record) and records both shards.
    (Chaining sharded steps, K = 2, is tests/test_search_speed.py::test_two_shards_equal_unsharded.)"""
    from blockpruner.cli import main
    from blockpruner.steps import read_step

    target = "results/search/tiny/c/blockpruner/step_1.json"
    two, cfg2 = tiny_study(tmp_path, "two", lambda c: c["search"].update(shards=2))
    plan = planned(two, cfg2)
    assert plan["search_shard"] == 4 and plan["gather_step"] == 2 and plan["search_step"] == 0, plan
    p = run_snakemake(two, target, "-n", "--printshellcmds", "--configfile", cfg2)
    out = p.stdout + p.stderr
    assert "--shard 0/2" in out and "--shard 1/2" in out and "gather-step --shards" in out
    run_snakemake(two, target, "--cores", "2", "--resources", "gpu=0", "--configfile", cfg2, timeout=900)
    monkeypatch.chdir(two)  # the same relative input paths as the workflow's jobs
    assert main(["step", "--model", "results/models/tiny", "--calib", "results/calib/tiny/c", "--k", "1",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "unsharded.json")]) == 0
    a, b = read_step(tmp_path / "unsharded.json"), read_step(two / target)
    assert [s["index"] for s in b["shards"]] == [0, 1] and "shards" not in a
    drop = {"cost", "timing", "shards", "checksum"}
    assert {x: v for x, v in a.items() if x not in drop} == {x: v for x, v in b.items() if x not in drop}
    assert (two / "logs/search_shard/tiny/c/blockpruner/step_1.shard1of2.log").exists()
    assert not (two / "results/search/tiny/c/blockpruner/step_2.json").exists()
    p = run_snakemake(two, target, "-n", "--configfile", cfg2)
    assert "Nothing to be done" in p.stdout + p.stderr


def test_study_killed_during_step_2_resumes_there_after_unlock(tmp_path, monkeypatch):
    """kill -9 of Snakemake and its jobs while step 2 of a 3-step search runs: the next run is
    refused until `snakemake --unlock` (as the README says), then it runs steps 2 and 3 only,
    leaves step_1.json untouched and ends with the artifacts of an uninterrupted search."""
    from blockpruner.cli import main

    main_dir, cfg = tiny_study(tmp_path, "killed", lambda c: (c["search"].update(max_k=3), c["prunings"].update(k=[3])))
    steps = main_dir / "results/search/tiny/c/blockpruner"
    step2_log = main_dir / "logs/search_step/tiny/c/blockpruner/step_2.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE")}
    proc = subprocess.Popen([*SNAKEMAKE, "--cores", "1", "--resources", "gpu=0", "--configfile", cfg], cwd=main_dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 600
    while not step2_log.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, 9)  # Snakemake and the step-2 job with it
    proc.wait()
    assert step2_log.exists(), "step 2 never started"
    assert (steps / "step_1.json").exists() and not (steps / "step_2.json").exists()
    step1 = (steps / "step_1.json").read_bytes(), (steps / "step_1.json").stat().st_mtime_ns

    p = run_snakemake(main_dir, "--cores", "1", "--resources", "gpu=0", "--configfile", cfg, check=False)
    assert p.returncode != 0 and "cannot be locked" in p.stdout + p.stderr
    run_snakemake(main_dir, "--unlock", "--configfile", cfg)
    p = run_snakemake(main_dir, "--cores", "2", "--resources", "gpu=0", "--configfile", cfg, timeout=900)
    assert job_stats(p.stdout + p.stderr)["search_step"] == 2  # steps 2 and 3, not step 1
    assert ((steps / "step_1.json").read_bytes(), (steps / "step_1.json").stat().st_mtime_ns) == step1

    monkeypatch.chdir(main_dir)  # the uninterrupted search, with the workflow's relative paths
    ref = tmp_path / "ref"
    for k in (1, 2, 3):
        prev = ["--prev", str(ref / f"step_{k - 1}.json")] if k > 1 else []
        assert main(["step", "--model", "results/models/tiny", "--calib", "results/calib/tiny/c", "--k", str(k), *prev,
                     "--device", "cpu", "--no-progress", "--out", str(ref / f"step_{k}.json")]) == 0
    for k in (1, 2, 3):
        a, b = json.loads((steps / f"step_{k}.json").read_text()), json.loads((ref / f"step_{k}.json").read_text())
        for rec in (a, b):
            rec.pop("timing"), rec.pop("checksum"), rec["inputs"].pop("previous_step")
        assert a == b, k


def test_screened_method_runs_the_screened_step_and_refuses_shards(fresh):
    def screened(c):
        c["methods"]["fast"] = {"algorithm": "blockpruner", "screen": {"windows": 2, "confirm_top": 4}}

    cfg = write_config(fresh, "screened", screened)
    p = run_snakemake(fresh, "-n", "--printshellcmds", "--configfile", cfg)
    out = p.stdout + p.stderr
    assert re.search(r"cli step --screen-windows 2 --confirm-top 4 --model \S+ --calib \S+ --k 1", out), out[-3000:]

    def sharded(c):
        screened(c)
        c["search"]["shards"] = 2

    p = run_snakemake(fresh, "-n", "--configfile", write_config(fresh, "screened-shards", sharded), check=False)
    assert p.returncode != 0 and "methods.fast.screen: a screened search cannot be sharded" in p.stdout + p.stderr


def test_compensation_aware_method_plans_its_step_and_refuses_screening(fresh):
    def aware(c):
        c["methods"]["aware"] = {"algorithm": "blockpruner", "compensation": "scale"}
        c["compensation"] = {"scale_alpha": 0.5}

    p = run_snakemake(fresh, "-n", "--printshellcmds", "--configfile", write_config(fresh, "aware", aware))
    out = p.stdout + p.stderr
    assert re.search(r"cli step --compensation scale --compensation-alpha 0.5 --model \S+ --calib \S+ --k 1", out), out[-3000:]

    def screened(c):
        aware(c)
        c["methods"]["aware"]["screen"] = {"windows": 2, "confirm_top": 4}

    p = run_snakemake(fresh, "-n", "--configfile", write_config(fresh, "aware-screened", screened), check=False)
    assert p.returncode != 0 and "methods.aware.compensation: only an exact blockpruner search" in p.stdout + p.stderr


def test_compensation_settings_reach_the_compensate_command(fresh):
    def comp(c, **settings):
        c["prunings"]["compensate"] = ["none", "scale"]
        c["compensation"] = settings

    p = run_snakemake(fresh, "-n", "--printshellcmds", "--configfile",
                      write_config(fresh, "comp", lambda c: comp(c, scale_alpha=0.5, max_windows=2, guard=False)))
    out = p.stdout + p.stderr
    assert re.search(r"cli compensate .* --method scale --alpha 0\.5 --max-windows 2 --no-guard --out \S+\+scale", out), out[-3000:]
    p = run_snakemake(fresh, "-n", "--printshellcmds", "--configfile", write_config(fresh, "comp-default", comp))
    out = p.stdout + p.stderr
    assert re.search(r"cli compensate .* --method scale +--out \S+\+scale", out), out[-3000:]  # the command's defaults, guarded


def test_benchmark_rule_plans_one_job_per_model_and_calibration(fresh):
    cfg = write_config(fresh, "bench", lambda c: c.update(benchmark={"enabled": True, "k": 2, "methods": ["plain", "exact"],
                                                                      "max_windows": 3}))
    assert planned(fresh, cfg)["benchmark_search"] == 1
    p = run_snakemake(fresh, "benchmarks", "-n", "--printshellcmds", "--configfile", cfg)
    out = p.stdout + p.stderr
    assert re.search(r"cli benchmark-search --model results/models/gemma3-270m --calib \S+ --k 2 --methods plain,exact"
                     r" --screen-windows 2 --confirm-top 4 --max-windows 3", out), out[-3000:]
    assert "results/benchmarks/gemma3-270m/alpaca/search_speed.md" in out
