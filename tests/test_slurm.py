"""The SLURM profile (profiles/slurm) and the one-node cluster script.

Without a cluster: the profile parses, and the sbatch options it leads to, per job of a dry
run, are those of snakemake-executor-plugin-slurm's own functions (get_submit_command,
set_gres_string) given the resources Snakemake computed: CPUs, memory and run time per
rule, GPUs as the plugin's `gpu` (--gpus=N, or --gpus=<model>:N with gpu_model) only for
rules that get GPUs, nothing GPU-related for gpu: 0.  With a cluster up (`sbatch` on PATH,
e.g. workflow/scripts/local-slurm.sh start), one test submits the first two stages of the
CI study through the profile.  The whole study through SLURM, compared with a local run, is
`.ci/slurm`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .test_workflow import TEST_CONFIG, copy_workflow, run_snakemake, write_config

PROFILE = ROOT / "profiles/slurm/config.yaml"
LOCAL_SLURM = ROOT / "workflow/scripts/local-slurm.sh"
# rules that must run as cluster jobs (others may join them) and the study's GPU rules
HEAVY = {"prepare_model", "sample_calibration", "search_step", "materialize_model", "eval_perplexity", "eval_tasks",
         "measure_speed"}
GPU_RULES = {"search_step", "eval_perplexity", "eval_tasks", "measure_speed"}


def localrules() -> set[str]:
    """The Snakefile's `localrules:` (they run on the submitting node, not through sbatch)."""
    m = re.search(r"^localrules:\n((?:[ \t]+\w+,?[ \t]*\n)+)", (ROOT / "Snakefile").read_text(), re.M)
    assert m, "no localrules: block in the Snakefile"
    return set(re.findall(r"\w+", m.group(1)))


LOCALRULES = localrules()
GPU_OPTION = re.compile(r"--gpus|--gres|--gpus-per-\w+|--cpus-per-gpu|--ntasks-per-gpu")


# ---------------------------------------------------------------- helpers


class _Resources(dict):
    """job.resources as the plugin reads it: .get() and attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Job:
    def __init__(self, rule: str, threads: int, resources: dict):
        self.name, self.threads, self.resources = rule, threads, _Resources(resources)
        self.wildcards = {}

    def is_group(self):
        return False


def _value(text: str):
    return int(text) if re.fullmatch(r"\d+", text) else text


def dry_run_jobs(main: Path, configfile: str, profile: str = "profiles/slurm") -> list[dict]:
    """rule, threads and resources of every job of `snakemake -n --profile <profile>` (a dry
    run prints localrules as `rule` too).  --cores: a dry run caps threads at its cores; on
    the cluster nothing does, and each job's threads become its --cpus-per-task."""
    p = run_snakemake(main, "-n", "--cores", "1024", "--profile", profile, "--configfile", configfile)
    jobs = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", p.stdout + p.stderr, re.M):
        fields = dict(re.findall(r"^    (\w+): (.*)$", m.group(2), re.M))
        items = (item.split("=", 1) for item in fields.get("resources", "").split(", ") if "=" in item)
        jobs.append({"rule": m.group(1), "threads": int(fields.get("threads", 1)),
                     "resources": {k: _value(v) for k, v in items}})
    assert jobs, p.stdout + p.stderr
    return jobs


