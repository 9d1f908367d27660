"""One forward pass feeds every per-layer analysis of the same prompts (capture.run_listeners).

The report's stored capture, the memory module's write-vs-read projections (with the heads'
current-token attention) and the streamed statistics are listeners; run together they must give
what each gives alone, and the lesson's main job must run the model over its prompts once.
"""
from __future__ import annotations

import pytest
import torch

from residual_bandwidth import (ErasureMeter, LayerStreamer, ResidualRecorder, capture_residuals,
                                erasure_from_activations, memory_management, run_listeners,
                                stream_layer_statistics)
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
    alone_er = erasure_from_activations(model, tok, PROMPTS, LAYERS, batch_size=4, progress=False,
                                        attention=True)
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


def test_memory_management_takes_a_shared_erasure_and_checks_it(embedded):
    model, tok = embedded.model, embedded.tokenizer
    meter = ErasureMeter(model, LAYERS, attention=True)
    run_listeners(model, tok, PROMPTS, [meter])
    er = meter.report()
    shared = memory_management(model, tok, PROMPTS, layers=LAYERS, erasure=er, progress=False)
    alone = memory_management(model, tok, PROMPTS, layers=LAYERS, progress=False)
    assert [(r["component"], r["kind"]) for r in shared.ranking] == [(r["component"], r["kind"]) for r in alone.ranking]
    with pytest.raises(BandwidthInputError, match="erasure: expected an ErasureReport measured at layers"):
        memory_management(model, tok, PROMPTS, layers=[0, 7], erasure=er)
    from residual_bandwidth import all_layer_weights
    given = memory_management(model, tok, PROMPTS, layers=LAYERS, erasure=er,
                              weights=all_layer_weights(model, LAYERS))
    assert given.ranking == shared.ranking
    with pytest.raises(BandwidthInputError, match="weights: expected the LayerWeights of layers"):
        memory_management(model, tok, PROMPTS, layers=LAYERS, erasure=er, weights=all_layer_weights(model, [0, 7, 28]))
    no_attention = ErasureMeter(model, LAYERS)
    run_listeners(model, tok, PROMPTS, [no_attention])
    with pytest.raises(BandwidthInputError, match="without attention=True"):
        memory_management(model, tok, PROMPTS, layers=LAYERS, erasure=no_attention.report())


def test_compression_fit_reads_the_callers_capture(embedded):
    model, tok = embedded.model, embedded.tokenizer
    calibration, heldout = PROMPTS[:3], PROMPTS[3:]
    args = dict(layers=[12], ks=[64, 576], n_random=0, calibration_prompts=calibration,
                heldout_prompts=heldout, progress=False)
    cap = capture_residuals(model, tok, calibration, kinds=["resid_post"], progress=False)
    fit_here = compression_curve(model, tok, **args)
    fit_shared = compression_curve(model, tok, **args, states=cap)
    assert fit_shared.rows == fit_here.rows
    assert fit_shared.n_calibration_tokens == fit_here.n_calibration_tokens
    with pytest.raises(BandwidthInputError, match="other prompts than the 3 calibration prompts"):
        compression_curve(model, tok, **{**args, "calibration_prompts": PROMPTS[:2] + PROMPTS[3:4]}, states=cap)
    pre_only = capture_residuals(model, tok, calibration, kinds=["resid_pre"], layers=[12], progress=False)
    with pytest.raises(BandwidthInputError, match="resid_post was not captured"):
        compression_curve(model, tok, **args, states=pre_only)
