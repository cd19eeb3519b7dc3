"""Stage 5 commands: the summary, the paper's analyses, the search benchmark, the architectures."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import UserError
from ..search import HEAD_BOUND_COLUMNS
from .common import command, device_arg, model_args, ratio_of_arg, study_files_arg, window_batch_arg

log = logging.getLogger("blockpruner")


def summarize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="step and evaluation JSON artifacts")
    p.add_argument("--csv", required=True, help="output table .csv (one row per evaluated model)")
    p.add_argument("--markdown", required=True, help="output table .md")
    ratio_of_arg(p)
    p.add_argument("--plot-ppl", default=None, help="output .png: WikiText-2 perplexity vs pruning ratio")
    p.add_argument("--plot-accuracy", default=None, help="output .png: average accuracy vs pruning ratio")
    p.add_argument("--plot-blocks", default=None, help="output .png: attention vs MLP blocks removed per step")
    p.add_argument("--note", default=None, help="a line printed under the table (config key `note`, e.g. that the "
                   "data is a demo slice)")


@command("summarize", summarize_args, help="collect a study's evaluations into summary.csv / .md (paper's Table 1) + plots",
         description="FILES are the workflow's artifacts: search/<model>/<calib>/<method>/step_<k>.json and eval/<model>/"
                     "dense/<kind>.json or eval/<model>/<calib>/<method>/<pruning>/<kind>.json with kind ppl, tasks or "
                     "speed; labels come from these paths. r<x> pruning labels resolve with --ratio-of.")
def cmd_summarize(a: argparse.Namespace) -> None:
    from ..report.summary import summarize

    rows = summarize(a.files, a.csv, a.markdown, ratio_of=a.ratio_of, plot_ppl=a.plot_ppl,
                     plot_accuracy=a.plot_accuracy, plot_blocks=a.plot_blocks, note=a.note)
    log.info("summary of %d evaluated models -> %s, %s", len(rows), a.csv, a.markdown)


def analyze_bi_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory")
    p.add_argument("--max-windows", type=int, default=None, help="use only the first N windows (default: all)")
    p.add_argument("--csv", required=True, help="output .csv (one row per layer)")
    p.add_argument("--png", required=True, help="output .png")


@command("analyze-bi", analyze_bi_args, help="Figure 1: BI (and RM) of layers vs attention / MLP blocks -> CSV + PNG",
         description="Block Influence 1 - cos(input, output) and relative magnitude of every layer and every block of "
                     "the dense model, averaged over the calibration tokens.")
def cmd_analyze_bi(a: argparse.Namespace) -> None:
    from ..blocks import PrunableModel
    from ..data.calibration import load_calibration
    from ..model_dir import load_model_dir, read_manifest
    from ..report.analyses import bi_layer_vs_block

    if a.max_windows is not None and a.max_windows < 1:
        raise UserError(f"--max-windows must be a positive integer, got {a.max_windows}")
    read_manifest(a.model)
    calib = load_calibration(a.calib)
    model, _, _ = load_model_dir(a.model, a.dtype, a.device, a.device_map, tokenizer=False)
    rows = bi_layer_vs_block(PrunableModel.wrap(model), calib.windows[: a.max_windows], a.csv, a.png,
                             title=f"layer vs block importance: {Path(a.model).name}")
    log.info("BI / RM of %d layers and their blocks -> %s, %s", len(rows), a.csv, a.png)


def analysis_args(p: argparse.ArgumentParser) -> None:
    study_files_arg(p)
    p.add_argument("--csv", required=True, help="output .csv")
    p.add_argument("--png", required=True, help="output .png")
    ratio_of_arg(p)


def budget_analysis_args(p: argparse.ArgumentParser) -> None:
    analysis_args(p)
    p.add_argument("--ratio", type=float, default=None,
                   help="compare at each search's smallest K removing at least this ratio (Table 1's rule)")


def calibration_analysis_args(p: argparse.ArgumentParser) -> None:
    budget_analysis_args(p)
    p.add_argument("--calib-dir", action="append", default=[], metavar="NAME=DIR",
                   help="calibration artifact of set NAME (default: the path the steps recorded)")


@command("analyze-ratio", analysis_args, help="Figures 4/6/10: perplexity and accuracy vs pruning ratio per method -> CSV + PNG")
def cmd_analyze_ratio(a: argparse.Namespace) -> None:
    from ..report.analyses import metrics_vs_ratio

    rows = metrics_vs_ratio(a.files, a.csv, a.png, ratio_of=a.ratio_of)
    log.info("ratio analysis: %d rows -> %s, %s", len(rows), a.csv, a.png)


@command("analyze-attention", analysis_args,
         help="Figure 5: share of attention blocks among those removed, per step -> CSV + PNG")
def cmd_analyze_attention(a: argparse.Namespace) -> None:
    from ..report.analyses import attention_share

    rows = attention_share(a.files, a.csv, a.png, ratio_of=a.ratio_of)
    log.info("attention analysis: %d rows -> %s, %s", len(rows), a.csv, a.png)


@command("analyze-calibration", calibration_analysis_args,
         help="Figure 7: effect of the calibration set and its sample count -> CSV + PNG")
def cmd_analyze_calibration(a: argparse.Namespace) -> None:
    from ..report.analyses import calibration_effect

    bad = [x for x in a.calib_dir if "=" not in x]
    if bad:
        raise UserError(f"--calib-dir {bad[0]!r}: expected NAME=DIR")
    dirs = dict(x.split("=", 1) for x in a.calib_dir)
    rows = calibration_effect(a.files, a.csv, a.png, ratio=a.ratio, calib_dirs=dirs, ratio_of=a.ratio_of)
    log.info("calibration analysis: %d rows -> %s, %s", len(rows), a.csv, a.png)


@command("analyze-time", budget_analysis_args, help="Table 7: selection time of each method to reach a budget -> CSV + PNG")
def cmd_analyze_time(a: argparse.Namespace) -> None:
    from ..report.analyses import pruning_time

    rows = pruning_time(a.files, a.csv, a.png, ratio=a.ratio, ratio_of=a.ratio_of)
    log.info("time analysis: %d rows -> %s, %s", len(rows), a.csv, a.png)


def match_budgets_args(p: argparse.ArgumentParser) -> None:
    study_files_arg(p)
    p.add_argument("--ratio", type=float, required=True, help="target ratio, e.g. 0.25")
    ratio_of_arg(p)
    p.add_argument("--csv", default=None, help="also write the matched rows (with their metrics) as .csv")


@command("match-budgets", match_budgets_args, help="each search's smallest K whose pruning ratio reaches a target",
         description="Table 1's budget matching across methods: for each search in FILES, the smallest K whose parameter "
                     "ratio is at or above --ratio (set it to the baseline's ratio); searches that stop below it are "
                     "left out, with a warning.")
def cmd_match_budgets(a: argparse.Namespace) -> None:
    from ..report.analyses import budget_table

    for r in budget_table(a.files, a.ratio, a.csv, ratio_of=a.ratio_of):
        k = "-" if r["k"] is None else r["k"]  # a compressed model (SliceGPT, LaCo) has no K
        print(f"{r['model']}\t{r['calib']}\t{r['method']}\tK={k}\tratio={r['ratio']:.4f}")


def benchmark_search_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="prepared model directory (blockpruner prepare-model)")
    src.add_argument("--tiny", action="store_true", help="a random deep Llama-style model instead (no files)")
    p.add_argument("--calib", help="calibration artifact directory (with --model)")
    p.add_argument("--max-windows", type=int, default=None, help="use only the first N calibration windows")
    p.add_argument("--k", type=int, default=4, help="greedy steps (default 4)")
    p.add_argument("--methods", default="plain,exact,bounded,screened",
                   help="comma-separated from plain, prefix, exact, bounded, screened (default plain,exact,bounded,screened)")
    p.add_argument("--head-bound-columns", type=int, default=HEAD_BOUND_COLUMNS, metavar="N",
                   help=f"LM-head columns per window of the bounded method's head bound (default {HEAD_BOUND_COLUMNS})")
    p.add_argument("--screen-windows", type=int, default=2, help="screened mode S (default 2)")
    p.add_argument("--confirm-top", type=int, default=4, help="screened mode M (default 4)")
    p.add_argument("--candidates-by-bi", type=int, default=None, help="screened mode R (default: off)")
    window_batch_arg(p)
    device_arg(p, default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: the model's)")
    p.add_argument("--layers", type=int, default=32, help="--tiny: decoder layers (default 32)")
    p.add_argument("--hidden", type=int, default=256, help="--tiny: hidden size (default 256)")
    p.add_argument("--vocab", type=int, default=512, help="--tiny: vocabulary (default 512)")
    p.add_argument("--windows", type=int, default=8, help="--tiny: calibration windows (default 8)")
    p.add_argument("--seqlen", type=int, default=64, help="--tiny: tokens per window (default 64)")
    p.add_argument("--seed", type=int, default=0, help="--tiny: weights and data seed")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--md", default=None, help="also write the table to this Markdown file")


@command("benchmark-search", benchmark_search_args, help="time plain greedy vs exact vs screened search in one process",
         description="Runs, in one process on the same model, windows and K: plain greedy (remove, full forward, "
                     "restore), the exact search (`step`), optionally prefix reuse alone, and the screened mode. Prints "
                     "each removal sequence and whether it equals plain greedy's, block forwards, LM-head tokens, the FLOP "
                     "model's predicted speed-up, the measured wall-time ratio and peak memory.")
def cmd_benchmark_search(a: argparse.Namespace) -> dict:
    from ..report.search_speed import run_cli

    return run_cli(a)


@command("architectures", lambda p: None, help="list supported model types")
def cmd_architectures(a: argparse.Namespace) -> None:
    from ..adapters import ADAPTERS

    for name, ad in sorted(ADAPTERS.items()):
        print(f"{name:12s} {ad.notes}")
