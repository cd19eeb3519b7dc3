"""LaCo, layer collapse (Yang et al., 2024, "LaCo: Large Language Model Pruning via Layer Collapse").

Reserving-Differences-while-Seeking-Common (RDSC) merge: the next C-1 layers collapse into
layer l,

    theta_l* = theta_l + sum_{k=1}^{C-1} (theta_{l+k} - theta_l),

and layers l+1 .. l+C-1 are dropped. theta is every parameter of the layer's attention and
MLP modules (projections, their biases, Qwen 3 / Gemma 3's q/k norms); the layer's residual
norms stay layer l's, as in the reference code, which merges the attention and MLP weights only.

The search follows the reference code (github.com/yangyifei729/LaCo): l starts at H - C and
moves down. A trial merge is kept when the mean over the calibration samples of the cosine
similarity between the trial model's and the dense model's final hidden states (each sample's
[tokens x hidden] flattened to one vector) exceeds T; then l moves down by I, otherwise by 1.
It stops when the target number of layers is gone or l < L. The reference has no target and
never lowers T: when T blocks the target, fewer layers go, and the manifest says so
(`target_reached: false` and the achieved ratio). The last merge takes only the layers still
needed, so the target is never overshot.

Two departures from the reference notebook, both to match the paper: the differences are
taken against the base layer's original weights (the notebook updates the base in place
inside its loop, which leaves it equal to the last merged layer), and the calibration samples
are the first `samples` windows of the study's calibration artifact instead of five fixed
Wikipedia sentences.

The result is a standard checkpoint with fewer layers (config.num_hidden_layers and per-layer
lists such as Gemma's `layer_types` follow the kept layers), loadable by plain
`from_pretrained`, with a manifest.json that adds to the prepared-model fields the achieved
ratio, the merges and every trial (as SliceGPT's does: `method`, `ratio`, `params_dense`,
`params_pruned`, ...).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..adapters import Adapter, adapter_for, get_path, text_config
from ..blocks import KINDS
from ..errors import UserError

log = logging.getLogger("blockpruner.laco")

METHOD = "laco"


@dataclass(frozen=True)
class LacoSettings:
    """The paper's settings; defaults are the reference notebook's for Llama 2 7B."""

    merge_layers: int = 4  # C: a merge collapses this many consecutive layers into one
    interval: int = 2  # I: how far l moves down after an accepted merge
    threshold: float = 0.65  # T: a merge is kept when the mean similarity exceeds it
    lowest_layer: int = 1  # L: l never goes below it
    highest_layer: int | None = None  # H: l starts at H - C; None = the number of layers
    samples: int = 5  # calibration windows compared (the reference uses 5 sentences)
    layers: int | None = None  # layers to remove; None = the fewest reaching the ratio

    @classmethod
    def from_dict(cls, settings: dict | None) -> LacoSettings:
        settings = dict(settings or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UserError(f"unknown LaCo setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for key, value in settings.items():
            want = float if key == "threshold" else int
            ok = isinstance(value, (int, float)) if want is float else isinstance(value, int)
            if value is not None and (isinstance(value, bool) or not ok):
                raise UserError(f"LaCo setting {key} must be {'a number' if want is float else 'an integer'}, got {value!r}")
            if value is None and key not in ("highest_layer", "layers"):
                raise UserError(f"LaCo setting {key} must be set (omit it for the default {getattr(cls, key)!r})")
        return cls(**settings)

    def validate(self, num_layers: int) -> None:
        """Checks against the model's depth, before any model is loaded."""
        if self.merge_layers < 2:
            raise UserError(f"LaCo merge_layers must be at least 2 (C layers collapse into one), got {self.merge_layers}")
        for key in ("interval", "samples"):
            if getattr(self, key) < 1:
                raise UserError(f"LaCo {key} must be a positive integer, got {getattr(self, key)}")
        if self.lowest_layer < 0:
            raise UserError(f"LaCo lowest_layer must be 0 or more, got {self.lowest_layer}")
        if self.highest_layer is not None and not 0 < self.highest_layer <= num_layers:
            raise UserError(f"LaCo highest_layer must be between 1 and the model's {num_layers} layers, "
                            f"got {self.highest_layer}")
        if self.highest(num_layers) - self.merge_layers < self.lowest_layer:
            raise UserError(f"LaCo: highest_layer ({self.highest(num_layers)}) - merge_layers ({self.merge_layers}) is "
                            f"below lowest_layer ({self.lowest_layer}), so no merge is ever tried; lower merge_layers or "
                            "lowest_layer")
        if self.layers is not None and not 0 < self.layers < num_layers:
            raise UserError(f"LaCo layers must be between 1 and {num_layers - 1} (the model has {num_layers}), "
                            f"got {self.layers}")

    def highest(self, num_layers: int) -> int:
        return num_layers if self.highest_layer is None else self.highest_layer


