"""Greedy block search, one step per artifact.

Step k starts from the blocks removed by steps 1..k-1 (read from `step_{k-1}.json`), scores
every remaining candidate block by the calibration perplexity of the model without it, and
removes the best. Because step k depends only on step k-1, the sequence for K is a prefix
of the sequence for K+1 and every step is reused by later, longer runs.

Ties: candidates are ranked by summed NLL (equivalently perplexity, the token count being
shared); bit-identical NLLs are broken by attention-before-MLP, then ascending layer -- the
reference implementation's enumeration order. Non-finite candidates are recorded and never
chosen; a step in which every candidate is non-finite stops with an error.

Exact steps (`mode: exact`, the default) choose exactly the block plain greedy chooses.
By default they stop losers early (`exact.score_exact`): the candidate ranked best by
the previous step (`prev`) is scored first and its total bounds the others; a candidate
whose running NLL exceeds it is recorded with status "stopped" and its partial NLL. The
chosen block and every finished NLL are those of scoring everything (`early_stop=False`).
With early stopping, the head bound (`head_bound_columns` N, default
`search.HEAD_BOUND_COLUMNS`; 0 = off) first cuts candidates whose exact NLL so far plus a
lower bound from N LM-head columns per window already exceeds the seed's total (status
"bounded"): same choice and finished NLLs, much less of the LM head.

Compensation-aware steps (`compensation: scale`, opt-in): each candidate is scored with the
per-channel scale correction of the whole removed set applied (`compensate.search`), so the
search prefers blocks whose loss the correction recovers; the step's perplexity is the
compensated model's. No prefix reuse or early stopping applies (the correction changes what
every candidate's suffix receives): every candidate runs every remaining block on every window.

Batched windows (`window_batch` B, default 1 on a CPU and 8 on a GPU: `--window-batch`):
every forward of the engine runs B consecutive calibration windows of one length at once, so
the blocks' matmuls fill an accelerator. Sums are still added window by window in order; a
finished NLL differs from B = 1's only where the batch shape changes a kernel's rounding, and
a loser's stop (its partial record) is seen at a window's end rather than between head
chunks. Compensation-aware steps run one window at a time.

Sharded steps: `shard=(i, n)` scores only candidates i, i+n, i+2n, ... of the tie-ordered
candidate list (plus the seed, which every shard scores to get the same bound) and returns
a partial record (format `blockpruner.step-shard/1`); `gather_shards` picks the winner. The
gathered step equals the unsharded one except for `cost` (the work of all shards, summed),
`timing`, and a `shards` field listing each shard's work.

Screened steps (`mode: screened`, opt-in, approximate): `bi_candidates=R` keeps the R
candidates whose layers have the lowest Block Influence on the current model;
`screen_windows=S, confirm_top=M` scores every candidate on the first S windows, keeps the
best M (the rest get status "screened") and finishes those on all windows with exact early
stopping. The choice is the best of the M, not necessarily plain greedy's. The settings
record the mode, so `load_previous` never chains a screened step into an exact one.

A step artifact records its inputs' hashes (model content, calibration manifest, previous
step) and its settings; `load_previous` refuses a previous step made for other inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..version import __version__
from ..blocks import PrunableModel, block_names, parse_block, tie_order
from ..errors import UserError
from ..numerics import Numerics
from . import HEAD_BOUND_COLUMNS
from ..engine.cost import Cost
from ..engine.forward import Score, rank
from ..steps import read_step, step_record
from .exact import score_candidates, score_exact
from .journal import NO_JOURNAL, Journal
from .importance import layer_influence

CANDIDATE_SETS = ("all", "attn", "mlp")
MODES = ("exact", "screened")
SCREEN_FIELDS = ("screen_windows", "confirm_top", "bi_candidates")
COMPENSATIONS = ("none", "scale")
NOT_COMPARED = ("head_bound_columns", "window_batch")  # recorded, but a step may continue one made with another value
log = logging.getLogger("blockpruner.search")
# (pm, windows, removed, candidates, cost, on_progress) -> each candidate's score with its correction
CompensatedScorer = Callable[[PrunableModel, Sequence, list, list, Cost, Callable[[int], None]], dict]


@dataclass(frozen=True)
class StepSettings:
    """Everything besides the inputs that decides a step's result (recorded and compared).

    Early stopping and sharding are not settings: they never change the chosen block or a
    finished score. The head bound does not either; its size is recorded (it decides which
    losers are "bounded") but not compared by `load_previous`. Nor does the window batch
    beyond fp32 rounding (recorded where it is not 1, not compared).
    """

    method: str = "blockpruner"
    metric: str = "ppl"
    candidates: str = "all"
    mode: str = "exact"
    screen_windows: int | None = None  # screened: score every candidate on the first S windows
    confirm_top: int | None = None  # screened: finish the best M of them on all windows
    bi_candidates: int | None = None  # screened: only the R blocks whose layers have the lowest BI
    head_bound_columns: int = HEAD_BOUND_COLUMNS  # LM-head columns per window of the head bound; 0 = off
    numerics: str = "fp32"  # fp32 | official-bf16 (blockpruner.numerics)
    compensation: str = "none"  # none | scale: score each candidate with its correction applied
    compensation_alpha: float | None = None  # scale: the pull toward 1 (compensate.fit.check_method resolves it)
    window_batch: int = 1  # calibration windows per forward (engine.forward.window_groups)

    @classmethod
    def make(cls, candidates: str = "all", screen_windows: int | None = None, confirm_top: int | None = None,
             bi_candidates: int | None = None, **kw) -> "StepSettings":
        """Settings with the mode implied by the screening options (any given -> screened)."""
        screened = any(v is not None for v in (screen_windows, confirm_top, bi_candidates))
        return cls(candidates=candidates, mode="screened" if screened else "exact", screen_windows=screen_windows,
                   confirm_top=confirm_top, bi_candidates=bi_candidates, **kw)

    def validate(self) -> None:
        if self.candidates not in CANDIDATE_SETS:
            raise UserError(f"unknown candidate set {self.candidates!r}; use one of: {', '.join(CANDIDATE_SETS)}")
        if self.mode not in MODES:
            raise UserError(f"unknown search mode {self.mode!r}; use one of: {', '.join(MODES)}")
        given = {f: getattr(self, f) for f in SCREEN_FIELDS if getattr(self, f) is not None}
        if self.mode == "exact" and given:
            raise UserError(f"an exact step takes no screening options ({', '.join(given)}); use mode 'screened'")
        if self.mode == "screened" and not given:
            raise UserError("a screened step needs --screen-windows S with --confirm-top M, and/or --candidates-by-bi R")
        if (self.screen_windows is None) != (self.confirm_top is None):
            raise UserError("--screen-windows and --confirm-top go together: score all on S windows, finish the best M")
        for f, v in given.items():
            if not isinstance(v, int) or v < 1:
                raise UserError(f"{f} must be a positive integer, got {v!r}")
        Numerics(self.numerics)  # refuses an unknown mode
        if self.compensation not in COMPENSATIONS:
            raise UserError(f"unknown compensation {self.compensation!r}; use one of: {', '.join(COMPENSATIONS)}")
        if self.compensation != "none":
            if self.mode != "exact" or self.method != "blockpruner":
                raise UserError("a compensation-aware step is an exact BlockPruner step; drop the screening options")
            alpha = self.compensation_alpha
            if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
                raise UserError(f"compensation_alpha must be a finite number >= 0, got {alpha!r} "
                                "(compensate.fit.check_method gives the method's default)")
        if not isinstance(self.window_batch, int) or self.window_batch < 1:
            raise UserError(f"window_batch must be a positive integer (windows per forward), got {self.window_batch!r}")
        if not isinstance(self.head_bound_columns, int) or self.head_bound_columns < 0:
            raise UserError(f"head_bound_columns must be an integer >= 0 (0 = off), got {self.head_bound_columns!r}")

    def as_dict(self) -> dict:
        """What the step records; exact steps omit the screening fields, other methods than
        blockpruner (the baselines) the head bound, which they do not use."""
        d = asdict(self)
        if self.mode == "exact":
            for f in SCREEN_FIELDS:
                if d[f] is None:
                    del d[f]
        if self.method != "blockpruner":
            del d["head_bound_columns"]
        if self.compensation == "none":  # as before compensation-aware steps existed
            del d["compensation"], d["compensation_alpha"]
        else:
            d["compensation_alpha"] = float(self.compensation_alpha)
        if self.window_batch == 1:  # as before batched windows existed
            del d["window_batch"]
        return d

    def compared(self) -> dict:
        """What `load_previous` compares: the recorded settings that decide the result."""
        return {k: v for k, v in self.as_dict().items() if k not in NOT_COMPARED}


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
    step = read_step(prev)
    if step["k"] != k - 1:
        raise UserError(f"{prev}: is step {step['k']}, but step {k} needs step {k - 1}")
    if step["inputs"]["model_hash"] != model_hash:
        raise UserError(f"{prev}: stale, made for another model (content hash differs); delete it and rerun the search")
    if step["inputs"]["calibration_hash"] != calib_hash:
        raise UserError(f"{prev}: stale, made with other calibration data; delete it and rerun the search")
    made = {"numerics": "fp32"} | {key: v for key, v in step["settings"].items() if key not in NOT_COMPARED}
    if made != settings.compared():
        raise UserError(f"{prev}: made with settings {made}, not {settings.compared()}; use a separate output folder")
    return list(step["removed"]), step


def check_budget(num_layers: int, removed: list[str], settings: StepSettings, k: int) -> list[str]:
    cands = candidate_blocks(num_layers, removed, settings.candidates)
    if not cands:
        raise UserError(
            f"step {k}: no {settings.candidates} blocks left to remove (the model has {2 * num_layers} blocks); lower K"
        )
    return cands


def parse_shard(text: str) -> tuple[int, int]:
    """`i/N` (0 <= i < N) -> (i, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"bad shard {text!r}: expected i/N, e.g. 0/2 (shards are numbered 0..N-1)") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"bad shard {text!r}: need N >= 1 and 0 <= i < N (shards are numbered 0..N-1)")
    return i, n


