"""Collect a study's artifacts into one table (the paper's Table 1) and plots.

Inputs are the files themselves, named by the workflow's layout (the labels come from the
paths, so a table never mixes in stale files that merely lie in the same folder):

    .../search/<model>/<calib>/<method>/step_<k>.json         greedy search steps
    .../eval/<model>/dense/{ppl,tasks,speed}.json              the dense model
    .../eval/<model>/<calib>/<method>/<pruning>/{...}.json     a pruned model, pruning = k<K> | r<ratio>
    .../pruned/<model>/<calib>/<method>/r<ratio>/manifest.json a compressed model (SliceGPT, LaCo)
    .../refine/<model>/<calib>/<method>/<pruning>.json         a refined set (swap, evolution)

Each row is one evaluated model: K and the pruning ratio come from the search step of that
K (a ratio target r<x> resolves to the smallest K whose ratio reaches x, exactly as
`blockpruner target-k` does for the materialised model); a refinement's from its refined set,
a step record of that K. A compressed model has no steps:
its ratio is the one it achieved, from its manifest. Every JSON
artifact is checked (format tag and checksum) before use.

`sequence` writes the removal sequence of one search as a CSV a person can read.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import atomic_write, atomic_write_text, read_json, write_csv
from ..compress import ALGORITHMS as COMPRESSORS
from ..errors import UserError

EVAL_KINDS = ("ppl", "tasks", "speed")
TASK_TITLES = {"piqa": "PIQA", "winogrande": "WinoGrande", "hellaswag": "HellaSwag", "arc_easy": "ARC-e",
               "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


# ---------------------------------------------------------------- search sequences


def block_kind_layer(name: str) -> tuple[str, int]:
    kind, _, layer = name.partition(".")
    return kind, int(layer)


def sequence_rows(steps: list[dict]) -> list[dict]:
    """One row per step, in k order: what was removed and where the search stands after it."""
    rows = []
    for s in sorted(steps, key=lambda s: s["k"]):
        kind, layer = block_kind_layer(s["removed_block"])
        rows.append({
            "k": s["k"],
            "removed_block": s["removed_block"],
            "block_type": kind,
            "layer": layer,
            "calib_ppl": s["ppl"],
            "attn_removed": s["attn_removed"],
            "mlp_removed": s["mlp_removed"],
            "ratio": s["params"]["ratio"],
            "ratio_no_embed": s["params"]["ratio_no_embed"],
            "params_removed": s["params"]["removed"],
            "params_remaining": s["params"]["remaining"],
            "elapsed_s": s.get("timing", {}).get("elapsed_s"),
        })
    return rows


def write_sequence(out: str | Path, step_paths: list[str | Path]) -> list[dict]:
    from ..steps import read_steps

    rows = sequence_rows(read_steps(step_paths))
    write_csv(out, rows)
    return rows


# ---------------------------------------------------------------- the study table


@dataclass
class Row:
    model: str
    calib: str = ""
    method: str = "dense"
    pruning: str = "dense"
    evals: dict = field(default_factory=dict)  # kind -> artifact

    @property
    def key(self) -> tuple:
        return self.model, self.calib, self.method


def classify(path: Path) -> tuple[str, tuple]:
    """Where an artifact sits in the workflow's layout: ('step', (model, calib, method, k)) or
    ('eval', (kind, model, calib, method, pruning)); the dense model's evaluations are
    (kind, model, "", "dense", "dense")."""
    name = path.name
    if name.startswith("step_") and name.endswith(".json") and name[5:-5].isdigit():
        if len(path.parts) < 4:
            raise UserError(f"{path}: a step file must lie in <model>/<calib>/<method>/")
        return "step", (path.parts[-4], path.parts[-3], path.parts[-2], int(name[5:-5]))
    if path.stem in EVAL_KINDS and path.suffix == ".json":
        if path.parent.name == "dense":
            return "eval", (path.stem, path.parts[-3], "", "dense", "dense")
        if len(path.parts) < 5:
            raise UserError(f"{path}: an evaluation must lie in <model>/<calib>/<method>/<pruning>/")
        return "eval", (path.stem, path.parts[-5], path.parts[-4], path.parts[-3], path.parent.name)
    if name == "manifest.json" and len(path.parts) >= 6 and path.parts[-6] == "pruned":  # a compressed model's ratio
        return "compressed", (path.parts[-5], path.parts[-4], path.parts[-3], path.parent.name)
    if path.suffix == ".json" and len(path.parts) >= 5 and path.parts[-5] == "refine":
        return "refined", (path.parts[-4], path.parts[-3], path.parts[-2], path.stem)
    raise UserError(f"{path}: not a step_<k>.json, {{{','.join(EVAL_KINDS)}}}.json, compressed model's manifest.json "
                    "or refined set of the workflow's layout")


def resolve_k(pruning: str, steps: list[dict], ratio_of: str) -> int | None:
    """K of a pruning label: k3 -> 3, r0.2 -> the smallest K reaching the ratio (None without steps)."""
    if pruning == "dense":
        return 0
    if pruning.startswith("k"):
        return int(pruning[1:])
    if not steps:
        return None
    from ..steps import steps_to_ratio

    return steps_to_ratio(steps, float(pruning[1:]), "ratio_no_embed" if ratio_of == "no_embed" else "ratio")


def compression_record(path: Path) -> dict | None:
    """A compressed model's manifest.json (SliceGPT, LaCo: `method`, the achieved `ratio`, ...);
    None for a materialised model's manifest, whose step files describe it."""
    manifest = read_json(path)
    if manifest.get("method") not in COMPRESSORS:
        return None
    if not isinstance(manifest.get("ratio"), (int, float)):
        raise UserError(f"{path}: a {manifest['method']} manifest without its achieved ratio; compress the model again")
    return manifest


