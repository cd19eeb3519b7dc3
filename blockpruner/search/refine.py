"""Refining greedy's removal set at a fixed K: exact swaps, and an evolutionary search.

Greedy's set at K is not the best set of K blocks: depth pruning is not monotone (EvoPress,
Sieberling et al. 2025), and a block that greedy removed early may be the wrong one once
later blocks are gone. Both refinements start from greedy's set at K (its step artifact)
and keep K, and the number of attention and MLP blocks, fixed; each K is refined on its
own, so a refined set is not a prefix of the next K's.

Swap (`method: swap`). A round scores every swap of a removed block r for a kept block c of
the same kind against the incumbent's total NLL. For each r, the model without S - {r} is
walked once per batch of windows and each c's suffix runs from the state before c (prefix
reuse, `exact.score_against`), with early stopping and the head bound against the
incumbent's total (its columns from the incumbent's own logits, `exact.score_incumbent`):
every swap that could improve is scored exactly, the rest are cut. The best improving swap
(lowest NLL; ties by r, then c, in the tie order) becomes the incumbent; the search ends
when no swap improves or after the round limit. `mixed`: swaps across kinds too, where the
removed parameters stay at least the starting set's (the model never grows).

Evolution (`method: evolution`), EvoPress's (1 + lambda) search for depth pruning, kept: the
level-switch mutation (1..M flips, M drawn as the smaller of two uniform draws; a flip
restores one removed block and removes one kept block of the same kind), elitism, and
selection in steps on growing numbers of calibration windows (drawn anew each generation).
Changed, and why: it starts from greedy's set, not random sets (the search refines it); the
fitness is the calibration NLL, the search's own objective (EvoPress defaults to the KL
divergence to the dense model); the last selection step scores the finalists on every
window with the parent's total as the bound (exact early stopping and the head bound), so a
child replaces the parent only when it is better on the whole calibration set; a set that
reached that step once is never bred again (it cannot beat a parent that only improves).

Both never end above greedy's calibration perplexity. The overfitting guard
(`holdout_windows` H > 0): the last H calibration windows do not select; a change is
accepted only if it also lowers their NLL, else the swap search stops there and a
generation keeps its parent.

Artifacts: one JSON per round (a generation is a round) in `<out>.rounds/`, recording every
scored change with its status and NLL, the incumbent before and after, the cost and the
time; a rerun continues after the last round written, and inside a round from its journal
(`journal`, as a step does). The result is a step record (`steps.step_record`) of K with the
refined set, which materialize, the evaluations and the summary read as they read a step.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifacts import read_json, write_json
from ..blocks import PrunableModel, block_index, block_names, parse_block, tie_order
from ..engine.cost import Cost
from ..engine.forward import Score
from ..errors import UserError
from ..steps import step_record
from . import HEAD_BOUND_COLUMNS
from .exact import score_against, score_incumbent
from .journal import NO_JOURNAL, Journal, Scope

METHODS = ("swap", "evolution")
ROUND_FORMAT = "blockpruner.refine-round/1"
NOT_COMPARED = ("head_bound_columns", "window_batch", "early_stop")  # recorded; a rerun may continue with other values
log = logging.getLogger("blockpruner.refine")
Progress = Callable[..., None]


@dataclass(frozen=True)
class RefineSettings:
    """What decides a refinement's rounds (recorded, and compared when a rerun continues them).
    The round or generation limit is not among them: round j is the same for any limit."""

    method: str = "swap"
    mixed: bool = False  # swap: also across kinds, at no fewer removed parameters than the start
    holdout_windows: int = 0  # the last H calibration windows judge each change; the rest select
    offspring: int = 16  # evolution: children per generation (lambda)
    max_mutations: int = 3  # evolution: flips per child, 1..M (the smaller of two uniform draws)
    selection: tuple[tuple[int, int], ...] = ((1, 4),)  # evolution: (windows, survivors) before the full step
    seed: int = 0  # evolution: generation j draws from random.Random(f"{seed}:{j}")
    head_bound_columns: int = HEAD_BOUND_COLUMNS
    window_batch: int = 1
    early_stop: bool = True  # off: every change scored on every window (same result)

    def validate(self, windows: int) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown refinement {self.method!r}; use one of: {', '.join(METHODS)}")
        if not isinstance(self.holdout_windows, int) or not 0 <= self.holdout_windows < windows:
            raise UserError(f"holdout_windows must be an integer from 0 to {windows - 1} (the calibration set has "
                            f"{windows} windows; at least one must select), got {self.holdout_windows!r}")
        for name in ("offspring", "max_mutations", "window_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.head_bound_columns, int) or self.head_bound_columns < 0:
            raise UserError(f"head_bound_columns must be an integer >= 0 (0 = off), got {self.head_bound_columns!r}")
        survivors = [s for _, s in self.selection]
        if any(w < 1 or s < 1 for w, s in self.selection) or survivors != sorted(survivors, reverse=True):
            raise UserError(f"selection must be (windows, survivors) steps with positive numbers and survivors not "
                            f"growing, e.g. [[1, 4], [3, 2]]; got {[list(x) for x in self.selection]}")

    def as_dict(self) -> dict:
        d = asdict(self) | {"selection": [list(x) for x in self.selection]}
        if self.method == "swap":
            for name in ("offspring", "max_mutations", "selection", "seed"):
                del d[name]
        else:
            del d["mixed"]
        return d

    def compared(self) -> dict:
        return {k: v for k, v in self.as_dict().items() if k not in NOT_COMPARED}


def swap_candidates(pm: PrunableModel, removed: Sequence[str], out: str, kinds: Sequence[str], mixed: bool,
                    min_params: int) -> list[str]:
    """The blocks that may replace `out` in `removed`: kept blocks of its kind (mixed: of any
    allowed kind where the removed parameters stay at least `min_params`), in tie order."""
    gone = set(removed)
    kind = parse_block(out)[0]
    rest = [b for b in removed if b != out]
    names = [b for b in block_names(pm.num_layers) if b not in gone and parse_block(b)[0] in kinds]
    if not mixed:
        return sorted((b for b in names if parse_block(b)[0] == kind), key=tie_order)
    return sorted((b for b in names if parse_block(b)[0] == kind
                   or pm.param_summary(rest + [b])["removed"] >= min_params), key=tie_order)


def replaced(removed: Sequence[str], out: str, into: str) -> list[str]:
    """`removed` with `out` replaced by `into` in its place (the order stays readable)."""
    return [into if b == out else b for b in removed]


def score_set(pm: PrunableModel, windows: Sequence, removed: Sequence[str], bound: float | None = None,
              columns: list | None = None, *, early_stop: bool = True, cost: Cost, batch: int = 1,
              journal: Scope = NO_JOURNAL.scope(""), on_progress: Progress | None = None) -> Score:
    """The NLL of the model without `removed` on `windows` (against `bound`, as `score_against`)."""
    last = _on_top(pm, removed)
    return score_against(pm, windows, [last], bound, columns, early_stop=early_stop, cost=cost, batch=batch,
                         journal=journal, on_progress=on_progress)[last]


def _on_top(pm: PrunableModel, removed: Sequence[str]) -> str:
    """Remove all of `removed` but its last block in block order, which is returned: the set is
    scored as that candidate on top of the others (the engine scores candidates, not sets)."""
    last = max(removed, key=block_index)
    pm.set_removed([b for b in removed if b != last])
    return last


def incumbent(pm: PrunableModel, windows: Sequence, removed: Sequence[str], settings: RefineSettings, cost: Cost,
              journal: Scope) -> tuple[Score, list | None]:
    """The set's total NLL on `windows` and its head-bound columns there (`exact.score_incumbent`)."""
    return score_incumbent(pm, windows, _on_top(pm, removed), head_bound=settings.head_bound_columns, cost=cost,
                           batch=settings.window_batch, journal=journal)


