"""Paper-parity numerics (official-bf16) against the official code's loss written out here:
bf16 weights, the model's own logits, CrossEntropyLoss(ignore_index=pad_token_id) when the pad
id is truthy, the mean over each window's counted labels, exp of the mean over windows."""

from __future__ import annotations

import pytest
import torch

from blockpruner.blocks import PrunableModel
from blockpruner.errors import UserError
from blockpruner.eval.wikitext import perplexity
from blockpruner.numerics import Numerics
from blockpruner.search.greedy import StepSettings, search_step

from .conftest import tiny_model

PAD = 5  # a truthy pad id that also occurs as a label: the quirk's case


def bf16_model(arch="llama", pad_token_id=PAD, seed=0):
    return tiny_model(arch, seed=seed, num_hidden_layers=3, pad_token_id=pad_token_id).to(torch.bfloat16)


def windows(n=3, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    wins = [torch.randint(3, 96, (t,), generator=g) for _ in range(n)]
    for i, w in enumerate(wins):  # a different number of pad labels in each window
        w[1 : 2 + 3 * i : 2] = PAD
    return wins


def official_ppl(model, wins, pad_token_id):
    """utils.evaluate_ppl of MrGGLS/BlockPruner, batch 1, on the model's own forward."""
    if pad_token_id:
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=pad_token_id)
    else:
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    nlls = []
    with torch.no_grad():
        for w in wins:
            batch = w[None]
            logits = model(input_ids=batch).logits[:, :-1, :].float()
            labels = batch[:, 1:]
            nll = loss_fn(logits.permute(0, 2, 1), labels).float()
            mask = labels != loss_fn.ignore_index
            nlls.append((nll * mask).sum(dim=1) / mask.sum(dim=1))
    return torch.exp(torch.cat(nlls).mean()).item()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("pad", [PAD, 0])
def test_parity_perplexity_equals_the_official_loss(arch, pad):
    model = bf16_model(arch, pad)
    wins = windows()
    pm = Numerics("official-bf16").apply(PrunableModel.wrap(model))
    assert pm.ignore_index == (PAD if pad else None)  # 0 is falsy: the official loss ignores nothing
    got = perplexity(pm, wins, progress=False)["ppl"]
    assert got == pytest.approx(official_ppl(model, wins, pad), rel=1e-6)
    # the safe mode counts every label: a different figure when pad labels occur
    plain = perplexity(Numerics("fp32").apply(PrunableModel.wrap(model)), wins, progress=False)["ppl"]
    assert (plain != pytest.approx(got, rel=1e-4)) if pad else plain == pytest.approx(got, rel=1e-6)


def test_parity_step_chooses_the_official_best_and_records_it():
    model = bf16_model(seed=2)
    wins = windows(seed=1)
    pm = Numerics("official-bf16").apply(PrunableModel.wrap(model))
    official = {}
    for block in pm.names:
        pm.set_removed([block])
        official[block] = official_ppl(model, wins, PAD)
    pm.set_removed([])
    settings = StepSettings(numerics="official-bf16", head_bound_columns=8)  # 8 of 96 columns: usable in fp32
    rec = search_step(pm, wins, 1, [], settings, inputs={}, progress=False)
    assert rec["settings"]["numerics"] == "official-bf16"
    assert rec["removed_block"] == min(official, key=lambda b: (official[b], pm.names.index(b)))
    assert rec["ppl"] == pytest.approx(official[rec["removed_block"]], rel=1e-6)
    assert rec["cost"]["bound_columns"] == 0  # the head bound bounds plain sums: off here ...
    fp32 = search_step(PrunableModel.wrap(model), wins, 1, [], StepSettings(head_bound_columns=8), inputs={},
                       progress=False)
    assert fp32["cost"]["bound_columns"] > 0  # ... and on in the safe mode


def test_unknown_numerics_is_refused():
    with pytest.raises(UserError, match="official-bf16"):
        StepSettings(numerics="bf16").validate()