def compressed_columns(rec: dict) -> dict:
    """A compressed model's pruning columns: no K or blocks, its achieved ratios and what it removed."""
    if rec.get("layers_removed") is not None:  # LaCo
        what = "layers " + " ".join(map(str, rec["layers_removed"]))
    elif rec.get("sliced_size") is not None:  # SliceGPT
        what = f"width {rec['sliced_size']} of {rec['hidden_size']}"
    else:
        what = ""
    return {"k": None, "attn_removed": None, "mlp_removed": None, "ratio": rec["ratio"],
            "ratio_no_embed": rec.get("ratio_no_embed"), "removed_blocks": f"{rec['method']}: {what}".rstrip(": ")}


def collect(paths: list[str | Path], ratio_of: str = "all") -> tuple[list[dict], list[str], dict]:
    """Table rows (dicts), the task names in order, and the step chains per search."""
    from ..steps import read_step, read_steps

    step_paths, evals, compressed, refined = defaultdict(list), {}, {}, {}
    for p in map(Path, paths):
        what, key = classify(p)
        if what == "step":
            step_paths[key[:3]].append(p)
        elif what == "refined":
            refined[key] = read_step(p)
        elif what == "compressed":
            if (rec := compression_record(p)) is not None:
                compressed[key] = rec
        else:
            kind, *label = key
            row = evals.setdefault(tuple(label), Row(*label))
            row.evals[kind] = read_json(p)
    chains = {key: read_steps(ps) for key, ps in step_paths.items()}
    tasks: list[str] = []
    for row in evals.values():
        for t in row.evals.get("tasks", {}).get("tasks", {}):
            if t not in tasks:
                tasks.append(t)
    out = []
    for row in evals.values():
        label = (row.model, row.calib, row.method, row.pruning)
        chain = chains.get(row.key, [])
        base, _, compensation = row.pruning.partition("+")  # k4+scale: K=4 with a folded correction
        if (step := refined.get((row.model, row.calib, row.method, base))) is not None:
            k = step["k"]
        else:
            k = None if label in compressed else resolve_k(base, chain, ratio_of)
            step = chain[k - 1] if k and k <= len(chain) else None
        r = {"model": row.model, "calib": row.calib, "method": row.method, "pruning": row.pruning,
             "compensation": compensation or "none", "k": k,
             "attn_removed": step["attn_removed"] if step else (0 if k == 0 else None),
             "mlp_removed": step["mlp_removed"] if step else (0 if k == 0 else None),
             "ratio": step["params"]["ratio"] if step else (0.0 if k == 0 else None),
             "ratio_no_embed": step["params"]["ratio_no_embed"] if step else (0.0 if k == 0 else None),
             "removed_blocks": " ".join(step["removed"]) if step else ""}
        if label in compressed:
            r |= compressed_columns(compressed[label])
        ppl = row.evals.get("ppl")
        r["wikitext2_ppl"] = ppl["ppl"] if ppl else None
        t = row.evals.get("tasks")
        for name in tasks:
            r[name] = t["tasks"][name]["value"] if t and name in t["tasks"] else None
        r["average"] = t["average"] if t else None
        # what the figures were computed with (lm-eval changes accuracies across versions)
        r["lm_eval_version"] = t.get("lm_eval_version") if t else None
        r["add_bos_token"] = t.get("add_bos_token", "auto") if t else None
        r["numerics"] = next((e.get("numerics", "fp32") for e in (ppl, t) if e), None)
        r["average_change"] = r["average_change_se"] = None  # compensated rows: paired against their pruning
        s = row.evals.get("speed")
        r["speedup"] = s.get("speedup") if s else None
        r["kv_cache_reduction"] = s.get("kv_cache_reduction") if s else None
        r["tokens_per_s"] = s["model"].get("tokens_per_s") if s else None
        r["params"] = s["model"].get("params") if s else None
        out.append(r)
    for r in out:
        if r["compensation"] != "none":
            base = evals.get((r["model"], r["calib"], r["method"], r["pruning"].partition("+")[0]))
            change = paired_change(base.evals.get("tasks") if base else None,
                                   evals[(r["model"], r["calib"], r["method"], r["pruning"])].evals.get("tasks"), tasks)
            if change is not None:
                r["average_change"], r["average_change_se"] = change
    out.sort(key=lambda r: (r["model"], r["pruning"] != "dense", r["calib"], r["method"],
                            r["k"] if r["k"] is not None else math.inf, r["pruning"]))
    return out, tasks, chains


