# Shared setup: config validation, result paths, per-rule resources, code hashes.
#
# Rules stay thin: they pass settings as `params:` (so that a changed setting reruns
# exactly the jobs that use it) and call the `blockpruner` command line.

import ast
import hashlib
import os
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


validate(config, "../schemas/config.schema.yaml")

REPO = Path(workflow.basedir).resolve()
PACKAGE = REPO / "blockpruner"
MODELS = sorted(config["models"])
CALIBS = sorted(config["calibration"])
METHODS = sorted(config["methods"])
KS = sorted(config["prunings"]["k"])
RATIOS = sorted(config["prunings"]["ratio"])
MAX_K = config["search"]["max_k"]
TASK_NAMES = config["evaluate"]["tasks"]["tasks"]

# Every job runs the package from this checkout (so that the code hashes below describe the
# code that ran): PYTHONPATH points at it, and `python` is whichever is on PATH (venv, conda
# env or SLURM job alike).  GPU jobs start as `python -m blockpruner.gpus N -- command`,
# which claims N GPU slots in BLOCKPRUNER_GPU_SLOTS and sets CUDA_VISIBLE_DEVICES (N = 0:
# none, the command runs on the CPU); inside a SLURM job the scheduler's devices stand.
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(str(REPO))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    f"export BLOCKPRUNER_GPU_SLOTS={shlex.quote(config['gpu_slots'])}; "
)
CONDA_ENV = "../../envs/blockpruner.yaml"

NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"


wildcard_constraints:
    model=NAME,
    calib=NAME,
    method=NAME,
    k=r"[1-9][0-9]*",
    shard=r"[0-9]+",
    nshards=r"[1-9][0-9]*",
    pruning=r"k[1-9][0-9]*|r0\.[0-9]+",
    variant=rf"dense|{NAME}/{NAME}/(k[1-9][0-9]*|r0\.[0-9]+)",


# ------------------------------------------------------------------ config checks
# What the JSON schema cannot say; each message names the key.


def _config_error(key, msg):
    raise WorkflowError(f"config: {key}: {msg}")


def data_path(path):
    """A local data path from the config, relative ones resolved against data_root."""
    if path is None:
        return None
    p = os.path.expanduser(path)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(config["data_root"], p))


for _name, _c in config["calibration"].items():
    if _c.get("path") and not os.path.isfile(data_path(_c["path"])):
        _config_error(f"calibration.{_name}.path", f"file not found: {data_path(_c['path'])} (data_root={config['data_root']!r})")
_ppl = config["evaluate"]["perplexity"]
if _ppl["enabled"] and _ppl["path"] and not os.path.isfile(data_path(_ppl["path"])):
    _config_error("evaluate.perplexity.path", f"file not found: {data_path(_ppl['path'])} (data_root={config['data_root']!r})")
if _ppl["enabled"] and not (_ppl["path"] or _ppl["hub"]):
    _config_error("evaluate.perplexity", "give a hub id (hub) or a local file (path)")
_tasks = config["evaluate"]["tasks"]
if _tasks["enabled"] and _tasks["local_data"] and not os.path.isdir(data_path(_tasks["local_data"])):
    _config_error("evaluate.tasks.local_data", f"folder not found: {data_path(_tasks['local_data'])}")
for _name, _m in config["methods"].items():
    if _m.get("screen") and _m["algorithm"] != "blockpruner":
        _config_error(f"methods.{_name}.screen", f"only the blockpruner algorithm has a screened mode, not {_m['algorithm']}")
    if _m.get("screen") and not {"windows", "confirm_top"} <= _m["screen"].keys():
        _config_error(f"methods.{_name}.screen", "give windows and confirm_top (e.g. {windows: 2, confirm_top: 4})")
    if _m.get("screen") and _m["algorithm"] == "blockpruner" and config["search"]["shards"] > 1:
        _config_error(f"methods.{_name}.screen", "a screened search cannot be sharded; set search.shards: 1 or drop screen")
