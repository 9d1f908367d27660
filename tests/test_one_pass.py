"""One forward pass feeds every per-layer analysis of the same prompts (capture.run_listeners).

The report's stored capture, the memory module's write-vs-read projections (with the heads'
current-token attention) and the streamed statistics are listeners; run together they must give
what each gives alone, and the lesson's main job must run the model over its prompts once.
"""
from __future__ import annotations

import pytest
import torch

from residual_bandwidth import (ErasureMeter, LayerStreamer, ResidualRecorder, ResidualRun, capture_residuals,
                                run_listeners, stream_layer_statistics)
from residual_bandwidth.compression import compression_curve
from residual_bandwidth.validation import BandwidthInputError

from conftest import PROMPTS

LAYERS = [0, 7, 29]


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_three_listeners_in_one_pass_equal_three_separate_passes(embedded):
    model, tok = embedded.model, embedded.tokenizer
    rec = ResidualRecorder(model, tok, ["resid_pre", "resid_post"], LAYERS)
    meter = ErasureMeter(model, LAYERS, attention=True)
    streamer = LayerStreamer(model, "resid_post", LAYERS)
    calls, head = [], []
    counter = model.base_model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    head_hook = model.lm_head.register_forward_hook(lambda *a: head.append(1))
    try:
        run_listeners(model, tok, PROMPTS, [rec, meter, streamer], batch_size=4)
    finally:
        counter.remove()
        head_hook.remove()
    assert len(calls) == 1, "four prompts in one batch: the three analyses must share one forward pass"
    assert not head, "no listener reads the logits: the language-model head must not run"
    assert model.config._attn_implementation == "sdpa", "eager attention must be switched back"
    assert _no_hooks(model)

    shared_cap, shared_er = rec.capture(PROMPTS), meter.report()
    alone_cap = capture_residuals(model, tok, PROMPTS, kinds=["resid_pre", "resid_post"], layers=LAYERS,
                                  batch_size=4, progress=False)
    alone_er = ResidualRun(model, tok, PROMPTS, LAYERS, kinds=["resid_post"], batch_size=4).erasure
    alone_st = stream_layer_statistics(model, tok, PROMPTS, layers=LAYERS, batch_size=4)
    # the shared pass ran with eager attention (the meter needs probabilities), the lone capture with
    # SDPA: the same residuals up to kernel round-off
    for key, x in alone_cap.acts.items():
        rel = (shared_cap.acts[key] - x).norm(dim=1) / x.norm(dim=1)
        assert float(rel.max()) < 1e-5, key
    assert shared_cap.tokens == alone_cap.tokens
    for field in ("attn", "mlp", "heads", "neurons", "current_attention"):
        torch.testing.assert_close(getattr(shared_er, field), getattr(alone_er, field), rtol=1e-4, atol=1e-6)
    for L in LAYERS:
        a, b = streamer.out.all_rows[L], alone_st.all_rows[L]
        assert a.n == b.n
        assert a.variance_threshold_rank(0.95) == b.variance_threshold_rank(0.95)


def test_a_listener_that_needs_the_head_gets_it(tiny_gpt2):
    model, tok = tiny_gpt2

    class Logits(ResidualRecorder):
        needs_head = True

    seen = []
    h = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        run_listeners(model, tok, ["one two three"], [Logits(model, tok, ["resid_post"], [0])])
        run_listeners(model, tok, ["one two three"], [ResidualRecorder(model, tok, ["resid_post"], [0])])
    finally:
        h.remove()
    assert len(seen) == 1 and seen[0][-1] == model.config.vocab_size


def test_a_failing_listener_leaves_no_hooks_and_restores_attention(embedded):
    model, tok = embedded.model, embedded.tokenizer

    class Broken(ErasureMeter):
        def batch(self, start, enc, mask):
            raise RuntimeError("listener failed")

    with pytest.raises(RuntimeError, match="listener failed"):
        run_listeners(model, tok, PROMPTS[:1], [ResidualRecorder(model, tok, ["resid_post"], [0]),
                                                Broken(model, [0], attention=True)])
    assert _no_hooks(model) and model.config._attn_implementation == "sdpa"


def test_run_listeners_names_bad_arguments(embedded):
    model, tok = embedded.model, embedded.tokenizer
    with pytest.raises(BandwidthInputError, match="listeners"):
        run_listeners(model, tok, PROMPTS, [])
    with pytest.raises(BandwidthInputError, match="batch_size"):
        run_listeners(model, tok, PROMPTS, [ResidualRecorder(model, tok, ["resid_post"], [0])], batch_size=0)
    with pytest.raises(BandwidthInputError, match="tokenizer"):
        ResidualRecorder(model, None, ["resid_post"], [0])


def test_the_main_job_runs_the_model_over_its_prompts_once(embedded, tmp_path):
    """Before the listeners, make lesson ran its prompts twice (capture, then the memory module)."""
    from residual_bandwidth.course.report import DEFAULT_PROMPTS, run_bandwidth_job
    model, tok = embedded.model, embedded.tokenizer
    first = tok(DEFAULT_PROMPTS[0], return_tensors="pt")["input_ids"][0]
    over_job_prompts = []

    def count(m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] == len(DEFAULT_PROMPTS) and \
                torch.equal(ids[0, :len(first)], first):
            over_job_prompts.append(1)
    h = model.base_model.register_forward_pre_hook(count, with_kwargs=True)   # full and base passes
    try:
        rep = run_bandwidth_job(loaded=embedded, out_dir=tmp_path, progress=False, fast=True, figures=False)
    finally:
        h.remove()
    assert len(over_job_prompts) == 1
    assert rep["analytics"]["memory"]["ranking"], "the memory module used the shared pass's evidence"