def shard_candidates(cands: list[str], shard: tuple[int, int] | None) -> list[str]:
    """Shard i of n: round-robin over the tie-ordered candidates."""
    if shard is None:
        return list(cands)
    i, n = shard
    return list(cands[i::n])


def _prefer(prev: dict | None) -> list[str]:
    """The early-stop seed preference: the previous step's finished candidates, best first. A
    candidate it cut early is left out (its partial NLL says little about the next step); with
    none left, the seed comes from the head bound or the first window, as in step 1."""
    return [s["block"] for s in prev.get("scores", []) if s["status"] == "done"] if prev else []


def _screened(pm: PrunableModel, windows, cands: list[str], settings: StepSettings, early_stop: bool, cost: Cost,
              on_progress, journal: Journal = NO_JOURNAL) -> tuple[dict[str, Score], dict]:
    """Screened scoring: BI preselection and/or screen on S windows + exact confirmation of the best M."""
    info: dict = {}
    if settings.bi_candidates is not None:
        bi = layer_influence(pm, windows, cost)
        by_bi = sorted(cands, key=lambda b: (bi[parse_block(b)[1]], tie_order(b)))
        cands = sorted(by_bi[: settings.bi_candidates], key=tie_order)
        info["block_influence"] = {str(i): v for i, v in bi.items()}
        info["bi_kept"] = cands
    if settings.screen_windows is None:
        res = score_exact(pm, windows, cands, early_stop=early_stop, head_bound=settings.head_bound_columns, cost=cost,
                          on_progress=on_progress, batch=settings.window_batch, journal=journal.scope("exact"))
        return res.scores, info | res.info()
    s_win = min(settings.screen_windows, len(windows))
    screen = score_candidates(pm, windows[:s_win], cands, cost=cost, on_progress=on_progress, batch=settings.window_batch,
                              journal=journal.scope("screen"))
    order = [s.block for s in rank(screen) if s.status == "done"]
    kept = order[: settings.confirm_top]
    for b in order[settings.confirm_top:]:
        screen[b].status = "screened"
    res = score_exact(pm, windows[s_win:], sorted(kept, key=tie_order), prefer=kept, early_stop=early_stop,
                      head_bound=settings.head_bound_columns, start={b: screen[b] for b in kept}, seed_from="screen",
                      cost=cost, on_progress=on_progress, batch=settings.window_batch, journal=journal.scope("confirm"))
    info["confirmed"] = kept
    return screen | res.scores, info | res.info()


