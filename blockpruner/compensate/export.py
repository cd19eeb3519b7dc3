"""Write a pruned + compensated model directory.

The directory is the one `materialize` writes for the same step -- same config, modeling file,
tokenizer and tensor names and shapes -- with the anchors' weights replaced by their folded
versions, so it loads wherever the uncompensated one loads (`load_pruned`, `from_pretrained`
with the shipped modeling file, the Nemotron-NAS rewrite). The manifest records the method,
its settings, each fitted correction's summary and the calibration artifact it was fitted on;
the model card (README.md) says the same in words.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..adapters import adapter_for
from ..artifacts import atomic_dir, read_json
from ..blocks import PrunableModel
from ..errors import UserError
from ..export.materialize import WEIGHTS_FILE, materialize, plan_layers, pruned_tensors
from ..modeling.pruned import load_pruned
from ..export.model_card import calibration_facts, card_from_dir, write_model_card
from .fit import check_method, fit
from .fold import check_foldable, fold
from .guard import guard


def check_request(model_dir: str | Path, method: str, alpha: float | None) -> float:
    """Method, settings and architecture checked from config.json alone, before any weights are read."""
    alpha = check_method(method, alpha)
    config = Path(model_dir) / "config.json"
    if not config.exists():
        raise UserError(f"{model_dir}: no config.json; give a prepared model directory")
    check_foldable(adapter_for(json.loads(config.read_text(encoding="utf-8"))["model_type"]), method)
    return alpha


def compensate(model_dir: str | Path, step_json: str | Path, calib_dir: str | Path, out_dir: str | Path,
               method: str = "scale", alpha: float | None = None, max_windows: int | None = None,
               pruning_method: str = "blockpruner", guarded: bool = True) -> dict:
    """Materialise step `step_json` of `model_dir` with a `method` correction fitted on `calib_dir`
    (with `guarded`, only the corrections that lower the calibration NLL together: `guard`)."""
    from safetensors.torch import save_file

    from ..data.calibration import load_calibration
    from ..model_dir import load_model_dir, write_manifest

    alpha = check_request(model_dir, method, alpha)
    if max_windows is not None and max_windows <= 0:
        raise UserError(f"--max-windows must be a positive integer, got {max_windows}")
    calib = load_calibration(calib_dir)
    windows = calib.windows[:max_windows] if max_windows else calib.windows
    out = Path(out_dir)
    with atomic_dir(out) as staged:
        materialize(model_dir, step_json, staged, method=pruning_method)
        pruned_manifest = read_json(staged / "manifest.json")
        pruning = pruned_manifest["pruning"]
        removed = pruning["removed"]

        model, _, manifest = load_model_dir(model_dir, device="cpu", tokenizer=False)
        pm = PrunableModel.wrap(model)
        corrections = fit(pm, windows, removed, method, alpha)
        if guarded:
            corrections = guard(pm, windows, removed, corrections)
        folded = fold(pm, corrections)
        plan = plan_layers(manifest["num_layers"], removed)
        tensors, _ = pruned_tensors(model, pm.adapter, plan)
        save_file(tensors, str(staged / WEIGHTS_FILE), metadata={"format": "pt"})
        del model, pm, tensors

        record = {
            "method": method,
            "alpha": alpha,
            "guard": guarded,
            "fitted_on": "dense block outputs",
            "calibration": str(calib_dir),
            "calibration_hash": calib.hash,
            "windows": len(windows),
            "corrections": [{**c.summary, **next((f for f in folded if f["anchor"] == c.target.anchor), {})}
                            for c in corrections],
        }
        config_file = staged / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["pruning"]["compensation"] = {k: record[k] for k in ("method", "alpha", "guard", "calibration_hash", "windows")}
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        pruned = load_pruned(staged)
        card = replace(card_from_dir(staged), compensation={
            "method": method, "alpha": alpha, "guard": guarded, "windows": len(windows),
            "fitted": len(record["corrections"]), "kept": sum("skipped" not in c for c in record["corrections"]),
            "calibration": calibration_facts(calib_dir, calib.hash, windows=len(windows))})
        write_model_card(staged, card)
        write_manifest(staged, pruned, source=pruned_manifest["source"], dtype=pruned_manifest["dtype"],
                       extra={"pruning": pruning, "compensation": record, "model_card": card.record()},
                       trust_remote_code=pruned_manifest.get("trust_remote_code", False))
        del pruned
    return {"k": pruning["k"], "removed": removed, **record}
