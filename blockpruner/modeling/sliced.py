"""SliceGPT-sliced model directories: their config reader and loader.

A directory written by SliceGPT compression holds narrower weights, the shortcut matrices and
a config.json with a `slicegpt` record; its modeling file is `sliced_modeling.py` bound to the
base architecture (`modeling_source`). `load_sliced` builds the classes from this package and
this transformers, never from the directory's Python.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from . import read_config, sliced_modeling
from .pruned import bound_modeling_source
from .sliced_modeling import FORMAT

MODELING_FILE = "modeling_slicegpt.py"


def modeling_source(config_cls: type, model_cls: type) -> str:
    """`sliced_modeling.py` bound to one base architecture."""
    return bound_modeling_source(sliced_modeling, config_cls, model_cls, "SlicedConfig, SlicedForCausalLM",
                                 "blockpruner.compress.slicegpt")


def read_sliced_config(path: str | Path) -> dict:
    d = read_config(path, "give a directory written by SliceGPT compression")
    if d.get("slicegpt", {}).get("format") != FORMAT:
        raise UserError(f"{path}: not a SliceGPT-sliced model (config.json has no {FORMAT} record)")
    return d


def load_sliced(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a sliced directory with blockpruner's own classes (the directory's Python is never run)."""
    import transformers

    rec = read_sliced_config(path)["slicegpt"]
    bases = [getattr(transformers, rec[k], None) for k in ("base_config", "base_architecture")]
    if None in bases:
        raise UserError(f"this transformers ({transformers.__version__}) has no {rec['base_config']} / "
                        f"{rec['base_architecture']}; install the version the model was sliced with")
    cfg_cls, lm_cls = sliced_modeling.make_classes(*bases)
    try:
        model = lm_cls.from_pretrained(str(path), config=cfg_cls.from_pretrained(str(path)), dtype=dtype)
    except ValueError as e:
        raise UserError(str(e)) from None
    return model.to(device).eval()
