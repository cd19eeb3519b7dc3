"""The inference-speed benchmark: its JSON, KV-cache accounting, and its timing arithmetic
checked against a clock the test controls."""

from __future__ import annotations

import json

import pytest

from blockpruner.artifacts import read_json
from blockpruner.cli import main
from blockpruner.errors import UserError
from blockpruner.eval import speed
from blockpruner.export import materialize
from blockpruner.steps import write_step

from .test_export import prepared_tiny, step_record

pytestmark = pytest.mark.usefixtures("one_thread")

STATS = {"path", "params", "kv_bytes_per_token", "prefill_s", "gen_mean_s", "gen_median_s", "tokens_per_s",
         "peak_mem_bytes", "peak_mem_kind"}


def show(r: dict) -> None:
    for role in ("baseline", "model"):
        if r[role]:
            print(f"\n{role}: " + json.dumps({k: r[role][k] for k in sorted(STATS - {"path"})}))
    print(f"speedup {r['speedup']}, KV cache reduction {r['kv_cache_reduction']}, device {r['device']}")


@pytest.fixture(scope="module")
def pruned_llama(tmp_path_factory):
    """Tiny Llama, 4 layers, minus attn.1 and mlp.2: one attention block of four gone."""
    root = tmp_path_factory.mktemp("speed")
    prep, model = prepared_tiny(root, "llama", layers=4)
    rec = step_record(model, prep, ["attn.1", "mlp.2"])
    write_step(root / "step_2.json", rec)
    materialize.materialize(prep, root / "step_2.json", root / "pruned")
    return prep, root / "pruned", rec


