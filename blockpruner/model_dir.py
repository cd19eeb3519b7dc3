"""Model directories: what every stage knows about the directories it reads and writes.

A model directory is one of
- *prepared* (`prepare-model`): the source's weights as safetensors, its tokenizer, config.json;
- *pruned* (`materialize`, compensation): the kept blocks only, a `pruning` record in config.json;
- *sliced* (SliceGPT): narrower weights, a `slicegpt` record in config.json;
each with a `manifest.json` (source, architecture, layer and parameter counts, sha256 of every
weight file and one content hash over them), written by `write_manifest` and checked by
`read_manifest` (sizes) or `verify_weights` (contents).

`load_model_dir` loads any of them: config.json is read once to say which kind it is
(`directory_kind`); pruned and sliced directories are built from the package's own classes
(`modeling`), never from the directory's Python. A prepared directory runs the model's own
code (its `auto_map`) only if its manifest trusts it, and a directory that needs code its
manifest does not trust is refused before any weights are read (`trusts_remote_code`); the
tokenizer follows the same choice (`load_tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .adapters import adapter_for, text_config
from .artifacts import read_json, sha256_file, sha256_text, write_json
from .devices import resolve_device, torch_dtype
from .errors import UserError
from .modeling import pruned, read_config, sliced

FORMAT = "blockpruner.model/1"
KINDS = ("prepared", "pruned", "sliced")
TRUST_WORKFLOW = "workflow: models.<name>.trust_remote_code: true"
TRUST_FIX = f"pass --trust-remote-code ({TRUST_WORKFLOW})"


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def write_manifest(out: Path, model, source: str, dtype: str, extra: dict | None = None,
                   trust_remote_code: bool = False) -> dict:
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in weight_files(out)}
    adapter = adapter_for(model.config.model_type)
    manifest = {
        "source": source,
        "trust_remote_code": bool(trust_remote_code),  # later loads of this directory follow it
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "num_layers": text_config(model.config, adapter).num_hidden_layers,
        "num_blocks": 2 * text_config(model.config, adapter).num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "files": files,
        "content_hash": sha256_text(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True)),
        **(extra or {}),
    }
    return write_json(out / "manifest.json", manifest, FORMAT)


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared model, with its weight files checked by size."""
    directory = Path(directory)
    if not (directory / "manifest.json").exists():
        raise UserError(f"{directory}: not a prepared model (no manifest.json); run `blockpruner prepare-model` first")
    manifest = read_json(directory / "manifest.json", FORMAT)
    for name, info in manifest["files"].items():
        f = directory / name
        if not f.exists() or f.stat().st_size != info["bytes"]:
            raise UserError(f"{f}: missing or not the size its manifest records; prepare the model again")
    return manifest


def verify_weights(directory: str | Path) -> None:
    """Full content check: re-hash every weight file (slow for large models)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, info in manifest["files"].items():
        if sha256_file(directory / name) != info["sha256"]:
            raise UserError(f"{directory / name}: content does not match its manifest's sha256; prepare the model again")


def directory_kind(config: dict) -> str:
    """prepared, pruned or sliced, from a directory's parsed config.json."""
    record = config.get("pruning")
    if isinstance(record, dict) and record.get("format") == pruned.FORMAT:
        return "pruned"
    record = config.get("slicegpt")
    if isinstance(record, dict) and record.get("format") == sliced.FORMAT:
        return "sliced"
    return "prepared"


def remote_code_reason(config: dict) -> str | None:
    """Why loading this config.json would run the model's own Python, or None when it names none.

    `auto_map` names the repository's classes, which transformers imports when trusted (even
    for a model_type it knows, whose built-in class may not match the weights); a model_type
    transformers does not know can only be built from them.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    parts = []
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        parts.append(f"model_type {model_type!r} is not built into transformers")
    auto_map = config.get("auto_map")
    if auto_map:
        names = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        flat = [n for v in names for n in (v if isinstance(v, (list, tuple)) else [v]) if n]
        parts.append(f"auto_map in config.json: {', '.join(map(str, flat))}")
    return "; ".join(parts) if auto_map else None


def trusts_remote_code(directory: str | Path, manifest: dict, config: dict | None = None) -> bool:
    """The manifest's remote-code choice; a directory that needs code its manifest does not trust is refused."""
    trusted = bool(manifest.get("trust_remote_code", False))
    config = read_config(directory) if config is None else config
    if not trusted and directory_kind(config) == "prepared":
        why = remote_code_reason(config)
        if why:
            raise UserError(f"model {directory} ships its own modeling code ({why}) but its manifest.json does not "
                            f"trust it; prepare it again with --trust-remote-code ({TRUST_WORKFLOW})")
    return trusted


def auto_tokenizer(location: str | Path, what: str, fix: str, **kwargs):
    """AutoTokenizer; its ValueError for a tokenizer whose own code is untrusted becomes one line naming the fix."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, **kwargs)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(f"model {what}: its tokenizer ships its own code (auto_map in tokenizer_config.json); "
                        f"it runs only if you trust it: {fix}") from None


def load_tokenizer(directory: str | Path, manifest: dict | None = None, config: dict | None = None):
    """The tokenizer of a model directory, running its code only if the manifest trusts it."""
    from transformers import AutoConfig

    manifest = manifest if manifest is not None else read_manifest(directory)
    config = read_config(directory) if config is None else config
    kwargs = {"trust_remote_code": trusts_remote_code(directory, manifest, config)}
    if directory_kind(config) != "prepared":  # config.json names the package's own modeling file
        kwargs["config"] = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    return auto_tokenizer(directory, str(directory), f"prepare it again with --trust-remote-code ({TRUST_WORKFLOW})",
                           **kwargs)


def load_model_dir(directory: str | Path, dtype: str | None = None, device: str = "cpu", device_map: str | None = None,
                   tokenizer: bool = True):
    """Load any model directory -> (model in eval mode, tokenizer or None, manifest).

    Remote code runs only if the manifest trusts it; a pruned directory is loaded by
    `modeling.pruned.load_pruned` and a sliced one by `modeling.sliced.load_sliced`, which
    never run the directory's code.
    """
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(directory)
    config = read_config(directory)
    kind = directory_kind(config)
    if kind == "pruned":
        model = pruned.load_pruned(directory, dtype or manifest["dtype"], device, device_map=device_map)
    elif kind == "sliced":
        if device_map:
            raise UserError(f"{directory}: a SliceGPT model loads on one device; drop --device-map")
        model = sliced.load_sliced(directory, torch_dtype(dtype or manifest["dtype"]), resolve_device(device))
    else:
        kwargs = {"dtype": torch_dtype(dtype or manifest["dtype"]),
                  "trust_remote_code": trusts_remote_code(directory, manifest, config)}
        if device_map:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        if not device_map:
            model.to(resolve_device(device))
        model.eval()
    tok = load_tokenizer(directory, manifest, config) if tokenizer else None
    return model, tok, manifest
