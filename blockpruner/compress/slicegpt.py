"""SliceGPT (Ashkboos et al., ICLR 2024): delete rows and columns of every weight matrix by
slicing the residual stream to its leading principal components.

Why it works (computational invariance): in a pre-norm transformer whose norms are plain
RMSNorm `w * x / rms(x)`, the weights `w` can be folded into the linears that read the norm
(q/k/v, gate/up, and the LM head for the final norm). What is left, `x / rms(x)`, depends on
`||x||` only, so rotating the residual stream by any orthogonal Q -- embeddings E -> E Q,
readers W -> W Q, writers W -> Q^T W -- leaves every output unchanged. SliceGPT picks, before
each block, the Q whose columns are the principal directions of that block's input (PCA of
the stream over calibration tokens, eigenvectors by descending eigenvalue), and keeps only
the first d' of them. Consecutive blocks use different bases, so each residual shortcut
carries the matrix Q_prev^T Q_next (sliced): `h -> h @ shortcut_Q + branch(norm(h))`.

Following the reference code (microsoft/TransformerCompression, `rotate_and_slice_sequential`):

- the bases are computed block by block on the model already sliced up to that block, so each
  PCA sees the errors of the slicing before it;
- the PCA matrix is the uncentred second moment sum(X^T X) in float64, damped by 1% of its
  mean diagonal (which moves no eigenvector);
- d' is the same for every block, a multiple of `round_to` (the reference rounds down to a
  multiple of 8, `--round-interval 8`);
- by default the LM head is not sliced (`do_slice_head=False`): the last layer's MLP writes
  the full width, its shortcut is [d', d], and the head stays [vocab, d];
- the weightless norms divide by the original width d, not the sliced one;
- the kept directions stay in PCA orientation (the reference's `--final-orientation random`
  multiplies them by a random rotation within the kept subspace, which changes no output).

Here the target is a fraction of ALL parameters removed (as BlockPruner's Table 1 reports
SliceGPT); `sliced_width` finds the d' that comes closest, `parameter_count` is the closed form.

Gemma 2 and 3 are refused: their sandwich post-norms normalise each branch's output, with
their own weights, before it joins the residual stream, and that does not commute with a
rotation of the stream. Gemma 1 is sliced: its (1 + w) norms fold like w, and its sqrt(d)
embedding scale is a scalar, which commutes with any rotation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import Adapter, adapter_for, get_path
from ..branch import branch_output
from ..errors import UserError
from ..modeling import sliced_modeling
from ..modeling.sliced import MODELING_FILE, load_sliced, modeling_source
from ..modeling.sliced_modeling import FORMAT, WeightlessRMSNorm
WEIGHTS_FILE = "model.safetensors"
DEFAULT_SETTINGS = {"calibration_windows": None, "round_to": 8, "slice_head": False, "dtype_pca": "float64"}


# -- which architectures, and where their linears are ------------------------------------------
@dataclass(frozen=True)
class Linears:
    """The linears (paths inside a decoder layer) that read and write each block's stream."""

    attn_inputs: tuple[str, ...]
    attn_output: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str

    def inputs(self, kind: str) -> tuple[str, ...]:
        return self.attn_inputs if kind == "attn" else self.mlp_inputs

    def output(self, kind: str) -> str:
        return self.attn_output if kind == "attn" else self.mlp_output


_LLAMA = Linears(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                 ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
LINEARS: dict[str, Linears] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # q_norm / k_norm act on head_dim after the projections: untouched
    "phi3": Linears(("self_attn.qkv_proj",), "self_attn.o_proj", ("mlp.gate_up_proj",), "mlp.down_proj"),
    # Gemma 1: its norms scale by (1 + w), which folds like w; its embeddings are multiplied by
    # the scalar sqrt(hidden_size), which commutes with any rotation
    "gemma": _LLAMA,
}
NORM_OFFSET = {"gemma": 1.0}  # the norm multiplies by (offset + w)
_SANDWICH = ("has sandwich norms: post-norms with their own weights normalise each branch output before it "
             "joins the residual stream (and its pre-norms scale by 1 + w)")
REFUSED = {"gemma2": f"Gemma 2 {_SANDWICH}", "gemma3_text": f"Gemma 3 {_SANDWICH}", "gemma3": f"Gemma 3 {_SANDWICH}"}