def paired_change(before: dict | None, after: dict | None, tasks: list[str]) -> tuple[float, float] | None:
    """Change of the task average from one model to another scored on the same items, and its
    standard error from the per-item differences (paired: both models see each item, so the
    items' own difficulty cancels). Per task t with n_t items, d_i = after_i - before_i (each
    0/1 correctness): the change is mean(d), its variance var(d) / n_t; the average over T
    tasks changes by the mean of those, with standard error sqrt(sum var_t / n_t) / T.
    None without per-item results for every task in both."""
    if not before or not after:
        return None
    changes, variance = [], 0.0
    for t in tasks:
        a = before["tasks"].get(t, {}).get("correct")
        b = after["tasks"].get(t, {}).get("correct")
        if not a or not b or len(a) != len(b):
            return None
        d = [y - x for x, y in zip(a, b)]
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
        changes.append(mean)
        variance += var / len(d)
    return sum(changes) / len(changes), math.sqrt(variance) / len(changes)


def compensation_lines(rows: list[dict]) -> list[str]:
    """Each compensated variant beside its uncompensated pruning: perplexity, and the average
    accuracy's paired change judged against twice its standard error (~95%)."""
    comp = [r for r in rows if r["compensation"] != "none"]
    if not comp:
        return []
    base = {(r["model"], r["calib"], r["method"], r["pruning"]): r for r in rows}
    lines = ["", "## Compensation against its pruning (held-out data, same items)", "",
             "| Model | Method | Pruning | PPL without → with | Avg without → with | Avg change (points) ± 2 SE | Judged |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in comp:
        b = base.get((r["model"], r["calib"], r["method"], r["pruning"].partition("+")[0]))
        if b is None:
            continue
        change, se = r["average_change"], r["average_change_se"]
        if change is None:
            judged = "–"
        elif abs(change) <= 2 * se:
            judged = "within noise"
        else:
            judged = "higher by more than noise" if change > 0 else "lower by more than noise"
        band = "–" if change is None else f"{change * 100:+.2f} ± {2 * se * 100:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['pruning']} | {_fmt(b['wikitext2_ppl'], '.2f')} → "
                     f"{_fmt(r['wikitext2_ppl'], '.2f')} | {_fmt(b['average'], '.2f', 100)} → "
                     f"{_fmt(r['average'], '.2f', 100)} | {band} | {judged} |")
    return lines


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v * scale, spec)


