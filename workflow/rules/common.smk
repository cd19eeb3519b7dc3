# Shared setup: config validation, result paths and the per-rule job resources.
#
# Rules stay thin: they pass settings as `params:` (so that a changed setting reruns
# exactly the jobs that use it) and call one `blockpruner` subcommand; the input and params
# functions of single rules are in inputs.smk, the code rerun triggers in code.smk.

import json
import os
import re
import shlex
import sys
from argparse import Namespace
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


validate(config, "../schemas/config.schema.yaml")

REPO = Path(workflow.basedir).resolve()
sys.path.insert(0, str(REPO))  # the package's constants (no torch is imported for them)
from blockpruner.compress import ALGORITHMS as COMPRESSORS  # noqa: E402
from blockpruner.search import REFINE_SETTINGS  # noqa: E402

MODELS = sorted(config["models"])
CALIBS = sorted(config["calibration"])
METHODS = sorted(config["methods"])
# COMPRESSORS rewrite the model instead of searching blocks to remove: no step files, one
# compress_model job per ratio target (compress.smk)
COMPRESS_METHODS = [m for m in METHODS if config["methods"][m]["algorithm"] in COMPRESSORS]
# REFINE_METHODS refine another search's set at each K (refine.smk): no step files of their own
REFINE_METHODS = [m for m in METHODS if config["methods"][m].get("refine")]
# SEARCH_METHODS remove blocks (their prunings are materialised, compensated, exported);
# STEP_METHODS are those of them that write step files (search.smk)
SEARCH_METHODS = [m for m in METHODS if m not in COMPRESS_METHODS]
STEP_METHODS = [m for m in SEARCH_METHODS if m not in REFINE_METHODS]
KS = sorted(config["prunings"]["k"])
RATIOS_OF = {m: sorted(config["prunings"]["ratio_by_model"].get(m, config["prunings"]["ratio"])) for m in MODELS}
RATIOS = sorted({r for rs in RATIOS_OF.values() for r in rs})  # every model's, for the checks and the search depth
MAX_K = config["search"]["max_k"]
TASK_NAMES = config["evaluate"]["tasks"]["tasks"]

# Every job runs the package from this checkout (so that the code hashes of code.smk describe
# the code that ran): PYTHONPATH points at it, and `python` is whichever is on PATH (venv,
# conda env or SLURM job alike).  GPU jobs start as `python -m blockpruner.gpus N -- command`,
# which claims N GPU slots in BLOCKPRUNER_GPU_SLOTS and sets CUDA_VISIBLE_DEVICES (N = 0:
# none, the command runs on the CPU); inside a SLURM job the scheduler's devices stand.
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(str(REPO))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    f"export BLOCKPRUNER_GPU_SLOTS={shlex.quote(config['gpu_slots'])}; "
)
CONDA_ENV = "../../envs/blockpruner.yaml"

NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"
NEVER = r"(?!x)x"  # a wildcard constraint that matches nothing


wildcard_constraints:
    model=NAME,
    calib=NAME,
    method=NAME,
    k=r"[1-9][0-9]*",
    shard=r"[0-9]+",
    nshards=r"[1-9][0-9]*",
    pruning=r"k[1-9][0-9]*|r0\.[0-9]+",
    variant=rf"dense|{NAME}/{NAME}/(k[1-9][0-9]*|r0\.[0-9]+)(\+[a-z]+)?",  # +{comp}: compensate.smk


# ------------------------------------------------------------------ config checks
# What the JSON schema cannot say; each message names the key.


def config_error(key, msg):
    raise WorkflowError(f"config: {key}: {msg}")


def data_path(path):
    """A local data path from the config, relative ones resolved against data_root."""
    if path is None:
        return None
    p = os.path.expanduser(path)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(config["data_root"], p))


def ratio_label(ratio):
    """Directory label of a target ratio: 0.2 -> r0.2 (parsed back by float(label[1:]))."""
    return f"r{float(ratio):g}"


for _name, _c in config["calibration"].items():
    if _c.get("path") and not os.path.isfile(data_path(_c["path"])):
        config_error(f"calibration.{_name}.path", f"file not found: {data_path(_c['path'])} (data_root={config['data_root']!r})")
_ppl = config["evaluate"]["perplexity"]
if _ppl["enabled"] and _ppl["path"] and not os.path.isfile(data_path(_ppl["path"])):
    config_error("evaluate.perplexity.path", f"file not found: {data_path(_ppl['path'])} (data_root={config['data_root']!r})")
if _ppl["enabled"] and not (_ppl["path"] or _ppl["hub"]):
    config_error("evaluate.perplexity", "give a hub id (hub) or a local file (path)")
