"""The paper's baselines and ablations, as step artifacts of exactly the search's shape.

Every method writes `step_<k>.json` through `search.write_step` with the search's record keys
(`k, removed_block, ppl, nll_sum, tokens, removed, attn_removed, mlp_removed, params, scores,
settings, inputs, cost, software, timing`), so materialisation, evaluation, `target-k` and the
summary read them unchanged. `settings.method` names the method and `settings.metric` its
importance metric; step k>1 reads step k-1 through `search.load_previous`, which refuses a
previous step made for another model, calibration set or method.

| method               | unit   | metric         | procedure  | paper                                            |
|----------------------|--------|----------------|------------|--------------------------------------------------|
| `blockpruner`        | block  | calib. ppl     | iterative  | BlockPruner itself (`search.search_step`)        |
| `oneshot`            | block  | calib. ppl     | one-shot   | "- search" ablation (Table 4)                    |
| `layer`              | layer  | calib. ppl     | iterative  | "- block" ablation (Table 4)                     |
| `shortgpt`           | layer  | BI             | one-shot   | ShortGPT baseline (Men et al. 2024)              |
| `relative-magnitude` | layer  | RM             | one-shot   | Relative Magnitude baseline (Samragh et al. 2023) |
| `bi-block`           | block  | BI             | iterative  | Figure 6, block-level BI                         |
| `rm-block`           | block  | RM             | iterative  | Figure 6, block-level RM                         |
| `js`                 | block  | JS divergence  | iterative  | Appendix D / Figure 6, FinerCut-style            |

Lower is less important for every metric; the lowest unit is removed. Ties: the search's
order (attention before MLP, then layer) for blocks, ascending layer for layers.

- *K counts units*: for the layer-level methods step k has removed k whole layers (2k
  blocks, `removed_block = "layer.i"`, `removed_blocks = ["attn.i", "mlp.i"]`); budgets
  across methods are matched by parameter ratio (`analyses.match_budgets`).
- *One-shot* methods rank every unit once, on the dense model, in step 1; the ranking is
  the record's `scores` (best first) and step k removes its first k units. Steps k>1 copy
  it from step k-1 (read with --prev, hash-checked), so the whole sequence derives from one
  scoring pass and is exactly what a separate pass would give.
- *Block-level* methods take the candidate sets of the search (`all`, `attn`, `mlp`);
  layer-level ones only `all`.
- `ppl` / `nll_sum` / `tokens` are always the calibration perplexity of the pruned model of
  that step (for the perplexity methods it is the winning score itself; for the others one
  extra forward pass, which is not counted as pruning time).
- `metric` = {name, level, oneshot, value}: the chosen unit's metric value.
- `timing`: `elapsed_s` (this step's work after the model load), `select_s` (time spent
  choosing, i.e. ranking or scoring candidates), `pruning_s` (selection time from the dense
  model to this step's model: the sum over steps for iterative methods, the one ranking pass
  for one-shot ones) -- the paper's pruning time (Table 7).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..blocks import PrunableModel
from ..errors import UserError
from ..steps import step_record
from .greedy import StepSettings, check_budget

log = logging.getLogger("blockpruner.baselines")


@dataclass(frozen=True)
class Method:
    name: str
    metric: str  # ppl | bi | rm | js
    level: str  # block | layer
    oneshot: bool
    paper: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("blockpruner", "ppl", "block", False, "BlockPruner: iterative block-level perplexity search"),
    Method("oneshot", "ppl", "block", True, "'- search' ablation: block perplexities once on the dense model"),
    Method("layer", "ppl", "layer", False, "'- block' ablation: iterative whole-layer perplexity search"),
    Method("shortgpt", "bi", "layer", True, "ShortGPT: lowest Block Influence layers of the dense model"),
    Method("relative-magnitude", "rm", "layer", True, "Relative Magnitude: lowest ||f(x)||/||x+f(x)|| layers"),
    Method("bi-block", "bi", "block", False, "Figure 6: iterative block-level Block Influence"),
    Method("rm-block", "rm", "block", False, "Figure 6: iterative block-level relative magnitude"),
    Method("js", "js", "block", False, "Appendix D: iterative block-level JS divergence to the dense model"),
)}


def method_of(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; use one of: {', '.join(METHODS)}") from None


def settings_for(method: str, candidates: str = "all", numerics: str = "fp32") -> StepSettings:
    """The step settings of a method (recorded in each step and compared by load_previous)."""
    m = method_of(method)
    if m.name == "blockpruner":
        settings = StepSettings(candidates=candidates, numerics=numerics)
    else:
        settings = StepSettings(method=m.name, metric=m.metric, candidates=candidates, numerics=numerics)
    settings.validate()
    if m.level == "layer" and candidates != "all":
        raise UserError(f"method {m.name!r} removes whole layers; it takes --candidates all, not {candidates!r}")
    return settings


def layer_candidates(num_layers: int, removed: list[str]) -> list[str]:
    """Layers with both blocks still present, as units `layer.i`."""
    gone = set(removed)
    return [f"layer.{i}" for i in range(num_layers) if f"attn.{i}" not in gone and f"mlp.{i}" not in gone]


def candidate_units(settings: StepSettings, num_layers: int, removed: list[str], k: int) -> list[str]:
    """The units step k may remove (one-shot methods: on the dense model), or a UserError."""
    m = method_of(settings.method)
    if m.level == "layer":
        units = layer_candidates(num_layers, [] if m.oneshot else removed)
        if not units:
            raise UserError(f"step {k}: no whole layers left to remove (the model has {num_layers} layers); lower K")
        return units
    return check_budget(num_layers, [] if m.oneshot else removed, settings, k)


def _expand(units: list[str]) -> list[str]:
    from .importance import unit_blocks

    return [b for u in units for b in unit_blocks(u)]


def check_step(settings: StepSettings, num_layers: int, k: int, removed: list[str], prev: dict | None) -> None:
    """Everything that can be checked before the model is loaded."""
    m = method_of(settings.method)
    if m.oneshot and k > 1:
        ranking = prev["scores"]
        if len(ranking) < k or ranking[k - 1]["status"] != "done":
            finite = sum(s["status"] == "done" for s in ranking)
            raise UserError(f"step {k}: the one-shot ranking of {m.name} has only {finite} removable units; lower K")
        if _expand([s["block"] for s in ranking[: k - 1]]) != removed:
            raise UserError(f"step {k}: the previous step's removals do not follow its own ranking (edited?); rerun step 1")
        return
    if m.name == "blockpruner":
        check_budget(num_layers, removed, settings, k)
        return
    candidate_units(settings, num_layers, removed, k)


def rank_for(pm: PrunableModel, windows, m: Method, units: list[str], cost):
    """Ranked UnitScores (lowest first) of `units` on the model as it stands."""
    from .importance import UnitScore, js_scores, rank_units, residual_metrics, unit_nll
    from .exact import score_candidates

    if m.metric == "ppl" and m.level == "block":
        scores = score_candidates(pm, windows, units, cost=cost)
        return rank_units(UnitScore(s.block, "ppl", s.nll_sum, s.tokens, "done" if s.status == "done" else "nonfinite")
                          for s in scores.values())
    if m.metric == "ppl":
        return rank_units(unit_nll(pm, windows, units, cost).values())
    if m.metric in ("bi", "rm"):
        return rank_units(residual_metrics(pm, windows, units, cost)[m.metric].values())
    if m.metric == "js":
        return rank_units(js_scores(pm, windows, units, cost).values())
    raise AssertionError(m.metric)


def baseline_step(pm: PrunableModel, windows, k: int, removed: list[str], settings: StepSettings, inputs: dict,
                  prev: dict | None = None, progress: bool = True) -> dict:
    """One step of a baseline method on top of `removed` (step k-1's removals); returns the record."""
    from .importance import unit_blocks
    from ..engine.cost import Cost
    from ..engine.forward import current_nll

    m = method_of(settings.method)
    if m.name == "blockpruner":
        from .greedy import search_step

        return search_step(pm, windows, k, removed, settings, inputs, progress=progress, prev=prev)
    check_step(settings, pm.num_layers, k, removed, prev)
    t0 = time.perf_counter()
    cost = Cost()
    if m.oneshot and k > 1:  # the ranking of step 1, carried along the chain
        ranking = prev["scores"]
        select_s, pruning_s = 0.0, prev["timing"]["pruning_s"]
        chosen = ranking[k - 1]
    else:
        units = candidate_units(settings, pm.num_layers, removed, k)
        pm.set_removed([] if m.oneshot else removed)
        ranked = rank_for(pm, windows, m, units, cost)
        for s in ranked:
            if s.status != "done":
                log.warning("step %d: %s of %s is not finite; it will not be chosen", k, m.metric, s.unit)
        if ranked[0].status != "done":
            raise UserError(f"step {k}: every candidate gave a non-finite {m.metric}; use fp32 (--dtype fp32) or check the model")
        ranking = [s.as_dict() for s in ranked]
        chosen = ranking[0]
        select_s = time.perf_counter() - t0
        pruning_s = select_s if m.oneshot else _pruning_s(prev) + select_s
    unit = chosen["block"]
    new = unit_blocks(unit)
    now = removed + new
    if m.metric == "ppl" and not (m.oneshot and k > 1):
        nll_sum, tokens = chosen["nll_sum"], chosen["tokens"]
    else:
        pm.set_removed(now)
        score = current_nll(pm, windows, cost)
        nll_sum, tokens = score.nll_sum, score.tokens
    params = pm.param_summary(now)
    metric = {"name": m.metric, "level": m.level, "oneshot": m.oneshot, "value": chosen["value"]}
    timing = {"elapsed_s": time.perf_counter() - t0, "select_s": select_s, "pruning_s": pruning_s}
    record = step_record(k, removed, unit, new, nll_sum, tokens, params, ranking, settings.as_dict(), inputs, cost, timing,
                         removed_blocks=True, metric=metric)
    pm.set_removed(removed)
    log.info("%s step %d: removed %s (%s %.6g) -> calibration ppl %.4f (ratio %.2f%%)", m.name, k, unit, m.metric,
             chosen["value"], record["ppl"], 100 * params["ratio"])
    return record


def _pruning_s(prev: dict | None) -> float:
    """Selection time from the dense model up to the previous step."""
    return float(prev["timing"]["pruning_s"]) if prev else 0.0
