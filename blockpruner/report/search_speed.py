"""Search-speed benchmark: plain greedy vs BlockPruner's exact search vs the screened mode.

One process, one model, one calibration set, one K. Methods (interleaved step by step, so a
change in machine load hits all of them alike):

  plain     the reference, written out here: for every candidate, remove it, run the full
            forward (the model's own decoder forward + LM head) over every window, restore;
            `window_batch` windows per forward, as the official code batches its evaluation.
  prefix    (optional) the scoring engine with prefix reuse only, no early stopping.
  exact     `search_step` with prefix reuse + exact early stopping seeded by the previous
            step's ranking, without the head bound (--head-bound-columns 0). Must give plain
            greedy's sequence.
  bounded   `search_step` as `blockpruner step` runs it: `exact` plus the head bound (N LM-head
            columns per window, `--head-bound-columns`). Must give plain greedy's sequence.
  screened  `search_step` in screened mode (--screen-windows S --confirm-top M
            [--candidates-by-bi R]); approximate, its agreement with `exact` is reported.

Printed per method: removal sequence and whether it equals plain greedy's, block forwards,
full LM-head tokens, head-bound token-columns, FLOPs (`engine.cost.FlopModel`), the FLOP-model predicted speed-up over plain
greedy, the measured wall-time (and CPU-time) speed-up, their ratio, and peak memory (RSS
sampled during each method's steps on CPU; torch.cuda.max_memory_allocated on GPU).

  blockpruner benchmark-search --model DIR --calib DIR --k 4 [--max-windows N]
  blockpruner benchmark-search --tiny --k 4   # 32-layer random Llama, hidden 256, vocab 512
  python benchmarks/search_speed.py ...       # the same, from a checkout

`run(...)` returns the same figures as a dict (`--json` writes it; the workflow's
benchmark_search rule and the tests use it).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

from ..adapters import get_path
from ..artifacts import atomic_write_text
from ..blocks import PrunableModel
from ..errors import UserError
from ..eval.speed import RssSampler
from ..search.greedy import StepSettings, candidate_blocks, search_step
from ..search import HEAD_BOUND_COLUMNS
from ..engine.cost import Cost
from ..engine.forward import head_nll, stack_windows, window_batch_for, window_groups

METHODS = ("plain", "prefix", "exact", "bounded", "screened")
EXACT_METHODS = ("prefix", "exact", "bounded")  # must choose plain greedy's sequence


# ------------------------------------------------------------------------ the reference


@torch.no_grad()
def plain_greedy_step(pm: PrunableModel, windows, removed: list[str], cost: Cost, batch: int = 1) -> tuple[str, float]:
    """One plain greedy step: remove each candidate, full forward over every window (`batch`
    of one length at a time), restore.

    Candidates in the documented tie order (attention before MLP, ascending layer); a strictly
    lower NLL replaces the best, so bit-identical NLLs keep the earlier candidate.
    """
    decoder = get_path(pm.model, pm.adapter.decoder)
    best: tuple[float, str] | None = None
    for c in candidate_blocks(pm.num_layers, removed, "all"):
        pm.set_removed(removed + [c])
        kept = pm.remaining()
        nll = 0.0
        for group in window_groups(windows, batch):
            ids = stack_windows(pm, windows, group)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # final-normed
            for row in head_nll(pm, hidden, ids, cost, normed=True)[0]:
                nll += row
            for b in kept:
                cost.add_block(pm, b, ids.shape[1], len(group))
            cost.windows += len(group)
        if math.isfinite(nll) and (best is None or nll < best[0]):
            best = (nll, c)
    pm.set_removed(removed)
    if best is None:
        raise RuntimeError("every candidate is non-finite")
    return best[1], best[0]


# ------------------------------------------------------------------------ measuring


class PeakMemory:
    """Peak memory while the block runs: CUDA max_memory_allocated, or sampled process RSS
    (speed.RssSampler); `start` is what was in use when it began."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.cuda = device.type == "cuda"
        self.rss = None if self.cuda else RssSampler(interval)
        self.peak = 0
        self.start = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.rss.__enter__()
            self.start = self.rss.start
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.rss.__exit__(*exc)
            self.peak = self.rss.peak
        return False