@dataclass
class Trial:
    """One tried merge: position l in the model as it stood, the source layers involved."""

    position: int
    base: int  # source (dense) index of layer l
    merged: list[int]  # source indices of the layers collapsed into it
    similarity: float
    accepted: bool


# -- sizes ----------------------------------------------------------------------------------------
def param_counts(model: nn.Module, adapter: Adapter) -> tuple[int, int]:
    """All parameters (tied ones once) and those outside the embedding and LM head."""
    total = sum(p.numel() for p in model.parameters())
    embed = {id(p): p.numel() for path in (adapter.embed, adapter.lm_head) for p in get_path(model, path).parameters()}
    return total, total - sum(embed.values())


def layers_for_ratio(layer_params: list[int], total: int, ratio: float) -> int:
    """The fewest layers whose removal takes away at least `ratio` of all parameters.

    Counted with the smallest layer, so that removing any that many layers reaches the ratio
    (the decoder layers of the supported architectures all have the same size).
    """
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be between 0 and 1, got {ratio}")
    smallest = min(layer_params)
    n = math.ceil(ratio * total / smallest - 1e-9)
    if n >= len(layer_params):
        raise UserError(f"ratio {ratio} needs {n} of the model's {len(layer_params)} layers removed; lower the ratio")
    return n


# -- the merge ------------------------------------------------------------------------------------
def merged_parameters(layer: nn.Module, adapter: Adapter) -> dict[str, nn.Parameter]:
    """The parameters RDSC merges: everything in the layer's attention and MLP modules."""
    out = {}
    for kind in KINDS:
        name = adapter.branch(kind).module
        for sub, p in getattr(layer, name).named_parameters():
            out[f"{name}.{sub}"] = p
    return out


@torch.no_grad()
def rdsc_merge(base: nn.Module, others: list[nn.Module], adapter: Adapter) -> dict[str, torch.Tensor]:
    """theta_base += sum_k (theta_k - theta_base), in place; returns the base's original tensors."""
    params = merged_parameters(base, adapter)
    original = {name: p.detach().clone() for name, p in params.items()}
    for layer in others:
        theirs = merged_parameters(layer, adapter)
        if theirs.keys() != params.keys() or any(theirs[n].shape != params[n].shape for n in params):
            raise UserError("LaCo needs decoder layers of one shape; this model's layers differ")
        for name, p in params.items():
            p.add_(theirs[name] - original[name])
    return original


@torch.no_grad()
def restore(base: nn.Module, original: dict[str, torch.Tensor], adapter: Adapter) -> None:
    for name, p in merged_parameters(base, adapter).items():
        p.copy_(original[name])


