"""The step artifact: what one step of any method removed, and reading chains of them.

Every method writes one record per step (`step_record`): the search, its shards' gather, the
baselines; `materialize --blocks` builds one for a given list without writing it. Step k's
`removed` continues step k-1's (`read_chain`), and a pruning ratio resolves to the smallest
K reaching it (`steps_to_ratio`). The export, the evaluations and the reports read steps
from here, below the search that writes them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .version import __version__
from .artifacts import read_json, write_json
from .blocks import parse_block
from .engine.cost import Cost
from .engine.forward import perplexity_of
from .errors import UserError

FORMAT = "blockpruner.step/1"
SHARD_FORMAT = "blockpruner.step-shard/1"
log = logging.getLogger("blockpruner.steps")


def step_record(k: int, removed_before: list[str], unit: str, blocks: list[str], nll_sum: float, tokens: int, params: dict,
                scores: list[dict], settings: dict, inputs: dict, cost: Cost, timing: dict, *,
                removed_blocks: bool = False, metric: dict | None = None, search: dict | None = None) -> dict:
    """The step artifact every method writes (the search, its shards' gather, the baselines).

    unit: what the step removed (a block, or `layer.i`); blocks: its blocks, listed as
    `removed_blocks` when asked (the baselines, whose units may be layers); metric: the
    baselines' importance value of the unit; settings: what decided the result
    (`StepSettings.as_dict()` for a search); search: how the search bounded its scoring.
    """
    removed = list(removed_before) + list(blocks)
    record = {"k": k, "removed_block": unit}
    if removed_blocks:
        record["removed_blocks"] = list(blocks)
    record |= {
        "ppl": perplexity_of(nll_sum, tokens),
        "nll_sum": nll_sum,
        "tokens": tokens,
        "removed": removed,
        "attn_removed": sum(parse_block(b)[0] == "attn" for b in removed),
        "mlp_removed": sum(parse_block(b)[0] == "mlp" for b in removed),
        "params": params,
    }
    if metric is not None:
        record["metric"] = metric
    record |= {"scores": scores, "settings": settings, "inputs": inputs}
    if search is not None:
        record["search"] = search
    record |= {"cost": cost.as_dict(), "software": {"blockpruner": __version__}, "timing": timing}
    return record


def write_step(path: str | Path, record: dict) -> dict:
    return write_json(path, record, FORMAT)


def read_step(path: str | Path) -> dict:
    return read_json(path, FORMAT)


def read_steps(paths: list[str | Path]) -> list[dict]:
    return read_chain([read_step(p) for p in paths])


def read_chain(steps: list[dict], label: str = "steps") -> list[dict]:
    """Steps 1..K in order, each continuing the previous one.

    A step adds one block (block-level methods) or a whole layer's two blocks (layer-level
    methods), so step k's `removed` must start with step k-1's and be longer.
    """
    chain = sorted(steps, key=lambda s: s["k"])
    ks = [s["k"] for s in chain]
    if ks != list(range(1, len(ks) + 1)):
        raise UserError(f"{label}: steps must be 1..K without gaps, got k = {ks}")
    for prev, cur in zip(chain, chain[1:]):
        n = len(prev["removed"])
        if len(cur["removed"]) <= n or cur["removed"][:n] != prev["removed"]:
            raise UserError(f"{label}: step {cur['k']} does not continue step {prev['k']} (stale file?); rerun the search")
    return chain


def steps_to_ratio(steps: list[dict], ratio: float, key: str = "ratio") -> int:
    """Smallest K whose pruning ratio reaches `ratio`, from an ordered list of step records."""
    if not 0 < ratio < 1:
        raise UserError(f"target ratio must be between 0 and 1, got {ratio}")
    for step in steps:
        if step["params"][key] >= ratio - 1e-12:
            return step["k"]
    have = steps[-1]["params"][key] if steps else 0.0
    raise UserError(f"the {len(steps)} steps found reach ratio {have:.4f} < {ratio}; run more search steps")


def write_shard(path: str | Path, record: dict) -> dict:
    return write_json(path, record, SHARD_FORMAT)


def read_shard(path: str | Path) -> dict:
    return read_json(path, SHARD_FORMAT)


def step_inputs(model: str | Path, manifest: dict, calib: str | Path, calib_hash: str, prev: str | Path | None) -> dict:
    """What a step artifact records about its inputs (hashes are checked by the next step)."""
    return {"model": str(model), "model_hash": manifest["content_hash"], "calibration": str(calib),
            "calibration_hash": calib_hash, "previous_step": str(prev) if prev else None}


def chosen_step(step: str | None, steps: list[str] | None, ratio: float | None, no_embed: bool = False,
                blocks: str | None = None, blocks_allowed: bool = False) -> str | None:
    """The step file of --step, or of the smallest K in --steps whose ratio reaches --ratio; None
    for materialize's --blocks (a block list given, not a step)."""
    given = [name for name, v in (("--step", step), ("--steps", steps), ("--blocks", blocks)) if v is not None]
    if len(given) != 1:
        choices = "--step FILE, --steps FILES --ratio R" + (" or --blocks attn.5,mlp.6,..." if blocks_allowed else "")
        raise UserError(f"give one of {choices}" + (f", not {' and '.join(given)} together" if given else ""))
    if blocks is not None:
        if ratio is not None or no_embed:
            raise UserError("--ratio and --no-embed pick K among --steps; --blocks names the blocks itself, so drop them")
        return None
    if (steps is None) != (ratio is None):
        raise UserError("--steps FILES and --ratio R go together (or give one --step FILE)")
    if steps is None:
        return step
    records = [read_step(p) for p in steps]
    k = steps_to_ratio(read_chain(records), ratio, "ratio_no_embed" if no_embed else "ratio")
    log.info("ratio %g of %s parameters is reached at K=%d", ratio, "non-embedding" if no_embed else "all", k)
    return steps[[r["k"] for r in records].index(k)]