def _nll(s: Score) -> float | None:
    return s.nll_sum if s.status == "done" and math.isfinite(s.nll_sum) else None


def swap_round(pm: PrunableModel, select: Sequence, removed: list[str], settings: RefineSettings, kinds: Sequence[str],
               min_params: int, cost: Cost, journal: Journal, progress: Progress | None = None) -> dict:
    """One round of swaps against the incumbent `removed`: every swap's record, and the best
    improving one (None when none improves on the selection windows)."""
    base, columns = incumbent(pm, select, removed, settings, cost, journal.scope("incumbent"))
    if _nll(base) is None:
        raise UserError(f"the set to refine ({', '.join(removed)}) has a non-finite calibration NLL; use fp32")
    tried = []
    for out in sorted(removed, key=tie_order):
        cands = swap_candidates(pm, removed, out, kinds, settings.mixed, min_params)
        pm.set_removed([b for b in removed if b != out])
        scores = score_against(pm, select, cands, base.nll_sum, columns, early_stop=settings.early_stop, cost=cost,
                               batch=settings.window_batch, journal=journal.scope(f"swap/{out}"), on_progress=progress)
        tried += [{"out": out, "in": c} | scores[c].as_dict() for c in cands]
    for t in tried:
        del t["block"]
    better = [t for t in tried if t["status"] == "done" and t["nll_sum"] < base.nll_sum]
    best = min(better, key=lambda t: (t["nll_sum"], tie_order(t["out"]), tie_order(t["in"])), default=None)
    return {"incumbent": base.as_dict() | {"block": None}, "tried": tried, "best": best,
            "after": replaced(removed, best["out"], best["in"]) if best else None}