def check_supported(model_type: str) -> Linears:
    """The linears of a supported architecture, or a one-line error saying why not."""
    if model_type in REFUSED:
        raise UserError(f"SliceGPT cannot slice model_type={model_type!r}: {REFUSED[model_type]}, which break "
                        "the rotation invariance it relies on; use blockpruner's block pruning for this model")
    if model_type not in LINEARS:
        raise UserError(f"SliceGPT does not support model_type={model_type!r}; supported: {', '.join(sorted(LINEARS))}")
    return LINEARS[model_type]


def _biases(config) -> tuple[bool, bool, bool]:
    """(q/k/v biases, o_proj bias, MLP biases) of an architecture, as its modeling file builds them."""
    if config.model_type == "qwen2":
        return True, False, False
    if config.model_type in ("llama", "qwen3", "gemma"):
        attn = bool(getattr(config, "attention_bias", False))
        return attn, attn, bool(getattr(config, "mlp_bias", False))
    return False, False, False


# -- sizes -----------------------------------------------------------------------------------
def parameter_count(config, d_sliced: int | None, *, slice_head: bool = False) -> int:
    """Parameters of the model sliced to width `d_sliced` (None: of the dense model).

    Sliced: embedding V d'; per layer q/k/v (q + 2kv) d' (+ their biases), o_proj q d' (+ d'),
    attention shortcut d'^2, gate/up 2 I d', down_proj I out (+ biases), MLP shortcut d' out,
    Qwen3's q/k norms 2 head_dim; no norm weights; head V out. `out` is d' except the last layer
    when the head is not sliced (then d). Dense: the usual count, norms included, the head
    counted once when tied.
    """
    check_supported(config.model_type)
    d, vocab, layers, inter = config.hidden_size, config.vocab_size, config.num_hidden_layers, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    qkv_bias, o_bias, mlp_bias = _biases(config)
    head_norms = 2 * head_dim if config.model_type == "qwen3" else 0

    def layer(k: int, out: int, shortcuts: bool) -> int:
        attn = (q + 2 * kv) * k + qkv_bias * (q + 2 * kv) + q * k + o_bias * k + head_norms
        mlp = 2 * inter * k + mlp_bias * 2 * inter + inter * out + mlp_bias * out
        return attn + mlp + (k * k + k * out if shortcuts else 2 * d)  # dense layers have two norms instead

    if d_sliced is None:
        head = 0 if config.tie_word_embeddings else vocab * d
        return vocab * d + layers * layer(d, d, False) + d + head
    k = d_sliced
    out = k if slice_head else d
    return vocab * k + (layers - 1) * layer(k, k, True) + layer(k, out, True) + vocab * out


def sliced_width(config, ratio: float, *, round_to: int = 8, slice_head: bool = False) -> int:
    """The width d' (a multiple of `round_to`) whose sliced model removes the fraction of all
    parameters closest to `ratio` (the larger width on a tie)."""
    if not 0 <= ratio < 1:
        raise UserError(f"ratio must be a fraction of the parameters in [0, 1), got {ratio}")
    d = config.hidden_size
    if not isinstance(round_to, int) or not 1 <= round_to <= d:
        raise UserError(f"round_to must be an integer in [1, hidden_size={d}], got {round_to!r}")
    dense = parameter_count(config, None)
    widths = range(d - d % round_to, 0, -round_to)
    return min(widths, key=lambda k: abs(1 - parameter_count(config, k, slice_head=slice_head) / dense - ratio))


def slicing_for_ratio(config, ratio: float, *, round_to: int = 8, slice_head: bool = False) -> float:
    """The hidden-dimension slicing fraction 1 - d'/d that removes about `ratio` of all parameters."""
    return 1 - sliced_width(config, ratio, round_to=round_to, slice_head=slice_head) / config.hidden_size


# -- PCA ---------------------------------------------------------------------------------------
@torch.no_grad()
def pca_basis(signals: Sequence[torch.Tensor]) -> torch.Tensor:
    """Orthogonal [d, d] float64 matrix whose columns are the principal directions of the
    signals' rows (uncentred, as the paper's sum of X^T X), by descending eigenvalue."""
    cov = None
    for x in signals:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        cov = x.T @ x if cov is None else cov + x.T @ x
    cov.diagonal().add_(0.01 * cov.diagonal().mean())  # damping as the reference; eigenvectors unchanged
    values, vectors = torch.linalg.eigh(cov)
    return vectors[:, torch.argsort(values, descending=True)]


# -- weight surgery ----------------------------------------------------------------------------
def _set_weight(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.to(like.dtype).contiguous(), requires_grad=False))


