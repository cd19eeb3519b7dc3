"""Stage 3 commands: the pruned model -- materialised, compressed, compensated, GGUF, its card."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..compress import ALGORITHMS as COMPRESSORS
from ..errors import UserError
from .common import command, device_arg

log = logging.getLogger("blockpruner")


def pruning_step_args(p: argparse.ArgumentParser, blocks: bool = False) -> None:
    """Which removals to apply: --step FILE, or --steps FILES --ratio R (materialize, compensate), or with
    `blocks` a given --blocks list (materialize); chosen_step refuses anything but one of them."""
    p.add_argument("--model", required=True, help="prepared dense model directory the search ran on")
    p.add_argument("--step", help="step_<K>.json whose removed blocks to apply")
    p.add_argument("--steps", nargs="+", help="step_1.json ... step_N.json of one search: the smallest K among them "
                                              "whose pruning ratio reaches --ratio")
    if blocks:
        p.add_argument("--blocks", default=None, metavar="attn.5,mlp.6,...",
                       help="remove these blocks, in this order, instead of a step's: a list given (a published order, "
                            "another tool's result), recorded as given, not searched")
    p.add_argument("--ratio", type=float, default=None, help="with --steps: target ratio of removed parameters, e.g. 0.2")
    p.add_argument("--no-embed", action="store_true", help="with --steps: ratio of non-embedding parameters instead of all")


def nemotron_nas_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nemotron-nas", default=None, metavar="DIR",
                   help="also write the Nemotron-NAS (DeciLM) layout here (Llama family; docs/export.md says which "
                        "engines were run on it)")
    p.add_argument("--nemotron-nas-auto-map", action="store_true",
                   help="name NVIDIA's DeciLM code on the Hub in its config.json (auto_map), for transformers users "
                        "who will trust remote code (default: none, so no reader asks to run remote code)")


def step_of_args(a: argparse.Namespace) -> str | None:
    """steps.chosen_step from materialize's / compensate's arguments."""
    from ..steps import chosen_step

    return chosen_step(a.step, a.steps, a.ratio, a.no_embed, getattr(a, "blocks", None), blocks_allowed=hasattr(a, "blocks"))


def materialize_args(p: argparse.ArgumentParser) -> None:
    pruning_step_args(p, blocks=True)
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--method", default=None,
                   help="method name recorded in config.json (default: blockpruner; with --blocks: given)")
    nemotron_nas_args(p)


@command("materialize", materialize_args, help="write the pruned model of a step artifact as a self-contained directory",
         description="Physically remove the blocks of step_<K>.json: their weights are deleted, layers with both blocks "
                     "removed are dropped, the rest renumbered. The directory loads with blockpruner.load_pruned(DIR) or "
                     "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); its README.md is the model card. "
                     "With --steps FILES --ratio R, K is the smallest step whose pruning ratio reaches R; with --blocks "
                     "LIST, the blocks are the list's (no search artifact).")
def cmd_materialize(a: argparse.Namespace) -> None:
    from ..export.decilm import check_decilm, to_decilm
    from ..export.materialize import materialize

    step = step_of_args(a)
    if a.nemotron_nas:  # refuse before the work, not after
        config = Path(a.model) / "config.json"
        if config.exists():
            check_decilm(json.loads(config.read_text(encoding="utf-8")))
    s = materialize(a.model, step, a.out, method=a.method, removed=a.blocks)
    log.info("materialised K=%d (%s): %d -> %d layers (%d with attention), %d tensors / %d parameters removed, "
             "%d -> %d parameters -> %s", s["k"], ",".join(s["removed"]), s["source_layers"], s["layers"],
             s["attention_layers"], s["removed_tensors"], s["removed_params"], s["params_before"], s["params"], a.out)
    if a.nemotron_nas:
        to_decilm(a.out, a.nemotron_nas, auto_map=a.nemotron_nas_auto_map)
        log.info("Nemotron-NAS (DeciLM) layout -> %s", a.nemotron_nas)


def compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithm", required=True, choices=COMPRESSORS,
                   help="slicegpt (delete rows and columns after a PCA rotation) or laco (merge layers into earlier ones)")
    p.add_argument("--model", required=True, help="prepared dense model directory")
    p.add_argument("--calib", required=True, help="calibration artifact directory")
    p.add_argument("--ratio", type=float, required=True, help="target fraction of all parameters removed, e.g. 0.2")
    p.add_argument("--settings", default="{}", help="the algorithm's settings as a JSON object (default: {} = its defaults)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    device_arg(p)


@command("compress", compress_args, help="SliceGPT or LaCo: write a compressed model directory with manifest.json",
         description="Compress a prepared model with a method that rewrites it instead of removing blocks: SliceGPT "
                     "(Ashkboos et al., 2024) or LaCo (Yang et al., 2024), towards --ratio of all parameters. The "
                     "directory is evaluated like any pruned one; its manifest.json holds the achieved ratio and what "
                     "the algorithm did.")
def cmd_compress(a: argparse.Namespace) -> None:
    import importlib

    try:
        settings = json.loads(a.settings)
    except json.JSONDecodeError as e:
        raise UserError(f"--settings is not JSON ({e}); give an object such as '{{\"threshold\": 0.65}}'") from None
    if not isinstance(settings, dict):
        raise UserError(f"--settings must be a JSON object, got {type(settings).__name__}")
    module = importlib.import_module(f"..compress.{a.algorithm}", __package__)
    m = module.compress(Path(a.model), Path(a.calib), Path(a.out), ratio=a.ratio, settings=settings, device=a.device)
    log.info("%s: %d -> %d parameters, ratio %.4f (target %g) -> %s", a.algorithm, m["params_dense"],
             m["params_pruned"], m["ratio"], a.ratio, a.out)


def compensate_args(p: argparse.ArgumentParser) -> None:
    pruning_step_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory the correction is fitted on")
    p.add_argument("--method", required=True,
                   help="scale (per-channel, any architecture) or linear (d x d map; architectures without post-norms)")
    p.add_argument("--alpha", type=float, default=None,
                   help="ridge pull toward no correction, lambda = alpha * trace(XtX) / d (default: 0.1 scale, 10 linear)")
    p.add_argument("--max-windows", type=int, default=None, help="fit on the first N calibration windows only")
    p.add_argument("--no-guard", action="store_true",
                   help="fold every fitted correction (default: keep each, in forward order, only if it lowers the "
                        "pruned model's calibration NLL together with those kept before it)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--pruning-method", default="blockpruner", help="search method name recorded in config.json")
    nemotron_nas_args(p)


@command("compensate", compensate_args, help="materialise a step with a training-free correction folded into kept blocks",
         description="As materialize, then fit a closed-form correction for each run of removed blocks on the dense "
                     "model's block outputs over --calib (X: the nearest preceding kept block's contribution, Y: X plus "
                     "the removed blocks'), keep those that lower the pruned model's calibration NLL together (--no-guard: all), "
                     "and fold them into the kept blocks' weights. Same shapes and loading as the uncompensated "
                     "directory; manifest.json records the method, settings and fit.")
def cmd_compensate(a: argparse.Namespace) -> None:
    from ..compensate.export import check_request, compensate
    from ..export.decilm import check_decilm, to_decilm

    check_request(a.model, a.method, a.alpha)  # refuse before the work, not after
    if a.nemotron_nas:
        check_decilm(json.loads((Path(a.model) / "config.json").read_text(encoding="utf-8")))
    s = compensate(a.model, step_of_args(a), a.calib, a.out, a.method, a.alpha, a.max_windows, pruning_method=a.pruning_method,
                   guarded=not a.no_guard)
    for c in s["corrections"]:
        if "skipped" in c:
            log.info("%s: not compensated, %s", ",".join(c["removed"]), c["skipped"])
        else:
            log.info("%s -> %s %s: calibration residual %.4g -> %.4g per token", ",".join(c["removed"]), c["anchor"],
                     c["folded_into"], c["residual_before"], c["residual_after"])
    log.info("compensated (%s, alpha %g) K=%d -> %s", s["method"], s["alpha"], s["k"], a.out)
    if a.nemotron_nas:
        to_decilm(a.out, a.nemotron_nas, auto_map=a.nemotron_nas_auto_map)
        log.info("Nemotron-NAS (DeciLM) layout -> %s", a.nemotron_nas)


def export_gguf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned directory (from materialize or compensate), or a prepared dense one as the baseline")
    p.add_argument("out", help="output .gguf file (replaced if it exists)")
    p.add_argument("--outtype", default="f32", help="f32 (written directly), or f16, bf16, q8_0, q4_k_m (by llama.cpp's "
                                                    "own quantiser from the f32 file; default: f32)")
    p.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py, which writes the vocabulary "
                                                     "(default: $BLOCKPRUNER_LLAMA_CPP_CONVERTER, else the copy "
                                                     "envs/llama-cpp.sh unpacks into the cache)")
    p.add_argument("--check-tokens", type=int, default=32,
                   help="run the f32 file in llama.cpp on this many tokens of a fixed text and compare its logits with "
                        "the directory's (0: no check; default: 32)")
    p.add_argument("--threads", type=int, default=0, help="threads for quantising and the check (0: all)")


@command("export-gguf", export_gguf_args, help="write a pruned Llama-family model as a GGUF file llama.cpp runs exactly",
         description="Write llama.cpp's deci architecture: kept blocks packed into (attention, MLP) layers, zero-weight "
                     "placeholders where llama.cpp's graph needs them, the vocabulary as llama.cpp wrote it (the source "
                     ".gguf's, else its converter's), and quantisation by llama.cpp's quantiser. Other architectures are "
                     "refused. With --check-tokens N the f32 file is run in llama.cpp and its logits compared with the "
                     "directory's before quantising (both models in memory: use 0 for models larger than RAM allows).")
def cmd_export_gguf(a: argparse.Namespace) -> None:
    from ..export.llamacpp import export_gguf

    m = export_gguf(a.model, a.out, a.outtype, converter=a.converter, threads=a.threads, check_tokens=a.check_tokens)
    log.info("GGUF %s (%s, %.1f MB): %d layers from %d (%d removed blocks), zero placeholders: FFN in layers %s, "
             "attention in layers %s", a.out, m["outtype"], m["bytes"] / 1e6, m["gguf_layers"], m["source_layers"],
             len(m["removed"]), m["placeholder_ffn_layers"] or "none", m["placeholder_attn_layers"] or "none")
    if "check" in m:
        c = m["check"]
        log.info("llama.cpp check (f32 file, f32 KV cache, %d tokens): max |logit difference| %.3g, argmax agrees on "
                 "%d/%d positions", c["tokens"], c["max_abs_diff"], c["argmax_agree"], c["tokens"])


def model_card_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned directory (from materialize or compensate) whose manifest holds the card's facts")
    p.add_argument("--out", default=None, help="README.md to write (default: the directory's own)")
    p.add_argument("--layout", default="blockpruner", help="blockpruner (the directory), nemotron-nas, or gguf "
                                                          "(a folder of export-gguf files); default: blockpruner")
    p.add_argument("--eval", nargs="*", default=[], help="this model's eval-ppl / eval-tasks results")
    p.add_argument("--dense", nargs="*", default=[], help="the dense model's, shown beside them")


@command("model-card", model_card_args, help="write a pruned model's card (README.md) again, with the study's figures",
         description="Write the Hugging Face model card of a materialised (or compensated) directory from its "
                     "manifest: removed blocks, ratio, method and calibration, how to load it, and with --eval / "
                     "--dense the study's evaluation figures.")
def cmd_model_card(a: argparse.Namespace) -> None:
    from ..artifacts import atomic_write_text
    from ..export.model_card import card_from_dir, evaluation_from_files, model_card_text

    card = card_from_dir(a.model)
    evaluation = evaluation_from_files(a.eval, a.dense) if a.eval or a.dense else None
    out = Path(a.out) if a.out else Path(a.model) / "README.md"
    atomic_write_text(out, model_card_text(card, layout=a.layout, evaluation=evaluation))
    log.info("model card (%s layout%s) -> %s", a.layout, ", with evaluation figures" if evaluation else "", out)