def sync_config(model: nn.Module, adapter: Adapter, kept: list[int], dense_lists: dict[str, list]) -> None:
    """Layer count, per-layer config lists and layer indices that match the kept layers."""
    config = text_config(model.config, adapter)
    config.num_hidden_layers = len(kept)
    for name, values in dense_lists.items():
        setattr(config, name, [values[i] for i in kept])
    for j, layer in enumerate(get_path(model, adapter.layers)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j


# -- similarity -------------------------------------------------------------------------------------
@torch.no_grad()
def final_hidden(model: nn.Module, adapter: Adapter, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The decoder's last hidden state (after the final norm) for each window, in fp32 on the CPU."""
    decoder = get_path(model, adapter.decoder)
    device = next(model.parameters()).device
    return [decoder(input_ids=w[None].to(device), use_cache=False).last_hidden_state[0].float().cpu() for w in windows]


def similarity(dense: list[torch.Tensor], trial: list[torch.Tensor]) -> float:
    """Mean over samples of the cosine between the flattened hidden states, as the reference computes it."""
    sims = [torch.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in zip(dense, trial)]
    return sum(sims) / len(sims)


# -- the search -------------------------------------------------------------------------------------
def collapse(model: nn.Module, windows: list[torch.Tensor], settings: LacoSettings, target: int) -> tuple[list[int], list[Trial]]:
    """Run LaCo on `model` in place until `target` layers are gone or no layer is left to try.

    Returns the source indices of the kept layers and every trial in order.
    """
    adapter = adapter_for(model.config.model_type)
    layers = get_path(model, adapter.layers)
    config = text_config(model.config, adapter)
    num_layers = len(layers)
    dense_lists = {name: list(getattr(config, name)) for name in adapter.per_layer_lists
                   if isinstance(getattr(config, name, None), list) and len(getattr(config, name)) == num_layers}
    dense = final_hidden(model, adapter, windows)
    kept = list(range(num_layers))
    trials: list[Trial] = []
    position = settings.highest(num_layers) - settings.merge_layers
    while position >= settings.lowest_layer and num_layers - len(kept) < target:
        count = min(settings.merge_layers - 1, len(layers) - position - 1, target - (num_layers - len(kept)))
        base, others = layers[position], [layers[position + k] for k in range(1, count + 1)]
        original = rdsc_merge(base, others, adapter)
        for _ in range(count):
            del layers[position + 1]
        trial_kept = kept[: position + 1] + kept[position + 1 + count:]
        sync_config(model, adapter, trial_kept, dense_lists)
        sim = similarity(dense, final_hidden(model, adapter, windows))
        accepted = sim > settings.threshold
        trials.append(Trial(position, kept[position], kept[position + 1: position + 1 + count], sim, accepted))
        log.info("merge layers %s into %d: similarity %.4f %s threshold %.4f -> %s", trials[-1].merged, kept[position],
                 sim, ">" if accepted else "<=", settings.threshold, "kept" if accepted else "undone")
        if accepted:
            kept = trial_kept
            position -= settings.interval
        else:
            restore(base, original, adapter)
            for k, layer in enumerate(others, start=1):
                layers.insert(position + k, layer)
            sync_config(model, adapter, kept, dense_lists)
            position -= 1
    return kept, trials


# -- the command ------------------------------------------------------------------------------------
def compress(model_dir: Path, calib_dir: Path, out_dir: Path, *, ratio: float, settings: dict, device: str = "cpu") -> dict:
    """LaCo-prune a prepared model towards `ratio` of all parameters and write it to `out_dir`.

    The number of layers to remove is `settings["layers"]` when given, else the fewest whose
    removal reaches `ratio` (see `layers_for_ratio`). Returns the written manifest, which holds
    the achieved ratio, the trials and the settings beside the prepared-model fields.
    """
    from safetensors.torch import save_file

    from ..data.calibration import load_calibration
    from ..model_dir import load_model_dir, read_manifest, write_manifest
    from ..devices import resolve_device
    from ..artifacts import atomic_dir
    from ..export.materialize import WEIGHTS_FILE, KeptLayer, pruned_tensors
    from ..export.model_card import ModelCard, calibration_facts, source_facts, write_model_card

    model_dir, calib_dir, out = Path(model_dir), Path(calib_dir), Path(out_dir)
    if out.resolve() == model_dir.resolve():
        raise UserError(f"--out {out} is the source model directory; write the compressed model elsewhere")
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be between 0 and 1, got {ratio}")
    cfg = LacoSettings.from_dict(settings)
    manifest = read_manifest(model_dir)
    if manifest.get("trust_remote_code"):
        raise UserError(f"{model_dir}: LaCo writes a plain transformers checkpoint; a model with its own code "
                        "(trust_remote_code) is not supported")
    cfg.validate(manifest["num_layers"])
    calib = load_calibration(calib_dir)
    if len(calib.windows) < cfg.samples:
        raise UserError(f"LaCo samples={cfg.samples} but {calib_dir} has {len(calib.windows)} windows; lower samples "
                        "or sample more calibration windows")
    windows = calib.windows[: cfg.samples]

    started = time.perf_counter()
    model, tok, _ = load_model_dir(model_dir, device=resolve_device(device))
    adapter = adapter_for(model.config.model_type)
    dense_total, dense_no_embed = param_counts(model, adapter)
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in get_path(model, adapter.layers)]
    target = cfg.layers if cfg.layers is not None else layers_for_ratio(layer_params, dense_total, ratio)
    kept, trials = collapse(model, windows, cfg, target)
    total, no_embed = param_counts(model, adapter)
    removed = [i for i in range(manifest["num_layers"]) if i not in kept]
    if len(removed) < target:
        log.warning("LaCo removed %d of the %d layers asked for: no further merge passed threshold %.3f above "
                    "lowest_layer %d", len(removed), target, cfg.threshold, cfg.lowest_layer)
    record = {
        "method": METHOD,
        "target_ratio": ratio,
        "ratio": (dense_total - total) / dense_total,
        "ratio_no_embed": (dense_no_embed - no_embed) / dense_no_embed if dense_no_embed else 0.0,
        "params_dense": dense_total,
        "params_pruned": total,
        "params_dense_no_embed": dense_no_embed,
        "params_pruned_no_embed": no_embed,
        "layers_dense": manifest["num_layers"],
        "layers": len(kept),
        "target_layers_removed": target,
        "target_reached": len(removed) >= target,
        "layers_removed": removed,
        "kept_layers": kept,
        "merges": [asdict(t) for t in trials if t.accepted],
        "trials": [asdict(t) for t in trials],
        "settings": {**asdict(cfg), "highest_layer": cfg.highest(manifest["num_layers"])},
        "source_model": str(model_dir),
        "source_hash": manifest["content_hash"],
        "calibration": str(calib_dir),
        "calibration_hash": calib.hash,
        "samples_tokens": [len(w) for w in windows],
        "elapsed_s": time.perf_counter() - started,
    }

    with atomic_dir(out) as tmp:
        # written as materialize writes (tied weights once), which also takes a GGUF-sourced model
        # whose config still names its quantizer (save_pretrained refuses those)
        tensors, _ = pruned_tensors(model, adapter, [KeptLayer(i, True, True) for i in range(len(kept))])
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        merges = "; ".join(f"layers {', '.join(map(str, t['merged']))} into layer {t['base']}" for t in record["merges"])
        write_model_card(tmp, ModelCard(
            **source_facts(model_dir, manifest), method=METHOD, params_before=dense_total, params_after=total,
            source_layers=manifest["num_layers"], layers=len(kept), ratio_no_embed=record["ratio_no_embed"],
            layout="laco", calibration=calibration_facts(calib_dir, calib.hash, windows=len(windows)),
            details=[f"Decoder layers {manifest['num_layers']} → {len(kept)}; merges (layer numbers of the base "
                     f"model): {merges or 'none'}.",
                     f"Settings: merge {cfg.merge_layers} layers at a time, similarity threshold {cfg.threshold}, "
                     f"interval {cfg.interval}, lowest layer {cfg.lowest_layer}, highest {cfg.highest(manifest['num_layers'])}, "
                     f"{cfg.samples} calibration samples.",
                     f"Target: {100 * ratio:.2f}% of all parameters; reached {100 * record['ratio']:.2f}%"
                     + ("." if record["target_reached"] else " (no further merge passed the threshold).")]))
        written = write_manifest(tmp, model, source=str(model_dir), dtype=manifest["dtype"], extra=record)
    log.info("LaCo: %d -> %d layers (%d merges of %d trials), %.2f%% of parameters removed (target %.2f%%) -> %s",
             manifest["num_layers"], len(kept), len(record["merges"]), len(trials), 100 * record["ratio"], 100 * ratio, out)
    return written
