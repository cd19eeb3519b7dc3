"""Zero-shot accuracy through lm-evaluation-harness.

The tasks run on the already loaded model. Offline, the `*_local` task YAMLs in
`blockpruner/eval/tasks/` mirror the built-in tasks' prompts, targets and metrics over local
files; the data folder reaches their loaders as TaskManager metadata, so the YAMLs stay
machine-independent. Tasks (and their data) are loaded before the model, so a wrong name or a
missing file costs a second, not a model load. Each task is reported under its standard name
with acc_norm where the task has it, else acc -- the paper's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import write_json
from ..errors import UserError

FORMAT_TASKS = "blockpruner.eval_tasks/1"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


# ---------------------------------------------------------------- lm-eval tasks


@dataclass(frozen=True)
class TaskSpec:
    local: str  # task name of our offline YAML in blockpruner/eval/tasks
    hub: str  # built-in lm-eval task name (reads the Hub)
    hub_dir: str  # folder of the built-in YAML under lm_eval/tasks
    metric: str  # the figure the BlockPruner paper reports


TASKS = {
    "piqa": TaskSpec("piqa_local", "piqa", "piqa", "acc_norm"),
    "winogrande": TaskSpec("winogrande_local", "winogrande", "winogrande", "acc"),
    "hellaswag": TaskSpec("hellaswag_local", "hellaswag", "hellaswag", "acc_norm"),
    "arc_easy": TaskSpec("arc_easy_local", "arc_easy", "arc", "acc_norm"),
    "arc_challenge": TaskSpec("arc_challenge_local", "arc_challenge", "arc", "acc_norm"),
    "openbookqa": TaskSpec("openbookqa_local", "openbookqa", "openbookqa", "acc_norm"),
}


def parse_task_names(tasks: str | list[str]) -> list[str]:
    """Standard task names, in the order given, duplicates dropped; unknown names are an error."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise UserError(f"no tasks given; choose from: {', '.join(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(map(repr, unknown))}; available: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _check_task_args(num_fewshot: int, batch_size: int, limit: int | None) -> None:
    if num_fewshot < 0:
        raise UserError(f"num_fewshot must be 0 or more, got {num_fewshot}")
    if batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive integer (or unset for every example), got {limit}")


def task_manager(local_data: str | Path | None):
    """A TaskManager that indexes only the folders we need (the full index takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    if local_data is not None:
        return TaskManager(include_defaults=False, include_path=str(TASKS_DIR),
                           metadata={"local_data": str(Path(local_data).expanduser().resolve())})
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent
    dirs = sorted({str(builtin / spec.hub_dir) for spec in TASKS.values()})
    if all(Path(d).is_dir() for d in dirs):
        return TaskManager(include_defaults=False, include_path=dirs)
    return TaskManager()  # lm-eval moved its task folders: index everything


def load_tasks(names: list[str], local_data: str | Path | None) -> dict:
    """{standard name: lm-eval Task} with each task's data already read (before any model load)."""
    if local_data is not None and not Path(local_data).expanduser().is_dir():
        raise UserError(f"local eval data folder not found: {local_data}; check evaluate.tasks.local_data / --local-data")
    tm = task_manager(local_data)
    wanted = {name: TASKS[name].local if local_data is not None else TASKS[name].hub for name in names}
    try:
        loaded = tm.load(list(wanted.values()))["tasks"]
    except (FileNotFoundError, ValueError) as e:
        if local_data is None:
            raise
        raise UserError(f"{e}; check --local-data / evaluate.tasks.local_data ({local_data}): it should hold piqa/, "
                        "winogrande/, arc/, openbookqa/, hellaswag/ as in ../shared/data/evals") from None
    except Exception as e:  # network / Hub failures while the built-in tasks download
        if local_data is not None:
            raise
        raise UserError(f"cannot load the Hub data of tasks {', '.join(names)} ({e.__class__.__name__}); offline, "
                        "point at a local copy with --local-data DIR (config key evaluate.tasks.local_data)") from None
    return {name: loaded[task] for name, task in wanted.items()}


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def task_figures(names: list[str], tasks: dict, results: dict) -> dict:
    """Per-task figures from simple_evaluate's output, keyed by standard name."""
    out = {}
    for name in names:
        task = tasks[name].task_name
        r = results["results"][task]
        metric = TASKS[name].metric
        acc, acc_norm = _number(r.get("acc,none")), _number(r.get("acc_norm,none"))
        value = acc_norm if metric == "acc_norm" else acc
        if value is None:
            raise RuntimeError(f"lm-eval gave no {metric} for {task}: {sorted(r)}")
        out[name] = {
            "task": task,
            "metric": metric,
            "value": value,
            "acc": acc,
            "acc_norm": acc_norm,
            "stderr": _number(r.get(f"{metric}_stderr,none")),
            "n": int(results["n-samples"][task]["effective"]),
        }
        samples = results.get("samples", {}).get(task)
        if samples:  # per item, in document order: what a paired comparison of two models needs
            out[name]["correct"] = [int(round(float(x[metric]))) for x in sorted(samples, key=lambda x: x["doc_id"])]
    return out


BOS_CHOICES = {"auto": None, "yes": True, "no": False}


def make_lm(model, tokenizer, manifest: dict, batch_size: int, device: str, add_bos_token: bool | None):
    """lm-eval's HF wrapper with the BOS choice explicit.

    lm-eval 0.4.0 (the paper's, bundled with the official code) encodes context and
    continuation without special tokens; from 0.4.3 on, None defers to the tokenizer, which
    prepends BOS for Llama 2, Baichuan 2 and Gemma and moves every accuracy, dense included.
    False reproduces 0.4.0; None keeps the tokenizer's (what Gemma needs to be itself).
    """
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                trust_remote_code=bool(manifest.get("trust_remote_code", False)), add_bos_token=add_bos_token)