def journal_key(k: int, removed: list[str], settings: StepSettings, inputs: dict, *, prev: dict | None,
                early_stop: bool, shard: tuple[int, int] | None, device: str, dtype: str | None) -> dict:
    """What a step's journal must have been made for to be replayed: everything its numbers
    depend on (inputs' hashes, settings, the seed preference, the device type and dtype)."""
    hashes = {k: v for k, v in inputs.items() if k.endswith("hash")}
    return {"k": k, "removed": list(removed), "inputs": hashes, "settings": settings.as_dict(), "prefer": _prefer(prev),
            "early_stop": early_stop, "shard": list(shard) if shard else None, "device": device, "dtype": dtype}


class StepProgress:
    """A step's progress: the bar, and every `every_s` seconds a log line a user on a cluster can
    read (candidates finished of all, candidate-windows done, the best finished so far, an upper
    bound on the time left from this run's rate; work replayed from the journal is counted apart)."""

    def __init__(self, k: int, candidates: int, windows: int, bar, every_s: float = 60.0):
        self.k, self.candidates, self.windows, self.bar = k, candidates, windows, bar
        self.total, self.done, self.replayed, self.every_s = candidates * windows, 0, 0, every_s
        self.scores: dict[str, Score] = {}
        self.t0 = self.last = time.perf_counter()

    def __call__(self, n: int, score: Score | None = None, replayed: bool = False) -> None:
        self.bar.update(n)
        self.done += n
        self.replayed += n if replayed else 0
        if score is not None:
            self.scores[score.block] = score
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        finished = [s for s in self.scores.values() if s.status != "done" or s.windows_done >= self.windows]
        full = [s for s in finished if s.status == "done"]
        best = min(full, key=lambda s: (s.nll_sum, tie_order(s.block)), default=None)
        computed = self.done - self.replayed
        eta = (now - self.t0) / computed * max(self.total - self.done, 0) if computed else math.inf
        return (f"step {self.k}: {len(finished)}/{self.candidates} candidates finished, "
                f"{self.done}/{self.total} candidate-windows ({self.replayed} from the journal), best so far "
                f"{f'{best.block} (ppl {best.ppl:.4f})' if best else '-'}, at most {_duration(eta)} left")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def search_step(pm: PrunableModel, windows, k: int, removed: list[str], settings: StepSettings, inputs: dict,
                progress: bool = True, *, prev: dict | None = None, early_stop: bool = True,
                shard: tuple[int, int] | None = None, score_compensated: CompensatedScorer | None = None,
                journal: Journal = NO_JOURNAL, log_every_s: float = 60.0) -> dict:
    """Score the candidates on top of `removed`, choose the best, return the step record.

    prev: the previous step's record; its ranking picks the early-stop seed (any order is
      exact, a good one stops more losers). early_stop: stop losers early (exact).
    shard: (i, n) -> score only shard i of n and return a partial record for `gather_shards`.
    score_compensated: how a compensation-aware step scores its candidates
      (`compensate.search.step_scorer`), handed in so that the search does not depend on it.
    journal: where finished units of work are recorded and, on a rerun, replayed (`journal`);
      a compensation-aware step records none (it restarts from its beginning).
    log_every_s: seconds between the progress lines of the log (`StepProgress`).
    """
    from tqdm.auto import tqdm

    settings.validate()
    cands = check_budget(pm.num_layers, removed, settings, k)
    if shard is not None and settings.mode != "exact":
        raise UserError("--shard splits exact steps only; run a screened step unsharded")
    t0, c0 = time.perf_counter(), time.process_time()
    pm.set_removed(removed)
    cost = Cost()
    journal.track(cost)
    owned = shard_candidates(cands, shard)
    total = len(owned) * len(windows)
    with tqdm(total=total, desc=f"step {k}", unit="cand·win", disable=not progress) as bar:
        on_progress = StepProgress(k, len(owned), len(windows), bar, log_every_s)
        if settings.compensation != "none":
            if score_compensated is None:
                raise UserError("a compensation-aware step needs its scorer: search_step(..., "
                                "score_compensated=compensate.search.step_scorer(alpha))")
            scores = score_compensated(pm, windows, removed, owned, cost, on_progress)
            info = {"early_stop": False, "compensation": settings.compensation}
        elif settings.mode == "exact":
            res = score_exact(pm, windows, cands, prefer=_prefer(prev), early_stop=early_stop,
                              head_bound=settings.head_bound_columns, owned=owned, cost=cost, on_progress=on_progress,
                              batch=settings.window_batch, journal=journal.scope("exact"))
            scores, info = res.scores, res.info()
        else:
            scores, info = _screened(pm, windows, cands, settings, early_stop, cost, on_progress, journal)
    if journal.path is not None:
        log.info("step %d: %d units of work replayed from %s, %d computed in this run", k, journal.reused, journal.path,
                 journal.written)
        cost = journal.spent()  # the work of every run of the step
    info = {"mode": settings.mode, **info}
    elapsed = time.perf_counter() - t0
    timing = {"elapsed_s": elapsed, "cpu_s": time.process_time() - c0}  # cpu: all threads, less moved by other jobs
    if shard is not None:
        record = {
            "k": k,
            "shard": {"index": shard[0], "count": shard[1]},
            "candidates": cands,
            "owned": owned,
            "removed_before": list(removed),
            "scores": [scores[c].as_dict() for c in owned],
            "params_by_candidate": {c: pm.param_summary(list(removed) + [c]) for c in owned},
            "settings": settings.as_dict(),
            "inputs": inputs,
            "search": info,
            "cost": cost.as_dict(),
            "software": {"blockpruner": __version__},
            "timing": timing,
        }
        pm.set_removed(removed)
        log.info("step %d shard %d/%d: scored %d of %d candidates", k, shard[0], shard[1], len(owned), len(cands))
        return record
    ranked = rank(scores)
    best = _check_best(k, ranked)
    record = _search_record(k, removed, ranked, pm.param_summary(list(removed) + [best.block]), settings, inputs, info,
                          cost, timing)
    pm.set_removed(removed)
    return record