def _rotate_reader(linear: nn.Linear, Q: torch.Tensor, width: int) -> None:
    """A linear reading the stream: W -> (W Q)[:, :width]."""
    W = linear.weight
    _set_weight(linear, "weight", (W.to(torch.float64) @ Q)[:, :width], W)
    linear.in_features = width


def _rotate_writer(linear: nn.Linear, Q: torch.Tensor, width: int) -> None:
    """A linear writing the stream: W -> (Q^T W)[:width], b -> (Q^T b)[:width]."""
    W = linear.weight
    _set_weight(linear, "weight", (Q.T @ W.to(torch.float64))[:width], W)
    if linear.bias is not None:
        _set_weight(linear, "bias", (Q.T @ linear.bias.to(torch.float64))[:width], linear.bias)
    linear.out_features = width


@torch.no_grad()
def fuse_norms(model, adapter: Adapter, linears: Linears) -> None:
    """Fold every RMSNorm weight into the linears that read the norm and make the norms weightless.

    The LM head is untied from the embeddings first (it absorbs the final norm's weight).
    """
    config = model.config
    d, eps = config.hidden_size, config.rms_norm_eps
    offset = NORM_OFFSET.get(config.model_type, 0.0)

    def fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
        w = offset + norm.weight.to(torch.float64)
        if w.shape != (d,):
            raise UserError(f"{type(norm).__name__} weight has shape {tuple(w.shape)}, expected ({d},); not a plain RMSNorm")
        for lin in readers:
            _set_weight(lin, "weight", lin.weight.to(torch.float64) * w, lin.weight)

    for layer in get_path(model, adapter.layers):
        for kind in ("attn", "mlp"):
            norm_name = adapter.branch(kind).pre_norm
            fold(getattr(layer, norm_name), [get_path(layer, p) for p in linears.inputs(kind)])
            setattr(layer, norm_name, WeightlessRMSNorm(d, eps))
    head, embed = get_path(model, adapter.lm_head), get_path(model, adapter.embed)
    if head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    fold(get_path(model, adapter.final_norm), [head])
    parent, _, name = adapter.final_norm.rpartition(".")
    setattr(get_path(model, parent), name, WeightlessRMSNorm(d, eps))
    model.config.tie_word_embeddings = False


