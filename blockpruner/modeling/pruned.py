"""Materialised (pruned) model directories: their config reader, classes and loader.

A directory written by `blockpruner materialize` holds the kept blocks' weights and a
config.json with a `pruning` record; its modeling file is `pruned_modeling.py` bound to the
base architecture (`modeling_source`). `load_pruned` builds the classes from this package and
this transformers, never from the directory's Python.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import torch

from ..devices import resolve_device, torch_dtype
from ..errors import UserError
from .. import branch
from . import pruned_modeling, read_config

FORMAT = "blockpruner.pruned/1"
MODELING_FILE = "modeling_blockpruner.py"

BRANCH_IMPORT = "from ..branch import branch_output, keyword_args\n"


def standalone_source(module) -> str:
    """`module`'s source with its import of the package's branch runner replaced by that
    runner's code (`blockpruner/branch.py` without its docstring), so the file stands alone."""
    source = inspect.getsource(module)
    if source.count(BRANCH_IMPORT) != 1:
        raise ValueError(f"{module.__name__} must import the branch runner once, as {BRANCH_IMPORT.strip()!r}")
    runner = inspect.getsource(branch)
    code = runner.splitlines(keepends=True)[ast.parse(runner).body[0].end_lineno:]  # after the docstring
    inlined = "# -- the residual branch, from blockpruner/branch.py ".ljust(92, "-") + "\n" + "".join(code).strip("\n") + "\n\n"
    return source.replace(BRANCH_IMPORT, inlined)


def bound_modeling_source(module, config_cls: type, model_cls: type, names: str, by: str) -> str:
    """A self-contained modeling file: `module`'s source (`standalone_source`) plus the lines
    binding its `make_classes` to one base architecture as `names` (e.g. "XConfig, XForCausalLM")."""
    return (
        standalone_source(module).rstrip() + "\n\n\n"
        f"# -- bound to the base architecture by {by} ".ljust(92, "-") + "\n"
        f"from transformers import {config_cls.__name__} as _BaseConfig, {model_cls.__name__} as _BaseModel  # noqa: E402\n\n"
        f"{names} = make_classes(_BaseConfig, _BaseModel)\n"
    )


def modeling_source(config_cls: type, model_cls: type) -> str:
    """`pruned_modeling.py` bound to one base architecture."""
    return bound_modeling_source(pruned_modeling, config_cls, model_cls, "BlockPrunerConfig, BlockPrunerForCausalLM",
                                 "blockpruner.export")


def read_pruned_config(path: str | Path) -> dict:
    d = read_config(path, "give a directory written by `blockpruner materialize`")
    if "pruned_layers" not in d or d.get("pruning", {}).get("format") != FORMAT:
        raise UserError(f"{path}: not a materialised pruned model (config.json has no {FORMAT} pruning record)")
    return d


def pruned_classes(d: dict) -> tuple[type, type]:
    import transformers

    rec = d["pruning"]
    bases = [getattr(transformers, rec[k], None) for k in ("base_config", "base_architecture")]
    if None in bases:
        raise UserError(f"this transformers ({transformers.__version__}) has no {rec['base_config']} / "
                        f"{rec['base_architecture']}; install the version the model was pruned with")
    return pruned_modeling.make_classes(*bases)


def check_weights(path: str | Path, model_cls: type, config) -> None:
    """Compare the weight files' tensor names and shapes with the pruned structure, before loading."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors weight files")
    have: dict[str, tuple] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    have[k] = tuple(sf.get_slice(k).get_shape())
        except Exception as e:  # truncated or not a safetensors file
            raise UserError(f"{f}: unreadable weight file ({e.__class__.__name__}: {e})") from None
    with torch.device("meta"):
        skeleton = model_cls(config)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    missing = sorted(k for k in want if k not in have and k not in tied)
    extra = sorted(k for k in have if k not in want)
    wrong = sorted(f"{k} {have[k]} != {want[k]}" for k in have if k in want and have[k] != want[k])
    for what, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            raise UserError(f"{path}: weights do not match the pruned structure in config.json: {what} "
                            f"{', '.join(keys[:3])}{more}; materialise the model again")


def load_pruned(path: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu",
                device_map: str | None = None):
    """Load a materialised pruned model without remote code (eval mode).

    The model class is the base architecture's, from this transformers, with the pruning
    recorded in config.json applied; weights are checked against it first. Nothing in the
    directory is imported (config.json's auto_map is not followed), whatever its manifest says.
    """
    d = read_pruned_config(path)
    cfg_cls, lm_cls = pruned_classes(d)
    config = cfg_cls.from_pretrained(str(path))
    check_weights(path, lm_cls, config)
    dtype = dtype or d.get("dtype") or "float32"
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    try:
        model = lm_cls.from_pretrained(str(path), config=config, dtype=dtype,
                                       **({"device_map": device_map} if device_map else {}))
    except ValueError as e:
        raise UserError(str(e)) from None
    return (model if device_map else model.to(resolve_device(device))).eval()