def _check_best(k: int, ranked: list[Score]) -> Score:
    for s in ranked:
        if s.status == "nonfinite":
            log.warning("step %d: candidate %s has non-finite perplexity; it will not be chosen", k, s.block)
    best = ranked[0]
    if best.status != "done":
        raise UserError(f"step {k}: every candidate gave a non-finite perplexity; use fp32 (--dtype fp32) or check the model")
    return best


def _search_record(k: int, removed: list[str], ranked: list[Score], params: dict, settings: StepSettings, inputs: dict,
                   info: dict, cost: Cost, timing: dict) -> dict:
    best = ranked[0]
    stopped = sum(s.status == "stopped" for s in ranked)
    bounded = sum(s.status == "bounded" for s in ranked)
    log.info("step %d: removed %s -> ppl %.4f (ratio %.2f%%); of %d candidates %d stopped early, %d cut by the head bound",
             k, best.block, best.ppl, 100 * params["ratio"], len(ranked), stopped, bounded)
    return step_record(k, removed, best.block, [best.block], best.nll_sum, best.tokens, params, [s.as_dict() for s in ranked],
                       settings.as_dict(), inputs, cost, timing, search=info)


def gather_shards(shards: list[dict], names: list[str] | None = None) -> dict:
    """The step record of a step scored as shards (`search_step(..., shard=(i, n))`).

    Refuses shards of different steps, inputs, settings or bounds, and missing or repeated
    shards. The result is the unsharded step's record except `cost` (summed over shards),
    `timing` and the added `shards` list.
    """
    names = names or [f"shard {i}" for i in range(len(shards))]
    if not shards:
        raise UserError("gather-step needs at least one shard file")
    first = shards[0]
    count = first["shard"]["count"]
    for name, s in zip(names, shards):
        for key in ("k", "candidates", "removed_before", "settings", "inputs", "search"):
            if s[key] != first[key]:
                raise UserError(f"{name}: its {key!r} differs from {names[0]}'s; all shards must come from the same step "
                                "run (same --k, --prev, model, calibration and settings)")
        if s["shard"]["count"] != count:
            raise UserError(f"{name}: is a shard of {s['shard']['count']}, not of {count}")
    index = sorted(s["shard"]["index"] for s in shards)
    if index != list(range(count)):
        missing = sorted(set(range(count)) - set(index))
        raise UserError(f"need shards 0..{count - 1} exactly once, got {index}" + (f" (missing {missing})" if missing else ""))
    cands = first["candidates"]
    scores: dict[str, Score] = {}
    params: dict[str, dict] = {}
    for s in sorted(shards, key=lambda s: s["shard"]["index"]):
        if s["owned"] != shard_candidates(cands, (s["shard"]["index"], count)):
            raise UserError(f"shard {s['shard']['index']}/{count}: scored {s['owned']}, not its round-robin share")
        for d in s["scores"]:
            scores[d["block"]] = Score.from_dict(d)
        params |= s["params_by_candidate"]
    ranked = rank(scores)
    k = first["k"]
    best = _check_best(k, ranked)
    cost = Cost()
    for s in shards:
        cost += Cost.from_dict(s["cost"])
    elapsed = [s["timing"]["elapsed_s"] for s in sorted(shards, key=lambda s: s["shard"]["index"])]
    settings = StepSettings(**first["settings"])
    record = _search_record(k, first["removed_before"], ranked, params[best.block], settings, first["inputs"],
                          first["search"], cost, {"elapsed_s": max(elapsed), "shards_elapsed_s": elapsed})
    record["shards"] = [{"index": s["shard"]["index"], "count": count, "candidates": s["owned"], "cost": s["cost"],
                         "timing": s["timing"]} for s in sorted(shards, key=lambda s: s["shard"]["index"])]
    return record