def sbatch_options(job: dict) -> str:
    """The sbatch command line the plugin builds for a job (without --wrap), from its own
    functions; account and partition as the executor adds them (-A / -p)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    fake = _Job(job["rule"], job["threads"], job["resources"])
    res = job["resources"]
    params = {
        "run_uuid": "uuid",
        "slurm_logfile": ".snakemake/slurm_logs/%j.log",
        "comment_str": f"rule_{job['rule']}",
        "account": f" -A {res['slurm_account']}" if res.get("slurm_account") else "",
        "partition": f" -p {res['slurm_partition']}" if res.get("slurm_partition") else "",
        "workdir": "/work",
    }
    return get_submit_command(fake, params) + set_gres_string(fake)


def by_rule(jobs: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for job in jobs:
        if job["rule"] not in LOCALRULES:  # the Snakefile's localrules run on the submitting node
            out.setdefault(job["rule"], []).append(sbatch_options(job))
    return out


def gpu_study(main: Path) -> str:
    """The CI study with the demo's (config.yaml's) resources, GPUs included, and device auto."""
    demo = yaml.safe_load((main / "config.yaml").read_text())

    def change(cfg):
        cfg["device"] = "auto"
        cfg["resources"] = demo["resources"]

    return write_config(main, "gpu", change)


def uncommented_gpu_profile(main: Path) -> str:
    """A copy of the profile with its commented GPU block (partition + gpu_model) switched on."""
    lines = PROFILE.read_text().splitlines()
    out = [line for line in lines if not re.match(r"^  (measure_speed|search_step|search_shard):$|^    (# timing|slurm_extra)",
                                                  line)]
    out = [re.sub(r"^  # (\w+:)$", r"  \1", line) for line in out]
    out = [re.sub(r"^  #   (\w+: .*)$", r"    \1", line) for line in out]
    dest = main / "profiles/slurm-gpu"
    dest.mkdir()
    (dest / "config.yaml").write_text("\n".join(out) + "\n")
    assert yaml.safe_load((dest / "config.yaml").read_text())["set-resources"]["search_step"]["gpu_model"] == "a100"
    return "profiles/slurm-gpu"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("slurm"), messages=False)


# ---------------------------------------------------------------- the profile


def test_profile_parses_and_leaves_resources_to_the_study():
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"
    defaults = profile["default-resources"]
    assert {"slurm_partition", "slurm_account"} <= defaults.keys()
    # threads, memory, run time and GPU counts are the study's: the profile must not pin them
    # for every rule (cpus_per_task would override each rule's threads)
    assert not {"cpus_per_task", "mem_mb", "runtime", "gpu", "gpu_model", "gres"} & defaults.keys()
    for rule, res in (profile.get("set-resources") or {}).items():
        assert rule in HEAVY | {"search_shard"}, rule
        # gpu_model would be sent as --gpus=<model>:0 for a study with gpu: 0 (see below)
        assert not {"gpu", "gpu_model", "gres"} & res.keys(), (rule, res)


def test_ci_study_jobs_request_cpus_memory_time_and_no_gpu(fresh):
    """The CI study (device: cpu): every job outside the localrules is an sbatch job with its
    rule's threads, mem_mb and runtime, the profile's partition and account, no GPU option."""
    jobs = dry_run_jobs(fresh, TEST_CONFIG)
    assert HEAVY | {"all", "summarize"} <= {j["rule"] for j in jobs}
    calls = by_rule(jobs)
    assert HEAVY <= set(calls)
    for job in jobs:
        if job["rule"] in LOCALRULES:
            continue
        res, line = job["resources"], sbatch_options(job)
        assert res["gpu"] == 0 and not GPU_OPTION.search(line), line
        assert " -p cpu" in line and " -A my-account" in line, line
        assert f"--mem {res['mem_mb']}" in line and f"-t {res['runtime']}" in line, line
        assert f"--cpus-per-task={job['threads']}" in line, line
        assert ("--exclusive" in line) == (job["rule"] == "measure_speed"), line
        # a step stops cleanly before its time limit and resumes in the next job
        assert ("--signal=TERM@120" in line) == (job["rule"] in ("search_step", "search_shard")), line
    assert all("--mem 4000" in line and "-t 30" in line for line in calls["search_step"])


def test_gpu_study_requests_gpus_for_gpu_rules_only(fresh):
    """The demo's gpu: 1 for the GPU rules -> --gpus=1 (any GPU) with their threads and
    memory; the rules with gpu: 0 (prepare_model, sample_calibration, materialize_model) get
    no GPU option.  In general: a GPU option exactly when the job's gpu resource is > 0."""
    jobs = [j for j in dry_run_jobs(fresh, gpu_study(fresh)) if j["rule"] not in LOCALRULES]
    for job in jobs:
        gpu, line = job["resources"]["gpu"], sbatch_options(job)
        if gpu:
            assert re.search(rf"--gpus={gpu}(\s|$)", line) and len(GPU_OPTION.findall(line)) == 1, line
        else:
            assert not GPU_OPTION.search(line), line
    gpu_of = {j["rule"]: j["resources"]["gpu"] for j in jobs}
    assert all(gpu_of[r] == 1 for r in GPU_RULES) and all(gpu_of[r] == 0 for r in HEAVY - GPU_RULES), gpu_of
    calls = by_rule(jobs)
    assert all("--cpus-per-task=2" in line and "--mem 8000" in line for line in calls["search_step"])


