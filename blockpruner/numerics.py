"""How a study computes: the safe fp32 default, or the official code's bf16 (paper parity).

`fp32`: weights as prepared (fp32 unless the model's `dtype` says otherwise), token NLLs from
a log-softmax in fp32, a candidate's score = its summed NLL over every predicted token.

`official-bf16` reproduces MrGGLS/BlockPruner's `utils.evaluate_ppl`, which both its search
and its evaluation use:
- weights in bf16, so every block and the LM head compute in bf16 and the logits are
  bf16-rounded; the cross-entropy then runs on those logits up-cast to fp32 (as the
  transformers releases of the time did for Llama and Qwen2 inside `forward`);
- labels equal to the model's `pad_token_id` are ignored when that id is truthy (0 and None
  ignore nothing), a quirk of `CrossEntropyLoss(ignore_index=pad_token_id)`;
- each window's NLL is the mean over its counted labels, and the perplexity is
  exp(mean over windows of those means), so a candidate's score is the sum of window means.
Both go through `scoring.head_nll` (pm.ignore_index), the one place NLLs are taken. Where
labels are ignored, the LM-head bound is off (it bounds unweighted sums); with nothing to
ignore (pad id 0 or None) the sums are the plain ones and the bound stays on.
The official search batches 2 windows per forward; here the batch is `--window-batch` (1 on a
CPU, 8 on a GPU by default; 2 matches the official search's shapes). On a GPU a bf16 matmul
may round differently with the batch shape, so a tie within bf16 rounding can break
differently from the official run.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

NUMERICS = ("fp32", "official-bf16")


@dataclass(frozen=True)
class Numerics:
    name: str = "fp32"

    def __post_init__(self):
        if self.name not in NUMERICS:
            raise UserError(f"unknown numerics {self.name!r}; use one of: {', '.join(NUMERICS)}")

    @property
    def official(self) -> bool:
        return self.name == "official-bf16"

    @property
    def dtype(self) -> str | None:
        """Weights dtype to load the model in (None: as prepared)."""
        return "bf16" if self.official else None

    def ignore_index(self, config) -> int | None:
        """The label id the loss skips: the pad id when truthy, in parity mode only."""
        pad = getattr(config, "pad_token_id", None)
        return int(pad) if self.official and pad else None

    def load_dtype(self, dtype: str | None) -> str | None:
        """The dtype to load weights in: an explicit --dtype wins, else the mode's."""
        return dtype or self.dtype

    def apply(self, pm):
        """Set the wrapped model's loss as this mode computes it; returns pm."""
        pm.ignore_index = self.ignore_index(pm.model.config)
        return pm
