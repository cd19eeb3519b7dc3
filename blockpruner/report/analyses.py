"""The paper's analyses, each a CSV and a PNG, from artifacts (no Snakemake needed).

Inputs are files or directories (searched recursively for `step_<k>.json` and
`{ppl,tasks,speed}.json`) laid out as the workflow writes them -- the three folders above a
file name its model, calibration set and method:

    .../<model>/<calib>/<method>/step_<k>.json                 one search (any method)
    .../<model>/dense/{ppl,tasks}.json                         the dense model's evaluations
    .../<model>/<calib>/<method>/<pruning>/{ppl,tasks}.json    a pruned model, pruning = k<K> | r<x>

A r<x> label resolves to the smallest K reaching ratio x (`search.steps_to_ratio`, as the
workflow did when it materialised that model). Every JSON is checked (format tag and
checksum), and a search must be steps 1..K, each continuing the previous one.

| function               | paper                    | rows                                        |
|------------------------|--------------------------|---------------------------------------------|
| `bi_layer_vs_block`    | Figure 1                 | per layer: BI (and RM) of layer, attn, mlp  |
| `metrics_vs_ratio`     | Figures 4, 6, 10         | per search and K: ratio, ppl, accuracies    |
| `attention_share`      | Figure 5                 | per search and K: attention / MLP removed   |
| `calibration_effect`   | Figure 7                 | per calibration set and K, with its size    |
| `pruning_time`         | Table 7                  | per search: selection time to the budget    |
| `match_budgets`        | Table 1's matching       | per method: the smallest K at or above a ratio |

Only `bi_layer_vs_block` loads a model; the rest read JSON.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

from ..artifacts import atomic_write, read_json, write_csv
from ..errors import UserError
from .summary import EVAL_KINDS, classify, compression_record

log = logging.getLogger("blockpruner.analyses")

Key = tuple[str, str, str]  # model, calib, method


# ---------------------------------------------------------------- budgets


def match_budgets(steps_by_method: dict[str, list[dict]], ratio: float, key: str = "ratio") -> dict[str, int]:
    """For each method, the smallest K whose pruning ratio is at or above `ratio` -- Table 1's
    rule (Llama2-7B: BlockPruner at 21.99% against the layer baselines' 21.02%), so a method
    never wins by removing less. Methods whose steps do not reach `ratio` are left out."""
    if not 0 < ratio < 1:
        raise UserError(f"target ratio must be between 0 and 1, got {ratio}")
    matched = {}
    for method, steps in steps_by_method.items():
        k = next((s["k"] for s in steps if s["params"][key] >= ratio - 1e-12), None)
        if k is None:
            log.warning("%s: its %d steps stop at ratio %.4f < %g; left out of the comparison", method, len(steps),
                        steps[-1]["params"][key] if steps else 0.0, ratio)
        else:
            matched[method] = k
    return matched


def pruning_s(chain: list[dict], k: int) -> float | None:
    """Selection time from the dense model to step k: the record's own `pruning_s` (baselines),
    else the sum of the search steps' `elapsed_s` (BlockPruner records)."""
    step = chain[k - 1]
    t = step.get("timing", {})
    if "pruning_s" in t:
        return float(t["pruning_s"])
    times = [s.get("timing", {}).get("elapsed_s") for s in chain[:k]]
    return float(sum(times)) if all(x is not None for x in times) else None


# ---------------------------------------------------------------- reading artifacts


def expand(paths) -> list[Path]:
    """Files as given; directories searched recursively for step and evaluation artifacts."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.json") if q.name.startswith("step_") or q.stem in EVAL_KINDS
                           or (q.name == "manifest.json" and len(q.parts) >= 6 and q.parts[-6] == "pruned"))
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]  # a file given twice counts once


class Study:
    """Search chains and evaluations found in a set of artifacts."""

    def __init__(self, paths, ratio_of: str = "all"):
        if ratio_of not in ("all", "no_embed"):
            raise UserError(f"ratio_of must be all or no_embed, got {ratio_of!r}")
        self.key = "ratio_no_embed" if ratio_of == "no_embed" else "ratio"
        steps, self.evals, self.dense = defaultdict(list), defaultdict(dict), defaultdict(dict)
        self.paths: dict[Key, list[Path]] = defaultdict(list)
        self.compressed: dict[tuple, dict] = {}  # (model, calib, method, pruning) -> its manifest
        for p in expand(paths):
            what, label = classify(p)
            if what == "compressed":
                if (rec := compression_record(p)) is not None:
                    self.compressed[label] = rec
            elif what == "step":
                from ..steps import read_step

                steps[label[:3]].append(read_step(p))
                self.paths[label[:3]].append(p)
            else:
                kind, model, *rest = label
                if rest[-1] == "dense":
                    self.dense[model][kind] = read_json(p)
                else:
                    self.evals[(model, *rest)][kind] = read_json(p)
        from ..steps import read_chain

        self.chains: dict[Key, list[dict]] = {k: read_chain(v, "/".join(k)) for k, v in sorted(steps.items())}
        self.tasks: list[str] = []
        for ev in [*self.evals.values(), *self.dense.values()]:
            for t in ev.get("tasks", {}).get("tasks", {}):
                if t not in self.tasks:
                    self.tasks.append(t)
        self.by_k: dict[tuple, dict] = {}  # (model, calib, method, K) -> {kind: artifact}
        for (model, calib, method, pruning), ev in self.evals.items():
            chain = self.chains.get((model, calib, method))
            if (model, calib, method, pruning) in self.compressed:
                continue  # compressed_rows() reports it
            if "+" in pruning:
                continue  # a compensated variant (<pruning>+<comp>): the summary reports it beside its pruning
            if not chain:
                log.warning("no search steps for %s/%s/%s: its evaluations (%s) are left out", model, calib, method, pruning)
                continue
            k = self._resolve(pruning, chain)
            if k > len(chain):
                log.warning("%s/%s/%s/%s: K=%d but only %d steps given; left out", model, calib, method, pruning, k, len(chain))
                continue
            self.by_k.setdefault((model, calib, method, k), {}).update(ev)

    def _resolve(self, pruning: str, chain: list[dict]) -> int:
        from ..steps import steps_to_ratio

        if pruning.startswith("k") and pruning[1:].isdigit():
            return int(pruning[1:])
        if pruning.startswith("r"):
            return steps_to_ratio(chain, float(pruning[1:]), self.key)
        raise UserError(f"pruning label {pruning!r}: expected k<K> or r<ratio>")

    def rows(self) -> list[dict]:
        """One row per search and K (K = 0: the dense model), with every metric available."""
        out = []
        for (model, calib, method), chain in self.chains.items():
            dense = self.dense.get(model, {})
            out.append(self._row(model, calib, method, 0, None, dense, chain))
            for step in chain:
                out.append(self._row(model, calib, method, step["k"], step, self.by_k.get((model, calib, method, step["k"]), {}), chain))
        return out

    def compressed_rows(self) -> list[dict]:
        """One row per compressed model (SliceGPT, LaCo): no K or blocks, the ratio it achieved."""
        out = []
        for (model, calib, method, pruning), rec in sorted(self.compressed.items()):
            ev = self.evals.get((model, calib, method, pruning), {})
            ppl, tasks = ev.get("ppl"), ev.get("tasks")
            r = {"model": model, "calib": calib, "method": method, "algorithm": rec.get("method"), "k": None,
                 "ratio": rec["ratio"], "ratio_no_embed": rec.get("ratio_no_embed"), "attn_removed": None,
                 "mlp_removed": None, "removed_block": "", "calib_ppl": None, "wikitext2_ppl": ppl["ppl"] if ppl else None}
            for t in self.tasks:
                r[t] = tasks["tasks"][t]["value"] if tasks and t in tasks["tasks"] else None
            r["average"] = tasks["average"] if tasks else None
            r["pruning_s"] = rec.get("elapsed_s")
            out.append(r)
        return out

    def _row(self, model, calib, method, k, step, ev, chain) -> dict:
        params = step["params"] if step else {}
        ppl, tasks = ev.get("ppl"), ev.get("tasks")
        r = {"model": model, "calib": calib, "method": method,
             "algorithm": step["settings"]["method"] if step else chain[0]["settings"]["method"],
             "k": k, "ratio": params.get("ratio", 0.0), "ratio_no_embed": params.get("ratio_no_embed", 0.0),
             "attn_removed": step["attn_removed"] if step else 0, "mlp_removed": step["mlp_removed"] if step else 0,
             "removed_block": step["removed_block"] if step else "",
             "calib_ppl": step["ppl"] if step else None,
             "wikitext2_ppl": ppl["ppl"] if ppl else None}
        for t in self.tasks:
            r[t] = tasks["tasks"][t]["value"] if tasks and t in tasks["tasks"] else None
        r["average"] = tasks["average"] if tasks else None
        r["pruning_s"] = pruning_s(chain, k) if step else 0.0
        return r


# ---------------------------------------------------------------- CSV and plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, cols: int = 3):
    plt = _plt()
    cols = max(1, min(n, cols))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[n:]:
        ax.set_axis_off()
    return plt, fig, axes


def _save(plt, fig, path: str | Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _no_data(path: str | Path, title: str) -> None:
    plt, fig, axes = _panels(1)
    axes[0].text(0.5, 0.5, "no data", ha="center", va="center")
    axes[0].set_axis_off()
    _save(plt, fig, path, title)


def _label(key: Key, keys: list[Key]) -> str:
    """The shortest label telling the searches in one panel apart."""
    parts = [key[2]]
    if len({k[1] for k in keys}) > 1:
        parts.append(f"({key[1]})")
    return " ".join(parts)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


METRIC_TITLES = {"wikitext2_ppl": "WikiText-2 perplexity", "average": "average accuracy (%)",
                 "calib_ppl": "calibration perplexity"}


def _plot_lines(ax, rows: list[dict], metric: str, xkey: str, scale: float = 1.0) -> None:
    keys = sorted({(r["model"], r["calib"], r["method"]) for r in rows})
    for key in keys:
        pts = sorted((r[xkey], r[metric]) for r in rows if (r["model"], r["calib"], r["method"]) == key
                     and _finite(r[metric]) and _finite(r[xkey]))
        if pts:
            ax.plot([100 * x for x, _ in pts], [scale * y for _, y in pts], marker="o", label=_label(key, keys))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


# ---------------------------------------------------------------- Figures 4, 6, 10


def metrics_vs_ratio(paths, csv_out: str | Path, png_out: str | Path, ratio_of: str = "all") -> list[dict]:
    """Perplexity and accuracy against pruning ratio, one line per method (and calibration set).

    Panels: WikiText-2 perplexity and average accuracy where evaluations exist, and the
    calibration perplexity of every step (from the step files alone), one row per model.
    """
    study = Study(paths, ratio_of)
    rows = study.rows() + study.compressed_rows()
    write_csv(csv_out, rows)
    metrics = [m for m in METRIC_TITLES if any(_finite(r[m]) for r in rows)]
    models = sorted({r["model"] for r in rows})
    title = "perplexity and accuracy vs pruning ratio"
    if not metrics:
        _no_data(png_out, title)
        return rows
    plt, fig, axes = _panels(len(metrics) * len(models), cols=len(metrics))
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        for j, metric in enumerate(metrics):
            ax = axes[i * len(metrics) + j]
            _plot_lines(ax, mine, metric, study.key, 100 if metric == "average" else 1)
            ax.set_title(f"{model}: {METRIC_TITLES[metric]}", fontsize=10)
            ax.set_xlabel("parameters removed (%)" + (" of non-embedding" if ratio_of == "no_embed" else ""))
            vals = [r[metric] for r in mine if _finite(r[metric])]
            if metric.endswith("ppl") and vals and min(vals) > 0 and max(vals) / min(vals) > 10:
                ax.set_yscale("log")
    _save(plt, fig, png_out, title)
    return rows


# ---------------------------------------------------------------- Figure 5


def attention_share(paths, csv_out: str | Path, png_out: str | Path, ratio_of: str = "all") -> list[dict]:
    """Share of attention blocks among the blocks removed, as pruning proceeds (step files only)."""
    study = Study(paths, ratio_of)
    rows = []
    for (model, calib, method), chain in study.chains.items():
        for s in chain:
            n = s["attn_removed"] + s["mlp_removed"]
            rows.append({"model": model, "calib": calib, "method": method, "k": s["k"], "ratio": s["params"]["ratio"],
                         "ratio_no_embed": s["params"]["ratio_no_embed"], "removed_block": s["removed_block"],
                         "attn_removed": s["attn_removed"], "mlp_removed": s["mlp_removed"],
                         "attn_share": s["attn_removed"] / n if n else None})
    write_csv(csv_out, rows)
    title = "share of attention blocks among removed blocks"
    if not rows:
        _no_data(png_out, title)
        return rows
    models = sorted({r["model"] for r in rows})
    plt, fig, axes = _panels(len(models))
    for ax, model in zip(axes, models):
        _plot_lines(ax, [r for r in rows if r["model"] == model], "attn_share", study.key)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("parameters removed (%)")
        ax.set_ylabel("attention blocks / blocks removed")
    _save(plt, fig, png_out, title)
    return rows


# ---------------------------------------------------------------- Figure 7


def _calib_info(chain: list[dict], calib_dir: str | Path | None) -> dict:
    where = Path(calib_dir) if calib_dir else Path(chain[0]["inputs"].get("calibration") or "")
    manifest = where / "manifest.json" if where.suffix != ".json" else where
    info = {"calib_source": None, "nsamples": None, "seqlen": None, "calib_windows": None, "calib_tokens": None}
    if str(where) and manifest.exists():
        m = read_json(manifest, "blockpruner.calibration/1")
        info.update(calib_source=Path(str(m.get("source", ""))).name or None, nsamples=m.get("nsamples"),
                    seqlen=m.get("seqlen"), calib_windows=m.get("windows"), calib_tokens=m.get("tokens"))
    else:
        log.warning("calibration manifest %s not found: its size is left blank", manifest)
    return info


def calibration_effect(paths, csv_out: str | Path, png_out: str | Path, ratio: float | None = None,
                       calib_dirs: dict[str, str | Path] | None = None, ratio_of: str = "all") -> list[dict]:
    """Effect of the calibration set and its sample count (Figure 7).

    Rows: every search and K with the calibration set's source, sample count and length
    (from its manifest: `calib_dirs[name]`, else the path the steps recorded). Panels: the
    best available metric (WikiText-2 ppl, else average accuracy, else calibration ppl) vs
    ratio, one line per calibration set; with `ratio`, that metric at each search's K
    at or above the ratio against the sample count.
    """
    study = Study(paths, ratio_of)
    calib_dirs = calib_dirs or {}
    rows = []
    for r in study.rows():
        chain = study.chains[(r["model"], r["calib"], r["method"])]
        rows.append({**r, **_calib_info(chain, calib_dirs.get(r["calib"]))})
    matched = {}
    if ratio is not None:
        k_of = match_budgets({key: chain for key, chain in study.chains.items()}, ratio, study.key)
        for r in rows:
            r["matched"] = k_of.get((r["model"], r["calib"], r["method"])) == r["k"]
            if r["matched"]:
                matched[(r["model"], r["calib"], r["method"])] = r
    write_csv(csv_out, rows)
    title = "effect of the calibration data"
    metric = next((m for m in ("wikitext2_ppl", "average", "calib_ppl") if any(_finite(r[m]) for r in rows)), None)
    if metric is None:
        _no_data(png_out, title)
        return rows
    scale = 100 if metric == "average" else 1
    plt, fig, axes = _panels(2 if matched else 1)
    _plot_lines(axes[0], [dict(r, calib="", method=f"{r['method']} / {r['calib']}") for r in rows], metric, study.key,
                scale)
    axes[0].set_xlabel("parameters removed (%)")
    axes[0].set_ylabel(METRIC_TITLES[metric])
    axes[0].set_title("per calibration set", fontsize=10)
    if matched:
        ax = axes[1]
        groups = defaultdict(list)
        for (model, calib, method), r in matched.items():
            if _finite(r[metric]) and r["nsamples"] is not None:
                groups[(model, method, r["calib_source"])].append((r["nsamples"], scale * r[metric]))
        for (model, method, source), pts in sorted(groups.items(), key=lambda kv: str(kv[0])):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{method} ({source})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration samples")
        ax.set_ylabel(METRIC_TITLES[metric])
        ax.set_title(f"at the smallest K removing >= {100 * ratio:g}%", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save(plt, fig, png_out, title)
    return rows


# ---------------------------------------------------------------- Table 7


def pruning_time(paths, csv_out: str | Path, png_out: str | Path, ratio: float | None = None,
                 ratio_of: str = "all") -> list[dict]:
    """Selection time of each search to reach a budget (the smallest K at or above `ratio`, else its last K)."""
    study = Study(paths, ratio_of)
    ks = match_budgets(study.chains, ratio, study.key) if ratio is not None else {k: len(c) for k, c in study.chains.items()}
    rows = []
    for key, chain in study.chains.items():
        if key not in ks:
            continue
        k = ks[key]
        s = chain[k - 1]
        rows.append({"model": key[0], "calib": key[1], "method": key[2], "algorithm": s["settings"]["method"], "k": k,
                     "ratio": s["params"]["ratio"], "ratio_no_embed": s["params"]["ratio_no_embed"],
                     "pruning_s": pruning_s(chain, k),
                     "step_jobs_s": sum(x.get("timing", {}).get("elapsed_s", 0.0) for x in chain[:k]),
                     "block_forwards": sum(x.get("cost", {}).get("block_forwards", 0) for x in chain[:k]),
                     "head_tokens": sum(x.get("cost", {}).get("head_tokens", 0) for x in chain[:k])})
    write_csv(csv_out, rows)
    title = "pruning time" + (f" at the smallest K removing >= {100 * ratio:g}%" if ratio is not None else "")
    shown = [r for r in rows if _finite(r["pruning_s"])]
    if not shown:
        _no_data(png_out, title)
        return rows
    plt, fig, axes = _panels(1)
    ax = axes[0]
    labels = [f"{r['method']} ({r['model']}, {r['calib']}, K={r['k']})" for r in shown]
    ax.barh(range(len(shown)), [r["pruning_s"] for r in shown])
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.set_xlabel("selection time (s)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.set_size_inches(8, 1.5 + 0.4 * len(shown))
    _save(plt, fig, png_out, title)
    return rows


def matched_compressed(rows: list[dict], ratio: float, key: str) -> list[dict]:
    """Per compressed method (SliceGPT, LaCo), its model with the smallest achieved ratio at or
    above `ratio`, as a search's K is matched; a method none of whose models reaches it is left out."""
    out = []
    for method in sorted({(r["model"], r["calib"], r["method"]) for r in rows}):
        reaching = [r for r in rows if (r["model"], r["calib"], r["method"]) == method and r[key] is not None
                    and r[key] >= ratio]
        if reaching:
            out.append(min(reaching, key=lambda r: r[key]))
        else:
            log.warning("%s: no compressed model reaches ratio %g; left out", "/".join(method), ratio)
    return out


def budget_table(paths, ratio: float, csv_out: str | Path | None = None, ratio_of: str = "all") -> list[dict]:
    """Each search's smallest K at or above `ratio`, with its ratio and metrics (Table 1's comparison)."""
    study = Study(paths, ratio_of)
    ks = match_budgets(study.chains, ratio, study.key)
    rows = [r for r in study.rows() if ks.get((r["model"], r["calib"], r["method"])) == r["k"]]
    rows += matched_compressed(study.compressed_rows(), ratio, study.key)
    if csv_out:
        write_csv(csv_out, rows)
    return rows


# ---------------------------------------------------------------- Figure 1


def bi_rows(pm, windows) -> list[dict]:
    """Per layer: BI and RM of the whole layer and of its attention and MLP blocks (model as it stands)."""
    from ..search.importance import residual_metrics

    m = residual_metrics(pm, windows)
    rows = []
    for i in range(pm.num_layers):
        row = {"layer": i}
        for name in ("bi", "rm"):
            for unit in ("layer", "attn", "mlp"):
                row[f"{unit}_{name}"] = m[name][f"{unit}.{i}"].value
        rows.append(row)
    return rows


def bi_layer_vs_block(pm, windows, csv_out: str | Path, png_out: str | Path, title: str = "") -> list[dict]:
    """Figure 1: Block Influence of whole layers vs their attention and MLP blocks (and RM)."""
    rows = bi_rows(pm, windows)
    write_csv(csv_out, rows)
    plt, fig, axes = _panels(2, cols=2)
    x = [r["layer"] for r in rows]
    for ax, name, full in zip(axes, ("bi", "rm"), ("Block Influence 1 - cos(x, y)", "relative magnitude ||f(x)|| / ||x + f(x)||")):
        for unit, marker in (("layer", "o"), ("attn", "s"), ("mlp", "^")):
            ax.plot(x, [r[f"{unit}_{name}"] for r in rows], marker=marker, label={"layer": "layer", "attn": "attention block",
                                                                                   "mlp": "MLP block"}[unit])
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(full)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, png_out, title or "layer vs block importance (dense model)")
    return rows