def test_cli_speed_json(tmp_path, pruned_llama):
    prep, pruned, rec = pruned_llama
    out = tmp_path / "speed.json"
    assert main(["speed", "--model", str(pruned), "--baseline", str(prep), "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "2", "--warmup", "1", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    r = read_json(out, speed.FORMAT)
    show(r)
    assert set(r) >= {"model", "baseline", "speedup", "kv_cache_reduction", "settings", "device"}
    for role in ("model", "baseline"):
        assert set(r[role]) >= STATS
        assert r[role]["gen_mean_s"] > 0 and r[role]["prefill_s"] > 0 and r[role]["peak_mem_bytes"] >= 0
        assert len(r[role]["gen_s"]) == 2
    assert r["model"]["path"] == str(pruned) and r["baseline"]["path"] == str(prep)
    assert r["model"]["params"] == rec["params"]["remaining"] and r["baseline"]["params"] == rec["params"]["total"]
    # 3 of 4 attention blocks remain, all with the same KV width: the cache shrinks by exactly 1/4
    assert (r["model"]["kv_cache_layers"], r["baseline"]["kv_cache_layers"]) == (3, 4)
    assert r["kv_cache_reduction"] == pytest.approx(0.25)
    # 2 KV heads x 8 dims x (K and V) x 4 bytes per attention layer and token
    assert r["baseline"]["kv_bytes_per_token"] == 4 * 2 * 2 * 8 * 4
    assert r["settings"] | {"prompt_tokens": 8, "new_tokens": 4, "repeats": 2, "warmup": 1} == r["settings"]
    assert r["settings"]["timer"] == "perf_counter" and r["model"]["peak_mem_kind"].startswith("cpu_rss")


class FakeClock:
    """Stands in for `time` inside blockpruner.eval.speed: it advances only when a model's
    forward runs, by a cost per forward the test chooses."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_timings_and_speedup_follow_a_controlled_clock(pruned_llama, monkeypatch):
    """On the fake clock a forward of the dense model costs 0.5 s and of the pruned one 0.125 s;
    the dense model's 5th generate call (its 3rd timed one, after 2 warm-up calls) runs 4x slower.
    Greedy decoding of 4 tokens is 4 forwards (the prompt, then 3 single tokens) and a prefill 1,
    so every figure is known before anything runs: dense generations 2, 2 and 8 s (mean 4,
    median 2), pruned 0.5 s each, and the speed-up of the means 8 (medians would give 4)."""
    prep, pruned, _ = pruned_llama
    clock = FakeClock()
    cost = {str(prep): 0.5, str(pruned): 0.125}
    slow_call = {str(prep): 5}
    forwards = {str(prep): 0, str(pruned): 0}
    load = speed.load_model_dir

    def load_with_clock(path, device, tokenizer):
        model, _, manifest = load(path, device=device, tokenizer=tokenizer)
        path, state = str(path), {"calls": 0, "factor": 1.0}

        def tick(module, args):
            clock.now += cost[path] * state["factor"]
            forwards[path] += 1

        def generate(*args, **kwargs):
            state["calls"] += 1
            state["factor"] = 4.0 if state["calls"] == slow_call.get(path) else 1.0
            try:
                return model_generate(*args, **kwargs)
            finally:
                state["factor"] = 1.0

        model.register_forward_pre_hook(tick)
        model_generate, model.generate = model.generate, generate
        return model, None, manifest

    monkeypatch.setattr(speed, "time", clock)
    monkeypatch.setattr(speed, "load_model_dir", load_with_clock)
    r = speed.measure(pruned, prep, prompt_tokens=8, new_tokens=4, repeats=3, warmup=2, device="cpu", threads=1)
    # per model: 2 warm-up generations, 3 timed prefills, 3 timed generations, 1 memory run
    assert forwards == {str(prep): 2 * 4 + 3 + 3 * 4 + 4, str(pruned): 2 * 4 + 3 + 3 * 4 + 4}
    b, m = r["baseline"], r["model"]
    assert b["gen_s"] == pytest.approx([2.0, 2.0, 8.0]) and m["gen_s"] == pytest.approx([0.5, 0.5, 0.5])
    assert (b["gen_mean_s"], b["gen_median_s"], b["gen_min_s"]) == pytest.approx((4.0, 2.0, 2.0))
    assert (m["gen_mean_s"], m["gen_median_s"]) == pytest.approx((0.5, 0.5))
    assert (b["prefill_s"], m["prefill_s"]) == pytest.approx((0.5, 0.125))
    assert (b["tokens_per_s"], m["tokens_per_s"]) == pytest.approx((1.0, 8.0))  # 4 tokens / mean generation time
    assert r["speedup"] == pytest.approx(8.0)


def test_without_baseline(pruned_llama):
    _, pruned, _ = pruned_llama
    r = speed.measure(pruned, prompt_tokens=4, new_tokens=2, repeats=1, warmup=0, device="cpu")
    assert r["baseline"] is None and r["speedup"] is None and r["kv_cache_reduction"] is None
    assert r["model"]["kv_cache_layers"] == 3


@pytest.mark.parametrize("kwargs, match", [({"repeats": 0}, "repeats"), ({"new_tokens": 0}, "new_tokens"),
                                           ({"baseline_dir": "/nonexistent"}, "no config.json")])
def test_bad_arguments(pruned_llama, kwargs, match):
    _, pruned, _ = pruned_llama
    with pytest.raises(UserError, match=match):
        speed.measure(pruned, **kwargs)


@pytest.mark.gemma
def test_gemma_speed(gemma_dir, tmp_path):
    """Gemma 3 270M minus 5 blocks (3 attention) vs dense, a few tokens on this machine."""
    from blockpruner.model_dir import load_model_dir

    model, _, _ = load_model_dir(gemma_dir)
    rec = step_record(model, gemma_dir, ["attn.0", "mlp.5", "attn.5", "attn.9", "mlp.12"])
    del model
    write_step(tmp_path / "step_5.json", rec)
    materialize.materialize(gemma_dir, tmp_path / "step_5.json", tmp_path / "pruned")
    r = speed.measure(tmp_path / "pruned", gemma_dir, prompt_tokens=32, new_tokens=16, repeats=3, warmup=1, device="cpu")
    show(r)
    assert r["kv_cache_reduction"] == pytest.approx(3 / 18)
    assert r["model"]["params"] == rec["params"]["remaining"]