def markdown(rows: list[dict], tasks: list[str], ratio_of: str, note: str | None = None) -> str:
    """The table as Markdown: accuracies and ratios in %, perplexity and speed-up as numbers;
    `note` (the config's `note`, e.g. that the data is a demo slice) is printed under it."""
    head = ["Model", "Method", "Calib", "Pruning", "K (attn+mlp)", "Ratio", "WikiText-2 PPL ↓"]
    head += [TASK_TITLES.get(t, t) for t in tasks] + ["Avg ↑", "Speed-up", "KV-cache red."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for r in rows:
        k = "0" if r["k"] == 0 else ("–" if r["k"] is None else f"{r['k']} ({r['attn_removed']}+{r['mlp_removed']})")
        ratio = r["ratio_no_embed"] if ratio_of == "no_embed" else r["ratio"]
        cells = [r["model"], r["method"], r["calib"] or "–", r["pruning"], k, _fmt(ratio, ".2f", 100) + "%",
                 _fmt(r["wikitext2_ppl"], ".2f")]
        cells += [_fmt(r[t], ".2f", 100) for t in tasks] + [_fmt(r["average"], ".2f", 100)]
        cells += [_fmt(r["speedup"], ".2f") + ("×" if r["speedup"] is not None else ""),
                  _fmt(r["kv_cache_reduction"], ".1f", 100) + ("%" if r["kv_cache_reduction"] is not None else "")]
        lines.append("| " + " | ".join(cells) + " |")
    what = "non-embedding parameters" if ratio_of == "no_embed" else "all parameters"
    notes = [
        "",
        f"Ratio: share of {what} removed. Accuracies in % (acc_norm where the task has it, else acc), zero-shot "
        "unless configured otherwise. Speed-up: dense / pruned generation time; KV-cache red.: share of KV-cache "
        "bytes per token saved. K = 0 is the dense model; r<x> targets resolve to the smallest K reaching the ratio; compressed models "
        "(SliceGPT, LaCo) have no K and show the ratio they achieved.",
    ]
    notes += evaluated_with(rows)
    if note and note.strip():
        notes += ["", f"Note: {' '.join(note.split())}"]
    return "\n".join(["# BlockPruner study", ""] + lines + notes + matched_budgets(rows, tasks, ratio_of)
                     + compensation_lines(rows)) + "\n"


def evaluated_with(rows: list[dict]) -> list[str]:
    """A footnote naming the lm-eval version, its BOS setting and the numerics of the figures."""
    def values(key):
        return sorted({str(r[key]) for r in rows if r.get(key) is not None})

    parts = []
    if values("lm_eval_version"):
        parts.append(f"zero-shot accuracies from lm-eval {', '.join(values('lm_eval_version'))} with BOS "
                     f"{', '.join(values('add_bos_token'))} (auto = the tokenizer's choice; no = as lm-eval 0.4.0, "
                     "the paper's harness)")
    if values("numerics"):
        parts.append(f"numerics {', '.join(values('numerics'))}")
    return ["", "Evaluated with: " + "; ".join(parts) + "."] if parts else []


def matched_budgets(rows: list[dict], tasks: list[str], ratio_of: str) -> list[str]:
    """Table 1's comparison: per model and ratio target r<x>, every method at its smallest K
    removing at least x (compressed models at the ratio they reached)."""
    key = "ratio_no_embed" if ratio_of == "no_embed" else "ratio"
    targets = sorted({(r["model"], r["pruning"].partition("+")[0]) for r in rows if r["pruning"].startswith("r")})
    if not targets:
        return []
    lines = ["", "## Matched budgets (Table 1's rule)", "",
             "| Model | Target | Method | K | Ratio | WikiText-2 PPL ↓ | Avg ↑ |", "|---|---|---|---:|---:|---:|---:|"]
    for model, target in targets:
        for r in (r for r in rows if r["model"] == model and r["pruning"].partition("+")[0] == target):
            method = r["method"] if r["compensation"] == "none" else f"{r['method']}+{r['compensation']}"
            lines.append(f"| {model} | ≥ {_fmt(float(target[1:]), '.2f', 100)}% | {method} | "
                         f"{'–' if r['k'] is None else r['k']} | {_fmt(r[key], '.2f', 100)}% | "
                         f"{_fmt(r['wikitext2_ppl'], '.2f')} | {_fmt(r['average'], '.2f', 100)} |")
    return lines


# ---------------------------------------------------------------- plots


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3) or 1
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    return plt, fig, axes.ravel()


