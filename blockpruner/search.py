"""Greedy block search, one step per artifact.

Step k starts from the blocks removed by steps 1..k-1 (read from `step_{k-1}.json`), scores
every remaining candidate block by the calibration perplexity of the model without it, and
removes the best. Because step k depends only on step k-1, the sequence for K is a prefix
of the sequence for K+1 and every step is reused by later, longer runs.

Ties: candidates are ranked by summed NLL (equivalently perplexity, the token count being
shared); bit-identical NLLs are broken by attention-before-MLP, then ascending layer -- the
reference implementation's enumeration order. Non-finite candidates are recorded and never
chosen; a step in which every candidate is non-finite stops with an error.

A step artifact records its inputs' hashes (model content, calibration manifest, previous
step) and its settings; `load_previous` refuses a previous step made for other inputs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .artifacts import read_json, write_json
from .blocks import PrunableModel, block_names, parse_block, tie_order
from .errors import UserError
from .evaluator import Cost, rank, score_candidates

FORMAT = "blockpruner.step/1"
CANDIDATE_SETS = ("all", "attn", "mlp")
log = logging.getLogger("blockpruner.search")


@dataclass(frozen=True)
class StepSettings:
    """Everything besides the inputs that decides a step's result (recorded and compared)."""

    method: str = "blockpruner"
    metric: str = "ppl"
    candidates: str = "all"
    mode: str = "exact"

    def validate(self) -> None:
        if self.candidates not in CANDIDATE_SETS:
            raise UserError(f"unknown candidate set {self.candidates!r}; use one of: {', '.join(CANDIDATE_SETS)}")


def candidate_blocks(num_layers: int, removed: list[str], candidates: str) -> list[str]:
    """Remaining blocks of the chosen set, in the documented tie order."""
    gone = set(removed)
    names = [n for n in block_names(num_layers) if n not in gone]
    if candidates != "all":
        names = [n for n in names if parse_block(n)[0] == candidates]
    return sorted(names, key=tie_order)


def load_previous(prev: str | Path | None, k: int, model_hash: str, calib_hash: str, settings: StepSettings) -> tuple[list[str], dict | None]:
    """Removed blocks after step k-1, after checking that step was made for these inputs."""
    if k < 1:
        raise UserError(f"step k must be >= 1, got {k}")
    if k == 1:
        if prev:
            raise UserError("step 1 starts from the dense model; do not pass --prev")
        return [], None
    if not prev:
        raise UserError(f"step {k} needs --prev pointing at step_{k - 1}.json")
    step = read_json(prev, FORMAT)
    if step["k"] != k - 1:
        raise UserError(f"{prev}: is step {step['k']}, but step {k} needs step {k - 1}")
    if step["inputs"]["model_hash"] != model_hash:
        raise UserError(f"{prev}: stale, made for another model (content hash differs); delete it and rerun the search")
    if step["inputs"]["calibration_hash"] != calib_hash:
        raise UserError(f"{prev}: stale, made with other calibration data; delete it and rerun the search")
    if step["settings"] != asdict(settings):
        raise UserError(f"{prev}: made with settings {step['settings']}, not {asdict(settings)}; use a separate output folder")
    return list(step["removed"]), step


def check_budget(num_layers: int, removed: list[str], settings: StepSettings, k: int) -> list[str]:
    cands = candidate_blocks(num_layers, removed, settings.candidates)
    if not cands:
        raise UserError(
            f"step {k}: no {settings.candidates} blocks left to remove (the model has {2 * num_layers} blocks); lower K"
        )
    return cands


def search_step(pm: PrunableModel, windows, k: int, removed: list[str], settings: StepSettings, inputs: dict,
                progress: bool = True) -> dict:
    """Score every candidate on top of `removed`, choose the best, return the step record."""
    from tqdm.auto import tqdm

    cands = check_budget(pm.num_layers, removed, settings, k)
    t0 = time.perf_counter()
    pm.set_removed(removed)
    cost = Cost()
    with tqdm(total=len(cands) * len(windows), desc=f"step {k}", unit="cand·win", disable=not progress) as bar:
        scores = score_candidates(pm, windows, cands, cost=cost, on_progress=bar.update)
    ranked = rank(scores)
    for s in ranked:
        if s.status == "nonfinite":
            log.warning("step %d: candidate %s has non-finite perplexity; it will not be chosen", k, s.block)
    best = ranked[0]
    if best.status != "done":
        raise UserError(f"step {k}: every candidate gave a non-finite perplexity; use fp32 (--dtype fp32) or check the model")
    chosen = removed + [best.block]
    params = pm.param_summary(chosen)
    record = {
        "k": k,
        "removed_block": best.block,
        "ppl": best.ppl,
        "nll_sum": best.nll_sum,
        "tokens": best.tokens,
        "removed": chosen,
        "attn_removed": sum(parse_block(b)[0] == "attn" for b in chosen),
        "mlp_removed": sum(parse_block(b)[0] == "mlp" for b in chosen),
        "params": params,
        "scores": [s.as_dict() for s in ranked],
        "settings": asdict(settings),
        "inputs": inputs,
        "cost": cost.as_dict(),
        "software": {"blockpruner": __version__},
        "timing": {"elapsed_s": time.perf_counter() - t0},
    }
    pm.set_removed(removed)
    log.info("step %d: removed %s -> ppl %.4f (ratio %.2f%%)", k, best.block, best.ppl, 100 * params["ratio"])
    return record


def write_step(path: str | Path, record: dict) -> dict:
    return write_json(path, record, FORMAT)


def read_step(path: str | Path) -> dict:
    return read_json(path, FORMAT)


def steps_to_ratio(steps: list[dict], ratio: float, key: str = "ratio") -> int:
    """Smallest K whose pruning ratio reaches `ratio`, from an ordered list of step records."""
    if not 0 < ratio < 1:
        raise UserError(f"target ratio must be between 0 and 1, got {ratio}")
    for step in steps:
        if step["params"][key] >= ratio - 1e-12:
            return step["k"]
    have = steps[-1]["params"][key] if steps else 0.0
    raise UserError(f"the {len(steps)} steps found reach ratio {have:.4f} < {ratio}; run more search steps")


def nearest_k(steps: list[dict], ratio: float, key: str = "ratio") -> int:
    """K whose ratio is closest to `ratio` (the paper's way of matching budgets across methods)."""
    if not steps:
        raise UserError("no search steps found")
    return min(steps, key=lambda s: (abs(s["params"][key] - ratio), s["k"]))["k"]


def finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