def mutate(removed: Sequence[str], num_layers: int, kinds: Sequence[str], rng: random.Random, max_mutations: int) -> list[str]:
    """EvoPress's level-switch mutation: 1..M flips (the smaller of two uniform draws, which
    favours few), each restoring one removed block and removing one kept block of one kind."""
    child = list(removed)
    flips = min(rng.randint(1, max_mutations), rng.randint(1, max_mutations))
    for _ in range(flips):
        gone = set(child)
        open_kinds = [k for k in kinds if any(parse_block(b)[0] == k for b in child)
                      and any(parse_block(b)[0] == k and b not in gone for b in block_names(num_layers))]
        if not open_kinds:
            break
        kind = rng.choice(sorted(open_kinds))
        out = rng.choice(sorted((b for b in child if parse_block(b)[0] == kind), key=tie_order))
        into = rng.choice([b for b in block_names(num_layers) if parse_block(b)[0] == kind and b not in gone])
        child = replaced(child, out, into)
    return child


def _label(removed: Sequence[str]) -> str:
    return ",".join(sorted(removed, key=tie_order))


def generation(pm: PrunableModel, select: Sequence, parent: list[str], j: int, settings: RefineSettings,
               kinds: Sequence[str], seen: set[str], cost: Cost, journal: Journal, progress: Progress | None = None,
               parents: dict | None = None) -> dict:
    """One generation: lambda children of `parent`, selection on random subsets of windows,
    then the survivors on every selection window against the parent's total. `parents`
    keeps the parent's total and head-bound columns for the next generation, which usually
    has the same parent."""
    rng = random.Random(f"{settings.seed}:{j}")
    children: dict[str, list[str]] = {}
    for _ in range(100 * settings.offspring):
        if len(children) == settings.offspring:
            break
        child = mutate(parent, pm.num_layers, kinds, rng, settings.max_mutations)
        label = _label(child)
        if label != _label(parent) and label not in seen and label not in children:
            children[label] = child
    stages = []
    alive = sorted(children)
    for s, (n, survive) in enumerate(settings.selection):
        idx = sorted(rng.sample(range(len(select)), min(n, len(select))))
        wins = [select[i] for i in idx]
        scored = {c: score_set(pm, wins, children[c], cost=cost, batch=settings.window_batch,
                               journal=journal.scope(f"stage{s}/{c}"), on_progress=progress) for c in alive}
        ranked = sorted(alive, key=lambda c: (_nll(scored[c]) if _nll(scored[c]) is not None else math.inf, c))
        stages.append({"windows": idx, "scores": [{"removed": children[c], "nll_sum": scored[c].nll_sum,
                                                   "status": scored[c].status} for c in ranked]})
        alive = ranked[:survive]
    parents = {} if parents is None else parents
    if _label(parent) not in parents:
        parents.clear()
        parents[_label(parent)] = incumbent(pm, select, parent, settings, cost, journal.scope("parent"))
    base, columns = parents[_label(parent)]
    if _nll(base) is None:
        raise UserError(f"the set to refine ({', '.join(parent)}) has a non-finite calibration NLL; use fp32")
    final = []
    for c in alive:
        s = score_set(pm, select, children[c], base.nll_sum, columns, early_stop=settings.early_stop, cost=cost,
                      batch=settings.window_batch, journal=journal.scope(f"final/{c}"), on_progress=progress)
        final.append({"removed": children[c]} | s.as_dict())
        seen.add(c)
    for t in final:
        del t["block"]
    better = [t for t in final if t["status"] == "done" and t["nll_sum"] < base.nll_sum]
    best = min(better, key=lambda t: (t["nll_sum"], _label(t["removed"])), default=None)
    return {"incumbent": base.as_dict() | {"block": None}, "stages": stages, "tried": final, "best": best,
            "after": best["removed"] if best else None}