def _branch(layer: nn.Module, adapter: Adapter, kind: str, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One residual branch's output (without the shortcut) as the layer computes it."""
    spec = adapter.branch(kind)
    return branch_output(layer, kind, hidden, kwargs, spec.pre_norm, spec.module, None, spec.dropout)


@torch.no_grad()
def rotate_and_slice(model, windows: Sequence[torch.Tensor], width: int, *, slice_head: bool = False,
                     basis: Callable[[Sequence[torch.Tensor]], torch.Tensor] = pca_basis) -> None:
    """Rotate and slice a norm-fused model in place, block by block on the already sliced model.

    `basis(signals) -> [d, d] orthogonal float64` picks each block's basis (PCA; the tests
    also pass the identity, i.e. slicing without rotation). Afterwards every layer owns
    `attn_shortcut_Q` / `mlp_shortcut_Q` and the weights have their sliced shapes.
    """
    from ..blocks import PrunableModel
    from ..engine.forward import capture_window

    adapter = adapter_for(model.config.model_type)
    linears = LINEARS[model.config.model_type]
    d = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    pm = PrunableModel.wrap(model)
    contexts = [capture_window(pm, ids.to(device).unsqueeze(0)) for ids in windows]
    layer_kwargs = [c.layer_kwargs for c in contexts]

    Q = basis([c.hidden for c in contexts]).to(device)
    embed = get_path(model, adapter.embed)
    _set_weight(embed, "weight", (embed.weight.to(torch.float64) @ Q)[:, :width], embed.weight)
    embed.embedding_dim = width
    xs = [(c.hidden.to(torch.float64) @ Q)[..., :width].to(dtype) for c in contexts]
    del contexts

    layers = get_path(model, adapter.layers)
    for i, layer in enumerate(layers):
        for kind in ("attn", "mlp"):
            out = d if (kind == "mlp" and i == len(layers) - 1 and not slice_head) else width
            for path in linears.inputs(kind):  # readers follow the previous basis
                _rotate_reader(get_path(layer, path), Q, width)
            shortcut = Q.T[:width]  # [width, d]: from the previous basis back to the model's own
            signals = [x @ shortcut.to(dtype) + _branch(layer, adapter, kind, x, kw[i]) for x, kw in zip(xs, layer_kwargs)]
            Q = basis(signals).to(device)
            _rotate_writer(get_path(layer, linears.output(kind)), Q, out)
            layer.register_parameter(f"{kind}_shortcut_Q",
                                     nn.Parameter((shortcut @ Q[:, :out]).to(dtype).contiguous(), requires_grad=False))
            xs = [(s.to(torch.float64) @ Q)[..., :out].to(dtype) for s in signals]
    head = get_path(model, adapter.lm_head)
    _rotate_reader(head, Q, d if not slice_head else width)


# -- the sliced model --------------------------------------------------------------------------
def _base_classes(model) -> tuple[type, type]:
    import transformers

    for cls in (type(model), type(model.config)):
        if getattr(transformers, cls.__name__, None) is not cls:
            raise UserError(f"{cls.__name__} is not a transformers class (remote code or an already pruned or sliced "
                            "model); slice the prepared dense model")
    return type(model.config), type(model)


def slicing_record(model, adapter: Adapter, linears: Linears, width: int, slice_head: bool) -> dict:
    """What the sliced modeling code needs: widths and names (config.json's `slicegpt`)."""
    d = model.config.hidden_size
    branches = {kind: {"norm": adapter.branch(kind).pre_norm, "module": adapter.branch(kind).module,
                       "dropout": adapter.branch(kind).dropout, "inputs": list(linears.inputs(kind)),
                       "output": linears.output(kind)} for kind in ("attn", "mlp")}
    return {"format": FORMAT, "hidden_size": d, "sliced_size": width, "head_size": width if slice_head else d,
            "slicing": 1 - width / d, "eps": model.config.rms_norm_eps, "layers_path": adapter.layers,
            "embed": adapter.embed, "final_norm": adapter.final_norm, "lm_head": adapter.lm_head,
            "branches": branches, "layer_returns_tuple": adapter.layer_returns_tuple,
            "base_architecture": type(model).__name__, "base_config": type(model.config).__name__}


def sliced_config(model, record: dict):
    config_cls, model_cls = _base_classes(model)
    d = model.config.to_dict()
    d["slicegpt"] = record
    d["tie_word_embeddings"] = False
    d["architectures"] = ["SlicedForCausalLM"]
    d["auto_map"] = {"AutoConfig": f"{MODELING_FILE[:-3]}.SlicedConfig",
                     "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.SlicedForCausalLM"}
    cfg_cls, _ = sliced_modeling.make_classes(config_cls, model_cls)
    return cfg_cls.from_dict(d)


def slice_model(model, windows: Sequence[torch.Tensor], width: int, *, slice_head: bool = False,
                basis: Callable[[Sequence[torch.Tensor]], torch.Tensor] = pca_basis):
    """SliceGPT in memory: the sliced model (class `SlicedForCausalLM`, eval mode) of a dense one.

    `model` is consumed: its modules are rewritten in place and its tensors reused.
    """
    linears = check_supported(model.config.model_type)
    adapter = adapter_for(model.config.model_type)
    d = model.config.hidden_size
    if not 1 <= width <= d:
        raise UserError(f"sliced width must be in [1, hidden_size={d}], got {width}")
    if not windows:
        raise UserError("no calibration windows; SliceGPT needs calibration tokens for its PCA")
    config_cls, model_cls = _base_classes(model)
    record = slicing_record(model, adapter, linears, width, slice_head)
    model.eval()
    fuse_norms(model, adapter, linears)
    rotate_and_slice(model, windows, width, slice_head=slice_head, basis=basis)
    config = sliced_config(model, record)
    _, lm_cls = sliced_modeling.make_classes(config_cls, model_cls)
    with torch.device("meta"):
        sliced = lm_cls(config)
    sliced.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buf in model.named_buffers():  # rotary tables are buffers outside the state dict
        parent, _, attr = name.rpartition(".")
        get_path(sliced, parent)._buffers[attr] = buf
    sliced.generation_config = model.generation_config
    return sliced.eval()


# -- directories -------------------------------------------------------------------------------
def resolve_settings(settings: dict | None) -> dict:
    """Settings with defaults filled in; unknown keys and bad values refused."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise UserError(f"unknown SliceGPT setting(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_SETTINGS)}")
    s = DEFAULT_SETTINGS | {k: v for k, v in settings.items() if v is not None or k == "calibration_windows"}
    n = s["calibration_windows"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise UserError(f"calibration_windows must be a positive integer or null (all), got {n!r}")
    if not isinstance(s["round_to"], int) or isinstance(s["round_to"], bool) or s["round_to"] < 1:
        raise UserError(f"round_to must be a positive integer (the reference uses 8), got {s['round_to']!r}")
    if not isinstance(s["slice_head"], bool):
        raise UserError(f"slice_head must be true or false, got {s['slice_head']!r}")
    if s["dtype_pca"] != "float64":
        raise UserError(f"dtype_pca is fixed to float64 (PCA in less is inaccurate on large models), "
                        f"got {s['dtype_pca']!r}; leave it out")
    return s


def compress(model_dir: Path, calib_dir: Path, out_dir: Path, *, ratio: float, settings: dict,
             device: str = "cpu") -> dict:
    """Slice a prepared model to remove about `ratio` of all its parameters; write `out_dir`.

    Reads the model in fp32 and the calibration windows of `calib_dir`, writes a directory
    (safetensors, config.json with the `slicegpt` record and auto_map, modeling_slicegpt.py,
    tokenizer, generation_config, manifest.json) atomically, and returns its manifest.
    """
    from safetensors.torch import save_file

    from ..data.calibration import load_calibration
    from ..model_dir import load_model_dir, read_manifest, write_manifest
    from ..artifacts import atomic_dir
    from ..export.model_card import ModelCard, calibration_facts, source_facts, write_model_card

    s = resolve_settings(settings)
    model_dir, calib_dir, out = Path(model_dir), Path(calib_dir), Path(out_dir)
    if out.resolve() == model_dir.resolve():
        raise UserError(f"output {out} is the source model directory; write the sliced model elsewhere")
    manifest = read_manifest(model_dir)
    check_supported(manifest["model_type"])
    calib = load_calibration(calib_dir)
    windows = calib.windows[: s["calibration_windows"]] if s["calibration_windows"] else calib.windows

    model, tok, _ = load_model_dir(model_dir, dtype="fp32", device=device)
    config = model.config
    width = sliced_width(config, ratio, round_to=s["round_to"], slice_head=s["slice_head"])
    params_dense = sum(p.numel() for p in model.parameters())
    config_cls, model_cls = _base_classes(model)
    sliced = slice_model(model, windows, width, slice_head=s["slice_head"])
    del model
    params_pruned = sum(p.numel() for p in sliced.parameters())
    expected = parameter_count(sliced.config, width, slice_head=s["slice_head"])
    if params_pruned != expected:
        raise AssertionError(f"sliced model has {params_pruned} parameters, the formula says {expected}")
    record = {
        "method": "slicegpt",
        "ratio": 1 - params_pruned / params_dense,
        "target_ratio": ratio,
        "slicing": 1 - width / config.hidden_size,
        "hidden_size": config.hidden_size,
        "sliced_size": width,
        "head_size": sliced.config.slicegpt["head_size"],
        "params_dense": params_dense,
        "params_pruned": params_pruned,
        "source_model": str(model_dir),
        "source_hash": manifest["content_hash"],
        "calibration": str(calib_dir),
        "calibration_hash": calib.hash,
        "calibration_windows": len(windows),
        "calibration_tokens": int(sum(len(w) for w in windows)),
        "settings": s,
    }
    with atomic_dir(out) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sliced.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        sliced.config.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(modeling_source(config_cls, model_cls), encoding="utf-8")
        sliced.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        reloaded = load_sliced(tmp)
        if sum(p.numel() for p in reloaded.parameters()) != params_pruned:
            raise AssertionError("the written sliced model does not reload with the same parameter count")
        write_model_card(tmp, ModelCard(
            **source_facts(model_dir, manifest), method="slicegpt", params_before=params_dense,
            params_after=params_pruned, layout="slicegpt",
            calibration=calibration_facts(calib_dir, calib.hash, windows=len(windows)),
            details=[f"Residual stream width {config.hidden_size} → {width} in every layer "
                     f"({100 * record['slicing']:.2f}% sliced away, a multiple of {s['round_to']}); the layer count "
                     "is unchanged.",
                     "LM head " + ("sliced too." if s["slice_head"] else "kept at full width (the last layer's MLP "
                                                                          "writes the full width)."),
                     f"Target: {100 * ratio:.2f}% of all parameters; reached {100 * record['ratio']:.2f}%."]))
        # its own modeling file is what loads it (config.json's auto_map), hence trust_remote_code
        written = write_manifest(tmp, sliced, source=str(model_dir), dtype="fp32", extra=record, trust_remote_code=True)
    return written