if not KS and not RATIOS and not config["evaluate"]["dense"]:
    _config_error("prunings", "nothing to do: give prunings.k and/or prunings.ratio, or evaluate.dense: true")


# ------------------------------------------------------------------ prunings and K


def ratio_label(ratio):
    """Directory label of a target ratio: 0.2 -> r0.2 (parsed back by float(label[1:]))."""
    return f"r{float(ratio):g}"


def pruning_labels():
    return [f"k{k}" for k in KS] + [ratio_label(r) for r in RATIOS]


if len({ratio_label(r) for r in RATIOS}) != len(RATIOS):
    _config_error("prunings.ratio", "two ratios give the same label; give distinct values")
for _r in RATIOS:
    if "e" in ratio_label(_r):
        _config_error("prunings.ratio", f"{_r} is too small to label (use at least 0.0001)")


def search_depth():
    """Steps each search runs: the largest K asked for, and max_k when ratios are asked for."""
    return max(KS + ([MAX_K] if RATIOS else []), default=0)


def step_path(model, calib, method, k):
    return f"results/search/{model}/{calib}/{method}/step_{k}.json"


def step_command(wildcards):
    """The subcommand writing one step: `step` for BlockPruner (with the screened mode's
    options when the method asks for it), `baseline-step` for the rest."""
    method = config["methods"][wildcards.method]
    if method["algorithm"] != "blockpruner":
        return f"baseline-step --method {method['algorithm']}"
    screen = method.get("screen")
    if not screen:
        return "step"
    by_bi = screen.get("candidates_by_bi")
    return (f"step --screen-windows {screen['windows']} --confirm-top {screen['confirm_top']}"
            + (f" --candidates-by-bi {by_bi}" if by_bi else ""))


def shard_count(wildcards):
    """Shards of one step: search.shards for BlockPruner's exact search, 1 for the baselines
    (their steps score no candidates) and for a search with 1 shard."""
    algorithm = config["methods"][wildcards.method]["algorithm"]
    return config["search"]["shards"] if algorithm == "blockpruner" else 1


def shard_path(model, calib, method, k, shard, count):
    return f"results/search/{model}/{calib}/{method}/shards/step_{k}.shard{shard}of{count}.json"


def step_shards(wildcards):
    """search_step's shard inputs: none when the step is scored in one job."""
    n = shard_count(wildcards)
    if n == 1:
        return []
    return [shard_path(wildcards.model, wildcards.calib, wildcards.method, wildcards.k, i, n) for i in range(n)]


def steps_upto(wildcards, n):
    return [step_path(wildcards.model, wildcards.calib, wildcards.method, i) for i in range(1, n + 1)]


# ------------------------------------------------------------------ resources and devices

_BUILTIN_RESOURCES = {"gpu": 0, "threads": 1, "mem_mb": 4000, "runtime": 60}


def rule_resources(name):
    """gpu / threads / mem_mb / runtime of a rule: built-in < resources.default < resources.<name>."""
    res = {**_BUILTIN_RESOURCES, **config["resources"].get("default", {}), **config["resources"].get(name, {})}
    if config["device"] == "cpu":
        res["gpu"] = 0
    return res


def gpus(name):
    return rule_resources(name)["gpu"]


# ------------------------------------------------------------------ code hashes
# Snakemake's `code` trigger sees only a rule's shell text.  Each rule therefore gets a
# `code` param: a hash over the `blockpruner` subcommand(s) it runs -- their cmd_* function
# in cli.py and every package module those import, transitively.  Hashes are taken over the
# syntax tree without docstrings, so comments, formatting and docstrings never rerun a job.

# Data that a module reads by path rather than by import.
_EXTRA_MODULES = {"eval-tasks": ["blockpruner.eval.tasks"]}


def _strip_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _module_files(dotted):
    """Files of a package module (a .py file, or every file of a subpackage)."""
    if dotted == "blockpruner":
        return [PACKAGE / "__init__.py"]
    base = PACKAGE / Path(*dotted.split(".")[1:])
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    if base.is_dir():
        return sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return []