_tasks = config["evaluate"]["tasks"]
if _tasks["enabled"] and _tasks["local_data"] and not os.path.isdir(data_path(_tasks["local_data"])):
    config_error("evaluate.tasks.local_data", f"folder not found: {data_path(_tasks['local_data'])}")
for _name, _m in config["methods"].items():
    if _m.get("screen") and _m["algorithm"] != "blockpruner":
        config_error(f"methods.{_name}.screen", f"only the blockpruner algorithm has a screened mode, not {_m['algorithm']}")
    if _m.get("screen") and not {"windows", "confirm_top"} <= _m["screen"].keys():
        config_error(f"methods.{_name}.screen", "give windows and confirm_top (e.g. {windows: 2, confirm_top: 4})")
    if _m.get("screen") and _m["algorithm"] == "blockpruner" and config["search"]["shards"] > 1:
        config_error(f"methods.{_name}.screen", "a screened search cannot be sharded; set search.shards: 1 or drop screen")
    if _m.get("compensation", "none") != "none" and (_m["algorithm"] != "blockpruner" or _m.get("screen")):
        config_error(f"methods.{_name}.compensation", "only an exact blockpruner search (no screen) is compensation-aware")
    if _m.get("refine"):
        _base = config["methods"].get(_m.get("from"))
        if _base is None or _base.get("refine") or _base["algorithm"] in COMPRESSORS:
            _choices = ", ".join(m for m, c in config["methods"].items() if not c.get("refine") and c["algorithm"] not in COMPRESSORS)
            config_error(f"methods.{_name}.from", f"name the search whose sets it refines, one of: {_choices or '(none: add one)'}")
        _extra = sorted(key for key, plain in (("algorithm", "blockpruner"), ("candidates", "all"), ("compensation", "none"),
                                               ("screen", None)) if _m.get(key, plain) != plain)  # the schema's defaults
        if _extra:
            config_error(f"methods.{_name}", f"a refinement takes refine, from and settings only, not {', '.join(_extra)} "
                         "(it keeps the kinds of blocks the search in `from` chose)")
        _bad = set(_m.get("settings") or {}) - set(REFINE_SETTINGS[_m["refine"]])
        if _bad:
            config_error(f"methods.{_name}.settings", f"unknown {', '.join(sorted(_bad))} for refine: {_m['refine']}; "
                         f"use {', '.join(REFINE_SETTINGS[_m['refine']])}")
    elif _m.get("from") is not None:
        config_error(f"methods.{_name}.from", "only a refinement (refine: swap or evolution) takes from")
    elif _m.get("settings") is not None and _m["algorithm"] not in COMPRESSORS:
        config_error(f"methods.{_name}.settings", f"only the slicegpt and laco algorithms and refinements take settings, "
                     f"not {_m['algorithm']}")
for _name in config["prunings"]["ratio_by_model"]:
    if _name not in MODELS:
        config_error(f"prunings.ratio_by_model.{_name}", f"no such model; models: {', '.join(MODELS)}")
if COMPRESS_METHODS and not all(RATIOS_OF.values()):
    config_error(f"methods.{COMPRESS_METHODS[0]}", "slicegpt and laco compress to a parameter ratio: give prunings.ratio "
                 "(prunings.k applies to the search methods only)")
if COMPRESS_METHODS and config["prunings"]["ratio_of"] != "all":
    config_error(f"methods.{COMPRESS_METHODS[0]}", "slicegpt and laco target a ratio of all parameters: set "
                 "prunings.ratio_of: all")
for _name in config["export"]["models"] or []:
    if _name not in MODELS:
        config_error("export.models", f"no such model {_name!r}; models: {', '.join(MODELS)}")
if config["export"]["gguf"] and config["export"]["speed"] and not config["evaluate"]["speed"]["enabled"]:
    config_error("export.speed", "times GGUF files with evaluate.speed's sizes: set evaluate.speed.enabled: true, "
                 "or export.speed: false")
if not KS and not RATIOS and not config["evaluate"]["dense"]:
    config_error("prunings", "nothing to do: give prunings.k and/or prunings.ratio, or evaluate.dense: true")
if len({ratio_label(r) for r in RATIOS}) != len(RATIOS):
    config_error("prunings.ratio", "two ratios give the same label; give distinct values")
for _r in RATIOS:
    if "e" in ratio_label(_r):
        config_error("prunings.ratio", f"{_r} is too small to label (use at least 0.0001)")


# ------------------------------------------------------------------ job resources


_BUILTIN_RESOURCES = {"gpu": 0, "threads": 1, "mem_mb": 4000, "runtime": 60}


def rule_resources(name):
    """gpu / threads / mem_mb / runtime of a rule: built-in < resources.default < resources.<name>;
    gpu is 0 everywhere when device is cpu."""
    res = {**_BUILTIN_RESOURCES, **config["resources"].get("default", {}), **config["resources"].get(name, {})}
    if config["device"] == "cpu":
        res["gpu"] = 0
    return res