def _count_passes(model):
    """Forward passes of the transformer body (full and base-model passes both go through it)."""
    calls = []
    return calls, model.base_model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)


def test_a_run_runs_its_prompts_once_and_extracts_each_layers_weights_once(embedded, monkeypatch):
    """Every analysis of a ResidualRun reads its one pass and its one weight extraction."""
    import residual_bandwidth.run as run_module
    model, tok = embedded.model, embedded.tokenizer
    extracted = []
    real = run_module.layer_weights
    monkeypatch.setattr(run_module, "layer_weights", lambda m, L: extracted.append(L) or real(m, L))
    run = ResidualRun(model, tok, PROMPTS, layers=LAYERS, kinds=["resid_pre", "resid_post"])
    calls, h = _count_passes(model)
    try:
        mem, rep, bn = run.memory(), run.report(), run.bottlenecks()
        comp = run.composition("K", [0, 7])
        assert run.memory() is mem and run.report() is rep and run.composition("K", [0, 7]) is comp
    finally:
        h.remove()
    assert len(calls) == 1, "four prompts, batch size 8: the capture and the erasure share one forward pass"
    assert sorted(extracted) == LAYERS, "each layer's weights extracted once, for the meter, memory and composition"
    assert mem.energy_loss and rep.layers == LAYERS and bn.layers == LAYERS
    # the same evidence as measuring each part on its own
    alone = ResidualRun(model, tok, PROMPTS, LAYERS, kinds=["resid_post"]).erasure
    torch.testing.assert_close(mem.erasure.heads, alone.heads, rtol=1e-4, atol=1e-6)
    separate = ResidualRun(model, tok, PROMPTS, layers=LAYERS, kinds=["resid_pre", "resid_post"], erasure=False)
    separate.capture
    assert separate._erasure is None, "erasure=False: the capture pass does not measure the erasure"
    assert [r["component"] for r in separate.memory().ranking] == [r["component"] for r in mem.ranking]
    weights_only = ResidualRun(model, layers=[0]).memory()
    assert weights_only.erasure is None and weights_only.notes == ["no prompts: head scores use the OV eigenvalues only"]
    with pytest.raises(BandwidthInputError, match="this run has none"):
        ResidualRun(model, layers=[0]).capture
    with pytest.raises(BandwidthInputError, match="kinds"):
        ResidualRun(model, tok, PROMPTS, kinds=["resid_middle"])


def test_compression_fit_reads_the_runs_capture(embedded):
    model, tok = embedded.model, embedded.tokenizer
    calibration, heldout = PROMPTS[:3], PROMPTS[3:]
    args = dict(layers=[12], ks=[64, 576], n_random=0, heldout_prompts=heldout, progress=False)
    fresh = compression_curve(ResidualRun(model, tok, calibration, erasure=False), **args)
    run = ResidualRun(model, tok, calibration, kinds=["resid_post"], layers=[12], erasure=False)
    run.capture
    calls, h = _count_passes(model)
    try:
        shared = run.compression(**args)
    finally:
        h.remove()
    assert len(calls) == 1 + 2, "held-out prompts in one batch: the baseline and two projections, no calibration pass"
    assert shared.rows == fresh.rows and shared.n_calibration_tokens == fresh.n_calibration_tokens
    assert run.compression(**args) is shared
    pre_only = ResidualRun(model, tok, calibration, kinds=["resid_pre"], layers=[12], erasure=False)
    with pytest.raises(BandwidthInputError, match="resid_post was not captured"):
        pre_only.compression(**args)


def test_a_sub_run_reads_its_parents_rows(embedded, monkeypatch):
    """run.of_prompts(some) is a run of those prompts whose capture is the parent's rows (no pass): in the
    order asked for, numbered from 0, equal to those prompts captured on their own (float tolerance:
    the parent ran them in another batch), and sharing the parent's extracted weights."""
    import residual_bandwidth.run as run_module
    model, tok = embedded.model, embedded.tokenizer
    parent = ResidualRun(model, tok, PROMPTS, layers=LAYERS, kinds=["resid_post"], erasure=False)
    parent.capture
    parent.weights_of([7])
    alone = capture_residuals(model, tok, [PROMPTS[2], PROMPTS[0]], kinds=["resid_post"], layers=LAYERS,
                              progress=False)
    monkeypatch.setattr(run_module, "run_listeners", lambda *a, **k: pytest.fail("the sub-run ran the model"))
    sub = parent.of_prompts([PROMPTS[2], PROMPTS[0]])
    cap = sub.capture
    assert sub.prompts == cap.prompts == [PROMPTS[2], PROMPTS[0]]
    assert cap.tokens == alone.tokens and torch.equal(cap.prompt_index, alone.prompt_index)
    assert torch.equal(cap.position, alone.position)
    for L in LAYERS:
        torch.testing.assert_close(cap.get("resid_post", L), alone.get("resid_post", L), rtol=1e-4, atol=1e-4)
    assert sub.weights_of([7])[0] is parent.weights_of([7])[0]
    with pytest.raises(BandwidthInputError, match="not among this run's"):
        parent.of_prompts(["a prompt the parent never saw"])
    with pytest.raises(BandwidthInputError, match="prompt index"):
        parent.capture.of_prompts([True])