def judged(pm: PrunableModel, judge: Sequence, before: list[str], after: list[str], settings: RefineSettings,
           cost: Cost, journal: Journal) -> dict:
    """The held-out windows' verdict on a change: both sets' NLL there, and whether it fell."""
    old = score_set(pm, judge, before, cost=cost, batch=settings.window_batch, journal=journal.scope("judge/before"))
    new = score_set(pm, judge, after, cost=cost, batch=settings.window_batch, journal=journal.scope("judge/after"))
    ok = _nll(new) is not None and _nll(old) is not None and new.nll_sum < old.nll_sum
    return {"before_nll_sum": old.nll_sum, "after_nll_sum": new.nll_sum, "tokens": new.tokens, "accepted": ok}


def rounds_dir(out: str | Path) -> Path:
    return Path(f"{out}.rounds")


def read_rounds(folder: Path, key: dict) -> list[dict]:
    """The rounds a previous run wrote for this key, in order; refused when made for another."""
    rounds = []
    for j in range(1, 1 << 30):
        path = folder / f"round_{j}.json"
        if not path.exists():
            break
        r = read_json(path, ROUND_FORMAT)
        if r["key"] != key:
            raise UserError(f"{path}: made for other inputs or settings; delete {folder} (or rerun with --fresh) to "
                            "refine from the start")
        if rounds and r["before"] != (rounds[-1]["after"] or rounds[-1]["before"]):
            raise UserError(f"{path}: does not continue round {j - 1} (a stale file?); delete {folder} and rerun")
        rounds.append(r)
    return rounds


def refine(pm: PrunableModel, windows: Sequence, start: dict, settings: RefineSettings, inputs: dict, out: str | Path,
           *, rounds: int, kinds: Sequence[str], progress: bool = True, journal_device: str = "cpu",
           dtype: str | None = None) -> dict:
    """Refine the set of step record `start` for up to `rounds` rounds (generations), writing
    each round to `<out>.rounds/round_<j>.json`; returns the refined set's step record."""
    settings.validate(len(windows))
    n = len(windows) - settings.holdout_windows
    select, judge = list(windows[:n]), list(windows[n:])
    key = {"start": start["removed"], "k": start["k"], "inputs": {k: v for k, v in inputs.items() if k.endswith("hash")},
           "settings": settings.compared(), "windows": len(windows)}
    folder = rounds_dir(out)
    done = read_rounds(folder, key)
    current = done[-1]["after"] or done[-1]["before"] if done else list(start["removed"])
    min_params = pm.param_summary(list(start["removed"]))["removed"]
    seen = {_label(t["removed"]) for r in done for t in r.get("tried", []) if "removed" in t}
    total = Cost()
    for r in done:
        total += Cost.from_dict(r["cost"])
    stopped = next((r["stop"] for r in done if r["stop"]), None)
    parents: dict = {}  # evolution: the parent's total and columns, while it stays the parent
    for j in range(len(done) + 1, rounds + 1):
        if stopped and settings.method == "swap":
            break
        record = _round(pm, select, judge, current, j, settings, kinds, min_params, seen, parents, key, folder,
                        progress, {"device": journal_device, "dtype": dtype})
        total += Cost.from_dict(record["cost"])
        inc = record["incumbent"]
        if record["after"]:
            log.info("%s round %d: %s -> NLL %.4f (was %.4f on %d tokens)", settings.method, j,
                     _change(current, record["after"]), record["best"]["nll_sum"], inc["nll_sum"], inc["tokens"])
            current = record["after"]
        else:
            log.info("%s round %d: kept %s (NLL %.4f)%s", settings.method, j, _label(current), inc["nll_sum"],
                     f"; {record['stop']}" if record["stop"] else "")
        done.append(record)
        stopped = record["stop"]
    return _result(pm, windows, start, current, settings, inputs, done, total, kinds, folder)