def job_resources(name, gpu=True):
    """What goes in a rule's `resources:` (threads have their own directive); gpu=False for
    a rule that never uses a GPU."""
    res = rule_resources(name)
    return {"gpu": res["gpu"] if gpu else 0, "mem_mb": res["mem_mb"], "runtime": res["runtime"]}


# ------------------------------------------------------------------ result paths


def pruning_labels(method, model):
    """Labels of the prunings of a method on a model: K and ratio targets, ratio targets only
    for a compressor."""
    ks = [] if method in COMPRESS_METHODS else [f"k{k}" for k in KS]
    return ks + [ratio_label(r) for r in RATIOS_OF[model]]


def search_depth():
    """Steps each search runs: the largest K asked for, and max_k when ratios are asked for."""
    return max(KS + ([MAX_K] if RATIOS else []), default=0)


def step_path(model, calib, method, k):
    return f"results/search/{model}/{calib}/{method}/step_{k}.json"


def steps_upto(wildcards, n):
    return [step_path(wildcards.model, wildcards.calib, wildcards.method, i) for i in range(1, n + 1)]


def eval_variants(model):
    """dense, {calib}/{method}/{pruning} and {calib}/{method}/{pruning}+{comp} labels of every
    evaluated variant of a model (compensated_variants: inputs.smk)."""
    pruned = [f"{c}/{m}/{p}" for c in CALIBS for m in METHODS for p in pruning_labels(m, model)]
    return (["dense"] if config["evaluate"]["dense"] else []) + pruned + compensated_variants(model)


EVAL_KINDS = [
    kind
    for kind, section in (("ppl", "perplexity"), ("tasks", "tasks"), ("speed", "speed"))
    if config["evaluate"][section]["enabled"]
]


def eval_outputs():
    return [f"results/eval/{m}/{v}/{kind}.json" for m in MODELS for v in eval_variants(m) for kind in EVAL_KINDS]


def gguf_variants(model):
    """dense and the block-removal variants (search methods' prunings, compensated ones) of a model."""
    pruned = [f"{c}/{m}/{p}" for c in CALIBS for m in SEARCH_METHODS for p in pruning_labels(m, model)]
    return ["dense"] + pruned + compensated_variants(model)


def gguf_outputs():
    """Every GGUF file export.gguf asks for, with export.speed each pruned file's llama.cpp timing, and
    each pruned variant's model card beside its files."""
    models = config["export"]["models"] or MODELS
    files = [f"results/gguf/{m}/{v}/model-{t}.gguf" for m in models for v in gguf_variants(m) for t in config["export"]["gguf"]]
    speed = [f"results/eval/{m}/{v}/speed-gguf-{t}.json" for m in models for v in gguf_variants(m) if v != "dense"
             for t in config["export"]["gguf"]] if config["export"]["speed"] else []
    cards = [f"results/gguf/{m}/{v}/README.md" for m in models for v in gguf_variants(m) if v != "dense"] \
        if config["export"]["gguf"] else []
    return files + speed + cards


def search_outputs():
    """Every step of every search (1..search_depth())."""
    n = search_depth()
    return [step_path(m, c, meth, k) for m in MODELS for c in CALIBS for meth in STEP_METHODS for k in range(1, n + 1)]


def refined_path(model, calib, method, pruning):
    return f"results/refine/{model}/{calib}/{method}/{pruning}.json"


def refine_outputs():
    """The refined set of every refinement at every pruning (the summary reads their K and ratio)."""
    return [refined_path(m, c, meth, p) for m in MODELS for c in CALIBS for meth in REFINE_METHODS
            for p in pruning_labels(meth, m)]


def compress_outputs():
    """The manifests of the compressed models (their achieved ratios go into the summary)."""
    return [f"results/pruned/{m}/{c}/{meth}/{ratio_label(r)}/manifest.json"
            for m in MODELS for c in CALIBS for meth in COMPRESS_METHODS for r in RATIOS_OF[m]]


def sequence_outputs():
    if not search_depth():
        return []
    return [f"results/search/{m}/{c}/{meth}/sequence.csv" for m in MODELS for c in CALIBS for meth in STEP_METHODS]


# ------------------------------------------------------------------ small helpers for params


def option(flag, dpath):
    """params helper: `--flag value` from the config at dpath (wildcards allowed), or '' when null."""

    def fn(wildcards):
        value = lookup(dpath=dpath.format(**dict(wildcards.items())), within=config)
        return "" if value is None else f"{flag} {shlex.quote(str(value))}"

    return fn


def dirname_of(key):
    """Derived params helper: the directory holding input file `key` (a manifest)."""
    return lambda wildcards, input: os.path.dirname(input[key])