def run_tasks(model_dir: str | Path, tasks: str | list[str], local_data: str | Path | None, num_fewshot: int = 0,
              batch_size: int = 1, limit: int | None = None, device: str = "auto", dtype: str | None = None,
              add_bos_token: str = "auto", numerics: str = "fp32") -> dict:
    """Zero-shot (or few-shot) lm-eval accuracy of a prepared (or pruned) model directory.

    With `local_data`, runs the offline `*_local` tasks over that folder; without, the
    built-in tasks that read the Hub. With num_fewshot > 0 the offline tasks draw examples
    from the evaluation split itself (lm-eval leaves the current example out), as they ship
    no training split.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ..model_dir import load_model_dir, read_manifest
    from ..devices import resolve_device
    from ..numerics import Numerics

    names = parse_task_names(tasks)
    _check_task_args(num_fewshot, batch_size, limit)
    if add_bos_token not in BOS_CHOICES:
        raise UserError(f"--add-bos-token {add_bos_token!r}: use one of {', '.join(BOS_CHOICES)}")
    dtype = Numerics(numerics).load_dtype(dtype)
    manifest = read_manifest(model_dir)
    device = resolve_device(device)
    loaded = load_tasks(names, local_data)
    model, tok, _ = load_model_dir(model_dir, dtype, device)  # remote code only as its manifest says
    lm = make_lm(model, tok, manifest, batch_size, device, BOS_CHOICES[add_bos_token])
    # the tasks go in built; an empty TaskManager keeps simple_evaluate from indexing every task again
    results = lm_eval.simple_evaluate(model=lm, tasks=[loaded[n] for n in names], num_fewshot=num_fewshot, limit=limit,
                                      task_manager=TaskManager(include_defaults=False), log_samples=True)
    per_task = task_figures(names, loaded, results)
    return {
        "model": str(model_dir),
        "model_hash": manifest["content_hash"],
        "tasks": per_task,
        "average": sum(t["value"] for t in per_task.values()) / len(per_task),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "local_data": str(local_data) if local_data is not None else None,
        "dtype": dtype or manifest["dtype"],
        "lm_eval_version": _lm_eval_version(),
        # what the requests were built with: the setting and what it meant for this tokenizer
        "add_bos_token": add_bos_token,
        "numerics": numerics,
        "bos_prepended": _bos_prepended(lm),
    }


def _bos_prepended(lm) -> bool:
    """Whether lm-eval's encoding of a context starts with the tokenizer's BOS."""
    bos = lm.tokenizer.bos_token_id
    return bos is not None and lm.tok_encode("Question: is it?")[:1] == [bos]


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def write_tasks(path: str | Path, record: dict) -> dict:
    if not all(math.isfinite(t["value"]) for t in record["tasks"].values()):
        raise RuntimeError("a task accuracy is not finite; refusing to write it")
    return write_json(path, record, FORMAT_TASKS)