class Method:
    def __init__(self, name: str, settings: StepSettings | None = None, early_stop: bool = True):
        self.name, self.settings, self.early_stop = name, settings, early_stop
        self.removed: list[str] = []
        self.prev: dict | None = None
        self.cost = Cost()
        self.wall = 0.0
        self.cpu = 0.0
        self.peak = 0
        self.working = 0  # peak minus the memory in use when the step started
        self.stopped = 0
        self.bounded = 0
        self.steps: list[dict] = []  # per step: block, wall_s, cpu_s, cost

    def step(self, pm: PrunableModel, windows, k: int, device: torch.device, batch: int = 1) -> None:
        with PeakMemory(device) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            if self.name == "plain":
                block, _ = plain_greedy_step(pm, windows, self.removed, self.cost, batch)
            else:
                rec = search_step(pm, windows, k, self.removed, self.settings, {}, progress=False, prev=self.prev,
                                  early_stop=self.early_stop)
                self.cost += Cost.from_dict(rec["cost"])
                self.stopped += sum(s["status"] == "stopped" for s in rec["scores"])
                self.bounded += sum(s["status"] == "bounded" for s in rec["scores"])
                self.prev, block = rec, rec["removed_block"]
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            self.wall += wall
            self.cpu += cpu
        before = self.steps[-1]["cost_so_far"] if self.steps else Cost().as_dict()
        now = self.cost.as_dict()
        self.steps.append({"k": k, "block": block, "wall_s": wall, "cpu_s": cpu, "cost_so_far": now,
                           "block_forwards": now["block_forwards"] - before["block_forwards"],
                           "head_tokens": now["head_tokens"] - before["head_tokens"],
                           "bound_columns": now["bound_columns"] - before["bound_columns"]})
        self.peak = max(self.peak, mem.peak)
        self.working = max(self.working, mem.peak - mem.start)
        self.removed = self.removed + [block]