def _imports(tree, dotted, is_package):
    """Absolute `blockpruner...` names imported anywhere in a module (lazy imports too)."""
    found = set()
    pkg_parts = dotted.split(".") if is_package else dotted.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "blockpruner"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "blockpruner":
                continue
            found.add(mod)
            for a in node.names:  # `from . import x` may name a module
                if _module_files(f"{mod}.{a.name}"):
                    found.add(f"{mod}.{a.name}")
    return found


_HASHES = {}


def _file_digest(path):
    if path not in _HASHES:
        if path.suffix == ".py":
            try:
                text = ast.dump(_strip_docstrings(ast.parse(path.read_text(encoding="utf-8"))))
            except SyntaxError:
                text = path.read_text(encoding="utf-8")
            _HASHES[path] = hashlib.sha256(text.encode()).hexdigest()
        else:
            _HASHES[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _HASHES[path]


def _cli_functions():
    """Subcommand -> cmd_* function node, read from build_parser() in cli.py."""
    try:
        tree = _strip_docstrings(ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8")))
    except SyntaxError as e:
        raise WorkflowError(f"{PACKAGE / 'cli.py'}: cannot be parsed ({e}); fix it before running the workflow")
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    commands, current = {}, None
    for node in ast.walk(funcs.get("build_parser", ast.Module(body=[], type_ignores=[]))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "add_parser" and node.args and isinstance(node.args[0], ast.Constant):
                current = node.args[0].value
            elif node.func.attr == "set_defaults" and current:
                for kw in node.keywords:
                    if kw.arg == "func" and isinstance(kw.value, ast.Name) and kw.value.id in funcs:
                        commands[current] = funcs[kw.value.id]
    return commands


def code_hash(*commands):
    """Hash of what the given `blockpruner` subcommands run (see above)."""
    cli = _cli_functions()
    h = hashlib.sha256()
    for command in commands:
        func = cli.get(command)
        if func is None:  # not written yet: the hash changes when it lands
            h.update(f"missing:{command}".encode())
            continue
        h.update(ast.dump(func).encode())
        todo = _imports(ast.Module(body=[func], type_ignores=[]), "blockpruner.cli", False)
        todo |= set(_EXTRA_MODULES.get(command, []))
        seen = set()
        while todo:
            mod = todo.pop()
            if mod in seen:
                continue
            seen.add(mod)
            files = _module_files(mod)
            for f in files:
                if f.suffix == ".py":
                    parts = ("blockpruner",) + f.relative_to(PACKAGE).with_suffix("").parts
                    is_pkg = parts[-1] == "__init__"
                    dotted = ".".join(parts[:-1] if is_pkg else parts)
                    try:
                        todo |= _imports(ast.parse(f.read_text(encoding="utf-8")), dotted, is_pkg)
                    except SyntaxError:  # being edited: its text is still hashed
                        pass
        for mod in sorted(seen):
            for f in _module_files(mod):
                h.update(f"{f.relative_to(PACKAGE)}:{_file_digest(f)}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ what to build


def eval_variants():
    """dense and {calib}/{method}/{pruning} labels of every evaluated model, per model."""
    pruned = [f"{c}/{m}/{p}" for c in CALIBS for m in METHODS for p in pruning_labels()]
    return (["dense"] if config["evaluate"]["dense"] else []) + pruned


EVAL_KINDS = [
    kind
    for kind, section in (("ppl", "perplexity"), ("tasks", "tasks"), ("speed", "speed"))
    if config["evaluate"][section]["enabled"]
]


def eval_outputs():
    return [f"results/eval/{m}/{v}/{kind}.json" for m in MODELS for v in eval_variants() for kind in EVAL_KINDS]


def search_outputs():
    """Every step of every search (1..search_depth())."""
    n = search_depth()
    return [step_path(m, c, meth, k) for m in MODELS for c in CALIBS for meth in METHODS for k in range(1, n + 1)]


def sequence_outputs():
    if not search_depth():
        return []
    return [f"results/search/{m}/{c}/{meth}/sequence.csv" for m in MODELS for c in CALIBS for meth in METHODS]


def model_dir_of(wildcards):
    """The directory an evaluation reads: the prepared model, or a pruned copy."""
    if wildcards.variant == "dense":
        return f"results/models/{wildcards.model}/manifest.json"
    return f"results/pruned/{wildcards.model}/{wildcards.variant}/manifest.json"


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


# ------------------------------------------------------------------ input functions of the stages


# calibration.smk


def calibration_data(wildcards):
    """The calibration source: the local copy when `path` is set, else the hub id."""
    c = config["calibration"][wildcards.calib]
    return data_path(c["path"]) if c.get("path") else c["hub"]


def calibration_file(wildcards):
    """The local calibration file as an input (so that replacing it reruns sampling), or none."""
    c = config["calibration"][wildcards.calib]
    return [data_path(c["path"])] if c.get("path") else []


# search.smk


def previous_step(wildcards):
    k = int(wildcards.k)
    return [step_path(wildcards.model, wildcards.calib, wildcards.method, k - 1)] if k > 1 else []


def step_gpus(wildcards):
    """A step scored in shards is only gathered by search_step: no GPU for that job."""
    return 0 if step_shards(wildcards) else gpus("search_step")


def score_command(wildcards, input):
    """The scoring part of search_step / search_shard (derived param: it names input paths)."""
    prev = f" --prev {shlex.quote(input.prev[0])}" if input.prev else ""
    device_map = option("--device-map", "models/{model}/device_map")(wildcards)
    return (f"{step_command(wildcards)} --model {shlex.quote(os.path.dirname(input.model))}"
            f" --calib {shlex.quote(os.path.dirname(input.calib))} --k {wildcards.k}{prev}"
            f" --candidates {lookup(dpath=f'methods/{wildcards.method}/candidates', within=config)}"
            f" {device_map} --device auto --no-progress")


def step_job(wildcards, input):
    """search_step's blockpruner subcommand: gather the shards, or score the step itself.
    The rule's shell runs it under blockpruner.gpus with resources.gpu (0 for a gather,
    see step_gpus)."""
    if input.shards:
        return "gather-step --shards " + " ".join(shlex.quote(s) for s in input.shards)
    return score_command(wildcards, input)


# prune.smk


def is_ratio(wildcards):
    return wildcards.pruning.startswith("r")


def pruning_steps(wildcards):
    if is_ratio(wildcards):
        return steps_upto(wildcards, MAX_K)
    k = int(wildcards.pruning[1:])
    return [step_path(wildcards.model, wildcards.calib, wildcards.method, k)]


def resolve_k(wildcards, input):
    """Shell command printing K (derived param: it names input paths)."""
    if not is_ratio(wildcards):
        return f"echo {int(wildcards.pruning[1:])}"
    no_embed = " --no-embed" if config["prunings"]["ratio_of"] == "no_embed" else ""
    steps_dir = shlex.quote(os.path.dirname(input.steps[0]))
    return f"python -m blockpruner.cli target-k --steps {steps_dir} --ratio {float(wildcards.pruning[1:])}{no_embed}"


# evaluate.smk


def perplexity_data():
    p = config["evaluate"]["perplexity"]
    return data_path(p["path"]) if p["path"] else p["hub"]


def perplexity_file(wildcards):
    p = config["evaluate"]["perplexity"]
    return [data_path(p["path"])] if p["path"] else []


def perplexity_hub_config():
    p = config["evaluate"]["perplexity"]
    return f"--hub-config {shlex.quote(p['hub_config'])}" if not p["path"] and p["hub_config"] else ""


def tasks_local_data():
    d = config["evaluate"]["tasks"]["local_data"]
    return f"--local-data {shlex.quote(data_path(d))}" if d else ""


def dense_model(wildcards):
    """The dense model as a baseline for a pruned variant's speed-up (none for dense itself)."""
    return [] if wildcards.variant == "dense" else [f"results/models/{wildcards.model}/manifest.json"]