def _no_data(path: str | Path, title: str) -> None:
    plt, fig, axes = _figure(1)
    axes[0].text(0.5, 0.5, "no data in this study", ha="center", va="center")
    axes[0].set_axis_off()
    fig.suptitle(title)
    _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_metric_vs_ratio(rows: list[dict], metric: str, ylabel: str, path: str | Path, ratio_of: str,
                         scale: float = 1.0, log_y: bool = False) -> None:
    """One panel per model, one line per calibration set x method, dense at ratio 0."""
    key = "ratio_no_embed" if ratio_of == "no_embed" else "ratio"
    title = f"{ylabel} vs pruning ratio"
    models = sorted({r["model"] for r in rows if r[metric] is not None})
    if not models:
        _no_data(path, title)
        return
    plt, fig, axes = _figure(len(models))
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model and r[metric] is not None and r[key] is not None]
        dense = [r for r in mine if r["pruning"] == "dense"]
        lines = sorted({(r["calib"], r["method"], r["compensation"]) for r in mine if r["pruning"] != "dense"})
        for calib, method, comp in lines:
            pts = sorted({(r[key], r[metric]) for r in mine if (r["calib"], r["method"], r["compensation"]) == (calib, method, comp)}
                         | {(d[key], d[metric]) for d in dense})
            name = method if comp == "none" else f"{method}+{comp}"
            ax.plot([100 * x for x, _ in pts], [scale * y for _, y in pts], marker="o", label=f"{name} ({calib})")
        if dense and len(ax.lines) == 0:
            ax.plot([0], [scale * dense[0][metric]], marker="o", label="dense")
        ax.set_title(model)
        ax.set_xlabel("parameters removed (%)" + (" of non-embedding" if ratio_of == "no_embed" else ""))
        ax.set_ylabel(ylabel)
        values = [scale * r[metric] for r in mine]
        if log_y and values and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")  # only where perplexity spans decades
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(models):]:
        ax.set_axis_off()
    fig.suptitle(title)
    _save(plt, fig, path)


def plot_blocks_per_step(chains: dict, path: str | Path) -> None:
    """Attention vs MLP blocks removed after each step, one panel per search."""
    title = "attention vs MLP blocks removed per search step"
    if not chains:
        _no_data(path, title)
        return
    plt, fig, axes = _figure(len(chains))
    for ax, (key, chain) in zip(axes, sorted(chains.items())):
        ks = [0] + [s["k"] for s in chain]
        ax.step(ks, [0] + [s["attn_removed"] for s in chain], where="post", marker="o", label="attention")
        ax.step(ks, [0] + [s["mlp_removed"] for s in chain], where="post", marker="s", label="MLP")
        ax.set_title(" / ".join(key), fontsize=9)
        ax.set_xlabel("step k (blocks removed)")
        ax.set_ylabel("blocks removed")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(chains):]:
        ax.set_axis_off()
    fig.suptitle(title)
    _save(plt, fig, path)


def summarize(paths: list[str | Path], csv_out: str | Path, md_out: str | Path, ratio_of: str = "all",
              plot_ppl: str | Path | None = None, plot_accuracy: str | Path | None = None,
              plot_blocks: str | Path | None = None, note: str | None = None) -> list[dict]:
    if ratio_of not in ("all", "no_embed"):
        raise UserError(f"ratio_of must be all or no_embed, got {ratio_of!r}")
    rows, tasks, chains = collect(paths, ratio_of)
    write_csv(csv_out, rows)
    atomic_write_text(md_out, markdown(rows, tasks, ratio_of, note))
    if plot_ppl:
        plot_metric_vs_ratio(rows, "wikitext2_ppl", "WikiText-2 perplexity", plot_ppl, ratio_of, log_y=True)
    if plot_accuracy:
        plot_metric_vs_ratio(rows, "average", "average accuracy (%)", plot_accuracy, ratio_of, scale=100)
    if plot_blocks:
        plot_blocks_per_step(chains, plot_blocks)
    return rows