def run(pm: PrunableModel, windows, k: int, methods=("plain", "exact", "bounded", "screened"), screen_windows: int = 2,
        confirm_top: int = 4, bi_candidates: int | None = None, head_bound_columns: int = HEAD_BOUND_COLUMNS,
        log=print, window_batch: int = 1) -> dict:
    """Run the methods step by step (interleaved) and return their figures; every method runs
    `window_batch` windows per forward."""
    device = next(pm.model.parameters()).device
    screened = StepSettings.make(screen_windows=screen_windows, confirm_top=confirm_top, bi_candidates=bi_candidates,
                                 head_bound_columns=head_bound_columns, window_batch=window_batch)
    make = {"plain": lambda: Method("plain"),
            "prefix": lambda: Method("prefix", StepSettings(head_bound_columns=0, window_batch=window_batch),
                                     early_stop=False),
            "exact": lambda: Method("exact", StepSettings(head_bound_columns=0, window_batch=window_batch)),
            "bounded": lambda: Method("bounded", StepSettings(head_bound_columns=head_bound_columns,
                                                              window_batch=window_batch)),
            "screened": lambda: Method("screened", screened)}
    ms = [make[m]() for m in methods]
    with torch.no_grad():  # warm-up: one full forward (logits included), so that no method pays the first-call
        # overheads or for paging in memory-mapped weights (the LM head / embedding matrix above all)
        pm.model(input_ids=windows[0][:8].to(device).unsqueeze(0), use_cache=False)
    for step in range(1, k + 1):
        for m in ms:
            m.step(pm, windows, step, device, window_batch)
            st = m.steps[-1]
            log(f"  step {step} {m.name:9s} -> {m.removed[-1]:8s} {st['wall_s']:8.1f} s wall {st['cpu_s']:8.1f} s CPU "
                f"{st['block_forwards']:7d} block fwd {st['head_tokens']:7d} head tokens "
                f"{st['bound_columns']:10d} bound columns")
    pm.set_removed([])
    by = {m.name: m for m in ms}
    ref = by.get("plain")
    exact = by.get("exact")
    out = {"k": k, "windows": len(windows), "tokens": int(sum(len(w) for w in windows)), "device": str(device),
           "threads": torch.get_num_threads(), "blocks": len(pm.names), "head_bound_columns": head_bound_columns,
           "window_batch": window_batch,
           "methods": {}}
    for m in ms:
        r = {"sequence": m.removed, "block_forwards": m.cost.block_forwards, "head_tokens": m.cost.head_tokens,
             "bound_columns": m.cost.bound_columns, "flops": m.cost.flops, "wall_s": m.wall, "cpu_s": m.cpu,
             "peak_mem_bytes": m.peak, "working_mem_bytes": m.working, "stopped_candidates": m.stopped,
             "bounded_candidates": m.bounded, "steps": m.steps,
             "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_sampled"}
        if ref is not None:
            r["equals_plain"] = m.removed == ref.removed
            r["fewer_block_forwards"] = ref.cost.block_forwards / m.cost.block_forwards
            r["fewer_head_tokens"] = ref.cost.head_tokens / m.cost.head_tokens
            r["predicted_speedup"] = ref.cost.flops / m.cost.flops
            r["measured_speedup"] = ref.wall / m.wall
            r["measured_cpu_speedup"] = ref.cpu / m.cpu
            r["measured_over_predicted"] = r["measured_speedup"] / r["predicted_speedup"]
        if exact is not None and m is not exact:
            r["agrees_with_exact"] = sum(a == b for a, b in zip(m.removed, exact.removed))
            r["fewer_head_tokens_than_exact"] = exact.cost.head_tokens / max(m.cost.head_tokens, 1)
            r["faster_than_exact"] = exact.wall / m.wall
        out["methods"][m.name] = r
    exacts = [by[n] for n in EXACT_METHODS if n in by]
    if ref is not None and exacts:  # every exact method must choose plain greedy's sequence
        out["exact_methods_equal_plain"] = all(m.removed == ref.removed for m in exacts)
    out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def table(res: dict) -> str:
    """The figures as a Markdown table."""
    head = ("| method | removal sequence | = plain | steps = exact | block fwd | fewer × | head tokens | fewer × "
            "| bound columns | cut by bound | GFLOP | predicted × | measured wall × | wall / pred. | CPU-time × | wall s "
            "| peak mem MiB (+working) |")
    lines = [head, "|" + "---|" * 17]
    for name, r in res["methods"].items():
        f = lambda key, fmt="{:.2f}": fmt.format(r[key]) if key in r else "–"  # noqa: E731
        eq = ("yes" if r["equals_plain"] else "no") if "equals_plain" in r else "–"
        agree = f"{r['agrees_with_exact']}/{res['k']}" if "agrees_with_exact" in r else "–"
        lines.append(
            f"| {name} | {', '.join(r['sequence'])} | {eq} | {agree} | {r['block_forwards']} | {f('fewer_block_forwards')} | "
            f"{r['head_tokens']} | {f('fewer_head_tokens')} | {r['bound_columns']} | {r['bounded_candidates']} | "
            f"{r['flops'] / 1e9:.1f} | {f('predicted_speedup')} | "
            f"{f('measured_speedup')} | {f('measured_over_predicted')} | {f('measured_cpu_speedup')} | {r['wall_s']:.1f} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} (+{r['working_mem_bytes'] / 2**20:.0f}) |")
    if "bounded" in res["methods"] and "exact" in res["methods"]:
        b = res["methods"]["bounded"]
        lines.append(f"\nbounded vs exact: {b['fewer_head_tokens_than_exact']:.2f}x fewer full-head tokens, "
                     f"{b['faster_than_exact']:.2f}x wall time")
    if "exact_methods_equal_plain" in res:
        lines.append(f"every exact method chose plain greedy's sequence: {'yes' if res['exact_methods_equal_plain'] else 'NO'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ models and data


def tiny_deep_model(layers: int = 32, hidden: int = 256, vocab: int = 512, intermediate: int | None = None,
                    heads: int = 4, seed: int = 0):
    """A random deep Llama-style model with a small vocabulary, so the blocks dominate the cost.

    Norm weights are drawn at random (N(1, 0.5)), as in the test suite's tiny models, so that
    blocks differ in importance the way a trained model's do rather than all being alike.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.5)
    return model.eval()


def tiny_windows(n: int, seqlen: int, vocab: int, seed: int = 0, successors: int = 4,
                 follow: float = 0.8) -> list[torch.Tensor]:
    """Token windows with some structure, seeded: a random first-order Markov chain where each
    token is followed, with probability `follow`, by one of its `successors` likely tokens."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(3, vocab, (vocab, successors), generator=g)
    out = []
    for _ in range(n):
        ids = [int(torch.randint(3, vocab, (1,), generator=g))]
        for _ in range(seqlen - 1):
            if torch.rand(1, generator=g).item() < follow:
                ids.append(int(succ[ids[-1], torch.randint(0, successors, (1,), generator=g)]))
            else:
                ids.append(int(torch.randint(3, vocab, (1,), generator=g)))
        out.append(torch.tensor(ids))
    return out


def run_cli(a: argparse.Namespace) -> dict:
    """`blockpruner benchmark-search`: load the model and windows, run, print, write --json / --md."""
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown methods {bad}; use {', '.join(METHODS)}")
    if not a.tiny and not (a.model and a.calib):
        raise UserError("give --model DIR and --calib DIR (a prepared model and a calibration artifact), or --tiny")
    if a.k < 1:
        raise UserError(f"--k must be at least 1, got {a.k}")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(a.device)
    batch = window_batch_for(a.window_batch, device)
    if a.tiny:
        model = tiny_deep_model(a.layers, a.hidden, a.vocab, seed=a.seed).to(device)
        windows = tiny_windows(a.windows, a.seqlen, a.vocab, seed=a.seed)
        what = f"tiny random Llama: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}"
    else:
        from ..data.calibration import load_calibration
        from ..model_dir import load_model_dir

        windows = load_calibration(a.calib).windows
        model, _, _ = load_model_dir(a.model, a.dtype, a.device, None, tokenizer=False)
        what = f"{a.model} ({model.config.model_type})"
    if a.max_windows:
        windows = windows[: a.max_windows]
    pm = PrunableModel.wrap(model)
    print(f"{what}; {len(windows)} windows, {sum(len(w) for w in windows)} tokens; K={a.k}; device {device}, "
          f"{torch.get_num_threads()} thread(s); methods {', '.join(methods)}", flush=True)
    res = run(pm, windows, a.k, methods, a.screen_windows, a.confirm_top, a.candidates_by_bi, a.head_bound_columns,
              log=lambda s: print(s, flush=True), window_batch=batch)
    res["model"] = what
    res["args"] = {k: v for k, v in vars(a).items() if k != "func"}
    print(table(res))
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    if a.md:
        atomic_write_text(a.md, f"{what}; {res['windows']} windows, {res['tokens']} tokens; K={a.k}; {res['device']}, "
                           f"{res['threads']} thread(s)\n\n{table(res)}\n")
    return res