def test_device_cpu_requests_no_gpu_even_where_the_study_gives_gpu_counts(fresh):
    """device: cpu forces gpu 0 (common.smk), so gpu: 1 rules send no GPU option."""
    def change(cfg):
        cfg["device"] = "cpu"
        cfg["resources"] = {"default": {"gpu": 0}, **{rule: {"gpu": 1} for rule in GPU_RULES}}

    calls = by_rule(dry_run_jobs(fresh, write_config(fresh, "cpu-gpu1", change)))
    assert HEAVY <= set(calls)
    assert not [line for lines in calls.values() for line in lines if GPU_OPTION.search(line)]


def test_commented_gpu_block_pins_partition_and_model_for_a_gpu_study(fresh):
    """The profile's commented GPU block, switched on: --gpus=a100:1 in the GPU partition for
    the GPU rules, the CPU partition and no GPU for the others.  For a gpu: 0 study the plugin
    would send --gpus=a100:0, which is why the block is commented out (the profile's note)."""
    profile = uncommented_gpu_profile(fresh)
    jobs = [j for j in dry_run_jobs(fresh, gpu_study(fresh), profile) if j["rule"] not in LOCALRULES]
    assert HEAVY <= {j["rule"] for j in jobs}
    for job in jobs:
        gpu, line = job["resources"]["gpu"], sbatch_options(job)
        if gpu:  # every rule that can get GPUs must be in the block
            assert f"--gpus=a100:{gpu}" in line and " -p gpu" in line, (job["rule"], line)
        else:
            assert not GPU_OPTION.search(line) and " -p cpu" in line, (job["rule"], line)
    cpu_calls = by_rule(dry_run_jobs(fresh, TEST_CONFIG, profile))["search_step"]
    # the plugin's behaviour the profile's note warns about; if this changes, the GPU block
    # can be switched on for every study
    assert all("--gpus=a100:0" in line for line in cpu_calls), cpu_calls
    assert "--gpus=<model>:0" in PROFILE.read_text()


def test_local_slurm_script_is_valid_bash():
    assert LOCAL_SLURM.stat().st_mode & 0o111, "workflow/scripts/local-slurm.sh is not executable"
    subprocess.run(["bash", "-n", str(LOCAL_SLURM)], check=True)
    subprocess.run(["bash", "-n", str(ROOT / ".ci/slurm")], check=True)
    p = subprocess.run(["bash", str(LOCAL_SLURM), "nonsense"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr


# ---------------------------------------------------------------- with a cluster


def _cluster_up() -> bool:
    if not shutil.which("sbatch") or not shutil.which("scontrol"):
        return False
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in p.stdout


def _default_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    return next((p.rstrip("*") for p in out if p.endswith("*")), out[0] if out else "")


@pytest.mark.gemma
@pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster up (sbatch not on PATH or scontrol ping fails); "
                    "start one with workflow/scripts/local-slurm.sh start -- CI runs the whole study through .ci/slurm")
def test_profile_submits_jobs_to_the_cluster(tmp_path):
    """prepare_model and sample_calibration of the CI study through the profile: each is one
    sbatch job with a job id and a log in .snakemake/slurm_logs, without GPU options."""
    main = copy_workflow(tmp_path, whole_study=True)
    target = "results/calib/gemma3-270m/alpaca/manifest.json"
    p = run_snakemake(main, "--profile", "profiles/slurm", "--configfile", TEST_CONFIG,
                      "--default-resources", f"slurm_partition={_default_partition()}", "--slurm-no-account",
                      "--slurm-keep-successful-logs", "--slurm-init-seconds-before-status-checks", "2",
                      "--verbose", target, timeout=1200)
    out = p.stdout + p.stderr
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", out)
    assert sorted(rule for _, rule in submitted) == ["prepare_model", "sample_calibration"], out[-3000:]
    calls = re.findall(r"^sbatch call: (.*)$", out, re.M)
    assert len(calls) == 2 and not any(GPU_OPTION.search(c) for c in calls), calls
    for jid, rule in submitted:
        assert list((main / ".snakemake/slurm_logs").glob(f"rule_{rule}/**/{jid}.log")), (rule, jid)
    assert (main / target).exists()