def _round(pm: PrunableModel, select: Sequence, judge: Sequence, current: list[str], j: int, settings: RefineSettings,
           kinds: Sequence[str], min_params: int, seen: set[str], parents: dict, key: dict, folder: Path,
           progress: bool, where: dict) -> dict:
    """Round (generation) j from `current`, journaled, written to `folder/round_<j>.json`."""
    from tqdm.auto import tqdm

    from .journal import interruptible, journal_path

    path = folder / f"round_{j}.json"
    folder.mkdir(parents=True, exist_ok=True)
    journal = Journal.open(journal_path(path), key | {"round": j, "before": current} | where)
    cost = Cost()
    journal.track(cost)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with tqdm(desc=f"{settings.method} round {j}", unit="cand·win", disable=not progress) as bar, \
                interruptible(journal):
            def tick(n_win: int, score: Score | None = None, replayed: bool = False) -> None:
                bar.update(n_win)

            if settings.method == "swap":
                r = swap_round(pm, select, current, settings, kinds, min_params, cost, journal, tick)
            else:
                r = generation(pm, select, current, j, settings, kinds, seen, cost, journal, tick, parents)
            stop = "no swap lowers the calibration NLL" if r["after"] is None else None
            if r["after"] is not None and judge:
                r["judge"] = judged(pm, judge, current, r["after"], settings, cost, journal)
                if not r["judge"]["accepted"]:
                    r["after"], stop = None, "the best change raised the held-out windows' NLL"
    finally:
        journal.close()
    record = {"round": j, "method": settings.method, "key": key, "before": current} | r | {
        "stop": stop if settings.method == "swap" else None, "cost": journal.spent().as_dict(),
        "timing": {"elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}}
    write_json(path, record, ROUND_FORMAT)
    journal.remove()
    return record


def _change(before: Sequence[str], after: Sequence[str]) -> str:
    out = sorted(set(before) - set(after), key=tie_order)
    into = sorted(set(after) - set(before), key=tie_order)
    return f"{'+'.join(out)} -> {'+'.join(into)}"


def _result(pm: PrunableModel, windows: Sequence, start: dict, removed: list[str], settings: RefineSettings,
            inputs: dict, done: list[dict], cost: Cost, kinds: Sequence[str], folder: Path) -> dict:
    """The refined set's step record: its NLL over every calibration window, as a step records
    it (the start's when nothing changed; without held-out windows, the last round's accepted
    change; with them, the set scored on every window once more), the history of the rounds,
    and their work and time summed (over every run that wrote them)."""
    if sorted(removed) == sorted(start["removed"]):
        nll, tokens = start["nll_sum"], start["tokens"]
    elif not settings.holdout_windows:
        last = next(r for r in reversed(done) if r["after"])
        nll, tokens = last["best"]["nll_sum"], last["best"]["tokens"]
    else:
        final = score_set(pm, windows, removed, cost=cost, batch=settings.window_batch)
        nll, tokens = final.nll_sum, final.tokens
    pm.set_removed([])
    history = [{"round": r["round"], "before": r["before"], "after": r["after"], "incumbent_nll_sum":
                r["incumbent"]["nll_sum"], "tried": len(r["tried"]), "finished": sum(t["status"] == "done" for t in r["tried"]),
                "stop": r["stop"], "cost": r["cost"]} for r in done]
    search = {"refine": settings.as_dict(), "rounds_dir": str(folder), "start": list(start["removed"]),
              "start_nll_sum": start["nll_sum"], "start_tokens": start["tokens"], "kinds": list(kinds),
              "rounds": history, "changed": sorted(set(removed) ^ set(start["removed"]), key=tie_order)}
    settings_record = dict(start["settings"]) | {"refine": settings.method}
    timing = {key: sum(r["timing"][key] for r in done) for key in ("elapsed_s", "cpu_s")}
    return step_record(start["k"], [], f"refined:{settings.method}", removed, nll, tokens, pm.param_summary(removed), [],
                       settings_record, inputs, cost, timing, removed_blocks=True, search=search)
