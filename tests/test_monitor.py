"""The production bandwidth monitor: hooks, streaming statistics, alerts, bad input, threads, Prometheus."""
from __future__ import annotations

import gc
import io
import logging
import json
import math
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from residual_bandwidth import capture_residuals
from residual_bandwidth.metrics import compute_metrics
from residual_bandwidth.compat import ProductionBandwidthMonitor
from residual_bandwidth.monitor import (DEFAULT_THRESHOLDS, AlertPolicy, BandwidthMonitor, JsonLinesLog,
                                        MonitorConfig, default_layers)
from residual_bandwidth.validation import BandwidthInputError

PROMPTS = [
    "The cat sat on the mat.",
    "Residual streams carry information between layers.",
    "A short one",
    "def f(x):\n    return x + 1",
    "Numbers: 1, 2, 3, 4, 5, 6, 7",
    "Paris is the capital of France and Rome is the capital of Italy.",
    "Hello",
    "The quick brown fox jumps over the lazy dog again and again.",
]


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def scatter(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=0)
    return xc.T @ xc


def const_norm_rows(c: float, n: int = 8, d: int = 8) -> torch.Tensor:
    """``n`` orthogonal rows of norm exactly ``c`` (c times a basis vector)."""
    x = torch.zeros(n, d, dtype=torch.float64)
    x[torch.arange(n), torch.arange(n) % d] = c
    return x


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny(tiny_gpt2):
    return tiny_gpt2


# --------------------------------------------------------------------------------------------
# Hooks: output untouched, nothing left behind
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_logits_bit_identical_with_and_without_monitor_llama(embedded):
    model, tok = embedded.model, embedded.tokenizer
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    plain = model(**enc).logits
    with BandwidthMonitor(model, layers="all", config=MonitorConfig(max_positions=None)) as mon:
        watched = model(**enc).logits
    assert torch.equal(plain, watched)
    assert mon.totals()["requests_ok"] == 1
    assert mon.totals()["tokens"][0] == int(enc["attention_mask"].sum())


@torch.no_grad()
def test_logits_bit_identical_gpt2_and_generation_unchanged(tiny):
    model, tok = tiny
    enc = tok(PROMPTS[:4], return_tensors="pt", padding=True)
    plain = model(**enc).logits
    gen_plain = model.generate(**tok(["The cat"], return_tensors="pt"), max_new_tokens=4, do_sample=False,
                               pad_token_id=tok.pad_token_id)
    with BandwidthMonitor(model, layers="all") as mon:
        watched = model(**enc).logits
        gen_watched = model.generate(**tok(["The cat"], return_tensors="pt"), max_new_tokens=4,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(plain, watched)
    assert torch.equal(gen_plain, gen_watched)
    assert mon.totals()["requests_bad"] == 0 and mon.totals()["requests"] >= 5


def test_detach_leaves_no_hooks_also_after_an_exception(tiny):
    model, tok = tiny
    base = n_hooks(model)
    mon = BandwidthMonitor(model, layers=[0, 2], kind="resid_post")
    mon.attach()
    assert n_hooks(model) == base + 4  # model pre + post, two layers
    with pytest.raises(BandwidthInputError):
        mon.attach()  # no double registration
    mon.detach()
    mon.detach()  # idempotent
    assert n_hooks(model) == base and not mon.attached

    with pytest.raises(RuntimeError, match="boom"):
        with BandwidthMonitor(model, layers="all", kind="resid_mid") as m2:
            assert n_hooks(model) > base
            raise RuntimeError("boom")
    assert n_hooks(model) == base and not m2.attached

    with torch.no_grad():  # a detached monitor sees nothing
        model(**tok(["hello there"], return_tensors="pt"))
    assert mon.totals()["requests"] == 0


@pytest.mark.parametrize("kind", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
@torch.no_grad()
def test_every_kind_matches_capture_with_padding(tiny, kind):
    """Streaming stats over padded batches == batch computation on capture_residuals' rows."""
    model, tok = tiny
    mon = BandwidthMonitor(model, layers="all", kind=kind, config=MonitorConfig(exclude_massive=False, max_positions=None), alerts=AlertPolicy({}))
    with mon:
        for i in range(0, len(PROMPTS), 3):  # right-padded batches of different lengths
            model(**tok(PROMPTS[i:i + 3], return_tensors="pt", padding=True))
    cap = capture_residuals(model, tok, PROMPTS, kinds=[kind], batch_size=3, progress=False)
    for L in range(3):
        ref = cap.get(kind, L).double().numpy()
        s = mon.traffic(L)
        assert s.n == len(ref) == mon.totals()["tokens"][L]
        np.testing.assert_allclose(s.mean.numpy(), ref.mean(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(s.scatter.numpy(), scatter(ref), rtol=1e-8, atol=1e-8 * np.abs(scatter(ref)).max())
    assert all(r.masked for r in mon.history)


@torch.no_grad()
def test_llama_layers_match_capture(embedded):
    model, tok = embedded.model, embedded.tokenizer
    with BandwidthMonitor(model, layers=[3, 15], config=MonitorConfig(exclude_massive=False, max_positions=None)) as mon:
        model(**tok(PROMPTS[:4], return_tensors="pt", padding=True))
    cap = capture_residuals(model, tok, PROMPTS[:4], kinds=["resid_post"], layers=[3, 15], batch_size=4,
                            progress=False)
    for L in (3, 15):
        ref = cap.get("resid_post", L).double().numpy()
        s = mon.traffic(L)
        np.testing.assert_allclose(s.mean.numpy(), ref.mean(0), rtol=1e-9)
        np.testing.assert_allclose(s.eigenvalues(), compute_metrics(ref).eigenvalues, rtol=1e-6,
                                   atol=1e-9 * s.eigenvalues()[0])
    # SmolLM2's first-token sink is found and attributed to the first token of each prompt
    rec = mon.history[-1].layers[15]
    assert rec.massive_count == rec.massive_first == 4 and rec.massive_other_fraction == 0.0


@torch.no_grad()
def test_left_padded_generation_uses_the_last_mask_columns(tiny):
    model, tok = tiny
    enc = tok(["The cat sat on the mat", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    with BandwidthMonitor(model, layers=[1]) as mon:
        model.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    hist = mon.history
    assert len(hist) == 3 and all(r.status == "ok" and r.masked for r in hist)
    assert hist[0].n_tokens == int(enc["attention_mask"].sum())  # left padding removed
    assert [r.n_tokens for r in hist[1:]] == [2, 2]  # one new token per sequence per step


def test_first_token_of_each_sequence_from_the_mask(rng):
    """The sink flag follows the mask: first real column with left padding, none in a cached step."""
    d = 16
    mon = BandwidthMonitor(layers=[0], alerts=AlertPolicy({}))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    h = torch.from_numpy(rng.normal(size=(2, 6, d)))
    h[0, 2] *= 100   # first real token of the left-padded sequence
    h[1, 0] *= 100   # first token of the other
    h[1, 4] *= 100   # a loud token that is not first
    rec = mon.observe({0: h}, attention_mask=mask).layers[0]
    assert (rec.n_tokens, rec.massive_count, rec.massive_first) == (10, 3, 2)
    assert rec.massive_other_fraction == 1 / 10
    # a cached decoding step: 1 new token per sequence, the mask covers the past too
    step = torch.from_numpy(rng.normal(size=(2, 1, d)))
    step[0] *= 100
    rec = mon.observe({0: step}, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)).layers[0]
    assert (rec.n_tokens, rec.massive_count, rec.massive_first) == (2, 1, 0)
    assert rec.massive_other_fraction is None     # 2 tokens < min_tokens_for_share: a count, not a rate


def test_a_short_request_with_one_loud_token_raises_no_alert(rng):
    """The finding behind the gate: a 2-token request whose second token is loud read 50 % and went
    critical. Below min_tokens_for_share tokens the fraction is None and the alert state is unchanged;
    at the bar the same share alerts."""
    d = 16
    mon = BandwidthMonitor(layers=[0], config=MonitorConfig(min_tokens_for_share=8))
    short = torch.from_numpy(rng.normal(size=(1, 2, d)))
    short[0, 1] *= 100
    rec = mon.observe({0: short}).layers[0]
    assert rec.massive_count == 1 and rec.massive_other_fraction is None
    assert mon.alert_records() == []
    long = torch.from_numpy(rng.normal(size=(1, 8, d)))
    long[0, 1:5] *= 100                          # 4 of 8 loud, none first: 50 %
    rec = mon.observe({0: long}).layers[0]
    assert rec.massive_other_fraction == 0.5
    assert [(a["metric"], a["level"]) for a in mon.alert_records()] == [("massive_other_fraction", "critical")]
    gauge = "residual_bandwidth_last_massive_other_fraction"

    def last_share():
        return next(s.value for f in text_string_to_metric_families(mon.prometheus_text())
                    for s in f.samples if s.name == gauge)
    assert last_share() == 0.5
    mon.observe({0: short})                      # the gauge says "not measured", not the previous 0.5
    assert math.isnan(last_share())
    with pytest.raises(BandwidthInputError, match="min_tokens_for_share"):
        MonitorConfig(min_tokens_for_share=0)


# --------------------------------------------------------------------------------------------
# Streaming statistics, records and bounded memory (synthetic input through observe())
# --------------------------------------------------------------------------------------------
def test_observe_stream_equals_batch_in_random_chunks(rng):
    d, layers = 12, [0, 5]
    mon = BandwidthMonitor(layers=layers, config=MonitorConfig(exclude_massive=False, max_positions=None), alerts=AlertPolicy({}))
    seen = {L: [] for L in layers}
    for _ in range(120):
        b, t = int(rng.integers(1, 4)), int(rng.integers(1, 9))
        mask = torch.from_numpy(rng.integers(0, 2, size=(b, t))).long()
        mask[:, 0] = 1
        states = {L: torch.from_numpy(rng.normal(size=(b, t, d)) * np.linspace(5, 0.1, d) + L) for L in layers}
        rec = mon.observe(states, attention_mask=mask)
        assert rec.status == "ok" and rec.n_tokens == int(mask.sum())
        for L in layers:
            seen[L].append(states[L][mask.bool()].numpy())
    for L in layers:
        x = np.concatenate(seen[L])
        s = mon.traffic(L)
        assert s.n == len(x)
        np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s.scatter.numpy(), scatter(x), rtol=1e-10, atol=1e-10 * np.abs(scatter(x)).max())
        ref = compute_metrics(x)
        summ = mon.traffic_summary(L)
        assert summ["variance_rank"] == ref.variance_rank
        assert summ["participation_ratio"] == pytest.approx(ref.participation_ratio, rel=1e-9)


def test_per_request_ranks_massive_rows_and_sampling(rng):
    d = 32
    x = rng.normal(size=(40, d))
    mon = BandwidthMonitor(layers=[0], config=MonitorConfig(max_positions=None), alerts=AlertPolicy({}))
    rec = mon.observe({0: torch.from_numpy(x)}).layers[0]
    ref = compute_metrics(x)
    assert rec.variance_rank == ref.variance_rank and rec.rank_rows == 40
    assert rec.participation_ratio == pytest.approx(ref.participation_ratio, rel=1e-9)
    assert rec.stable_rank == pytest.approx(ref.stable_rank, rel=1e-9)
    assert rec.entropy_rank == pytest.approx(ref.entropy_rank, rel=1e-9)
    assert rec.utilization_available == pytest.approx(ref.variance_rank / 32)
    assert rec.utilization_d_model == pytest.approx(ref.variance_rank / d)

    loud = x.copy()
    loud[0] *= 50   # the first token: an attention sink
    loud[7] *= 50   # and one somewhere else
    rec = mon.observe({0: torch.from_numpy(loud)}).layers[0]
    assert (rec.massive_count, rec.massive_first) == (2, 1)
    assert rec.massive_other_fraction == 1 / 40 and rec.rank_rows == 38
    assert mon.traffic(0).n == 40 + 38  # massive rows are left out of the statistics

    a = BandwidthMonitor(layers=[0], config=MonitorConfig(max_positions=16, seed=3), alerts=AlertPolicy({}))
    b = BandwidthMonitor(layers=[0], config=MonitorConfig(max_positions=16, seed=3), alerts=AlertPolicy({}))
    for m in (a, b):
        r = m.observe({0: torch.from_numpy(x)}).layers[0]
        assert r.rank_rows == 16 and r.n_tokens == 40
    assert torch.equal(a.traffic(0).scatter, b.traffic(0).scatter)  # reproducible sample
    assert a.traffic(0).n == 16


def test_short_requests_use_the_typical_traffic_norm():
    """A lone sink token is its own median; the layer's typical norm still exposes it."""
    mon = BandwidthMonitor(layers=[0], alerts=AlertPolicy({}))
    mon.observe({0: const_norm_rows(1.0, n=8)})
    rec = mon.observe({0: const_norm_rows(100.0, n=1)}).layers[0]
    assert rec.massive_count == 1 and rec.max_norm_ratio == pytest.approx(100.0)
    assert mon.totals()["covariance_rows"][0] == 8


def test_memory_bounded_over_10000_requests(caplog):
    caplog.set_level(logging.CRITICAL + 1, logger="residual_bandwidth.monitor")  # pytest keeps records
    d = 8
    mon = BandwidthMonitor(layers=[0, 1], config=MonitorConfig(history_size=100, max_positions=None, min_tokens_for_rank=4), alerts=AlertPolicy(history_size=50))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, d, generator=g, dtype=torch.float64)

    def states(i):
        x = base + 0.01 * i % 1.0
        if i % 50 == 0:
            x = x.clone()
            x[3:6] *= 40.0  # three loud non-first tokens: massive_other_fraction 0.3 -> critical
        return {0: x, 1: x * 2}

    ptrs = None
    for i in range(10_000):
        mon.observe(states(i))
        if i == 1_999:
            gc.collect()
            objects_at_2000 = len(gc.get_objects())
            text_at_2000 = mon.prometheus_text()
            ptrs = [mon._traffic[L].moments.scatter.data_ptr() for L in (0, 1)]
            nbytes = [mon._traffic[L].moments.nbytes for L in (0, 1)]
    gc.collect()
    assert mon.totals()["requests"] == 10_000
    assert len(mon.history) == 100 and mon.history[-1].request == 10_000
    assert len(mon.alert_records()) == 50 and mon.totals()["alerts"] == 2 * 2 * 200  # start + resolve
    assert [mon._traffic[L].moments.scatter.data_ptr() for L in (0, 1)] == ptrs
    assert [mon._traffic[L].moments.nbytes for L in (0, 1)] == nbytes == [8 * (d + d * d + mon.config.covariance_batch_rows * d)] * 2
    assert len(mon.alerts.state) <= len(DEFAULT_THRESHOLDS) * 2 + 1
    assert len(mon.prometheus_text().splitlines()) == len(text_at_2000.splitlines())
    assert len(gc.get_objects()) - objects_at_2000 < 300


# --------------------------------------------------------------------------------------------
# Alerts: exactly at the thresholds, de-duplicated
# --------------------------------------------------------------------------------------------
def _alerts(mon):
    return [(a["request"], a["layer"], a["metric"], a["level"], a["value"], a["threshold"])
            for a in mon.alert_records()]


def test_alerts_fire_exactly_at_thresholds_and_deduplicate():
    just_below = float(np.nextafter(2.0, 0.0))
    mon = BandwidthMonitor(layers=[0], alerts=AlertPolicy({"mean_norm": {"warning": 2.0, "critical": 4.0}}))
    values = [1.0, 2.0, 3.0, 2.0, 4.0, 5.0, 3.0, just_below, 1.0, 4.0, 0.5]
    for v in values:
        rec = mon.observe({0: const_norm_rows(v)})
        assert rec.layers[0].mean_norm == v  # the test really feeds these exact values
    assert _alerts(mon) == [
        (2, 0, "mean_norm", "warning", 2.0, 2.0),      # starts exactly at the threshold
        (5, 0, "mean_norm", "critical", 4.0, 4.0),     # escalates (3.0 and 2.0 in between: silent)
        (7, 0, "mean_norm", "warning", 3.0, 2.0),      # de-escalates (5.0 before: silent)
        (8, 0, "mean_norm", "resolved", just_below, 2.0),  # one ulp below clears
        (10, 0, "mean_norm", "critical", 4.0, 4.0),
        (11, 0, "mean_norm", "resolved", 0.5, 4.0),
    ]
    get = mon.registry.get_sample_value
    assert get("residual_bandwidth_alerts_total", {"layer": "0", "metric": "mean_norm", "level": "critical"}) == 2
    assert get("residual_bandwidth_alerts_total", {"layer": "0", "metric": "mean_norm", "level": "warning"}) == 2
    assert get("residual_bandwidth_alert_level", {"layer": "0", "metric": "mean_norm"}) == 0


def test_below_direction_and_hysteresis():
    mon = BandwidthMonitor(layers=[0], alerts=AlertPolicy({"median_norm": {"warning": 2.0, "critical": 1.0}}))
    assert mon.threshold_directions == {"median_norm": "below"}
    for v in (3.0, 2.0, 1.5, 1.0, 2.5):
        mon.observe({0: const_norm_rows(v)})
    assert [(a[0], a[3], a[5]) for a in _alerts(mon)] == [(2, "warning", 2.0), (4, "critical", 1.0),
                                                           (5, "resolved", 1.0)]
    mon = BandwidthMonitor(layers=[0], alerts=AlertPolicy({"mean_norm": {"warning": 2.0, "critical": None}}, hysteresis=0.125))
    for v in (2.0, 1.875, 1.75, 1.5, 2.0):  # clears only below 2.0 - 0.125 * 2.0 = 1.75
        mon.observe({0: const_norm_rows(v)})
    assert [(a[0], a[3]) for a in _alerts(mon)] == [(1, "warning"), (4, "resolved"), (5, "warning")]


def test_default_massive_threshold_is_exact(rng):
    mon = BandwidthMonitor(layers=[0])
    assert mon.thresholds == DEFAULT_THRESHOLDS
    x = const_norm_rows(1.0, n=20, d=20)
    for k, expect in ((1, []), (2, ["warning"]), (2, []), (5, ["critical"]), (0, ["resolved"])):
        y = x.clone()
        y[1:1 + k] *= 10.0   # k loud tokens, none of them the first
        y[0] *= 10.0         # the first token is loud too: an expected sink, not counted
        before = len(mon.alert_records())
        rec = mon.observe({0: y}).layers[0]
        assert rec.massive_other_fraction == k / 20 and rec.massive_first == 1
        assert [a["level"] for a in mon.alert_records()[before:]] == expect


def test_threshold_validation():
    for bad in ({"nope": {"warning": 1}}, {"mean_norm": {"warning": None, "critical": None}},
                {"mean_norm": {"warning": float("nan")}}, {"mean_norm": {"warn": 1}}, [1]):
        with pytest.raises(BandwidthInputError):
            BandwidthMonitor(alerts=AlertPolicy(bad))
    with pytest.raises(BandwidthInputError):
        BandwidthMonitor(alerts=AlertPolicy(hysteresis=1.5))
    with pytest.raises(BandwidthInputError):
        BandwidthMonitor(kind="logits")


# --------------------------------------------------------------------------------------------
# Bad input: counted, logged, alerted, and serving continues
# --------------------------------------------------------------------------------------------
def test_bad_requests_are_counted_logged_alerted_and_skipped(rng):
    log = io.StringIO()
    mon = BandwidthMonitor(layers=[0, 1], config=MonitorConfig(max_positions=None), alerts=AlertPolicy({}), log=log)
    good = {0: torch.from_numpy(rng.normal(size=(10, 6))), 1: torch.from_numpy(rng.normal(size=(10, 6)))}
    assert mon.observe(good).status == "ok"
    snapshot = mon.traffic(0)
    nan = {0: good[0].clone(), 1: good[1].clone()}
    nan[1][3, 2] = float("nan")
    inf = {0: good[0].clone(), 1: good[1].clone()}
    inf[0][0, 0] = float("inf")
    bad_requests = [
        (nan, "nonfinite"), (inf, "nonfinite"),
        ({0: torch.zeros(0, 6), 1: torch.zeros(0, 6)}, "empty"),
        ({0: good[0][:, :5], 1: good[1][:, :5]}, "d_model"),
        ({0: good[0]}, "missing_layer"),
        ({0: good[0], 1: torch.ones(10, 6, dtype=torch.int64)}, "shape"),
    ]
    for states, reason in bad_requests:
        rec = mon.observe(states)
        assert rec.status == "bad" and reason in rec.reasons and rec.layers == {}
    assert mon.observe(good).status == "ok"  # serving continues

    tot = mon.totals()
    assert tot["requests_bad"] == 6 and tot["requests_ok"] == 2
    assert tot["bad_reasons"] == {"nonfinite": 2, "empty": 1, "d_model": 1, "missing_layer": 1, "shape": 1}
    after = mon.traffic(0)
    assert after.n == snapshot.n + 10  # only the two good requests entered the statistics
    # one alert when the bad streak starts, one when it ends
    assert [(a["request"], a["metric"], a["level"], a["layer"]) for a in mon.alert_records()] == [
        (2, "bad_input", "critical", None), (8, "bad_input", "resolved", None)]
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    events = [(e["event"], e.get("status"), e.get("level")) for e in lines]
    assert events.count(("request", "bad", None)) == 6 and ("alert", None, "critical") in events
    assert any("NaN" in p for e in lines if e["event"] == "request" for p in e["problems"])
    get = mon.registry.get_sample_value
    assert get("residual_bandwidth_bad_requests_total", {"reason": "nonfinite"}) == 2
    assert get("residual_bandwidth_requests_total", {"status": "bad"}) == 6


@torch.no_grad()
def test_bad_input_through_the_live_model(tiny, embedded):
    model, tok = tiny
    enc = tok(["The cat sat", "on the mat"], return_tensors="pt", padding=True)
    mon = BandwidthMonitor(model, layers=[1, 2])
    mon.attach()
    try:
        # NaN injected upstream (by the test, not the monitor): the request is rejected, served anyway
        poison = model.transformer.h[0].register_forward_hook(
            lambda m, a, o: (o[0] * float("nan"),) + tuple(o[1:]) if isinstance(o, tuple) else o * float("nan"))
        try:
            out = model(**enc).logits
        finally:
            poison.remove()
        assert torch.isnan(out).all()
        # an all-zero attention mask: no real token
        model(input_ids=enc["input_ids"], attention_mask=torch.zeros_like(enc["attention_mask"]))
        # the forward pass itself raising (token id out of range)
        with pytest.raises(Exception):
            model(input_ids=torch.tensor([[10 ** 7]]))
        assert torch.equal(model(**enc).logits, model(**enc).logits)  # and serving continues
    finally:
        mon.detach()
    tot = mon.totals()
    assert tot["bad_reasons"] == {"nonfinite": 1, "empty": 1, "forward_error": 1}
    assert tot["requests_ok"] == 2

    # a different model (d_model 32) under a monitor that holds statistics of d_model 64
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    other = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64,
                                       vocab_size=len(embedded.tokenizer))).eval()
    with mon.attach(other):
        other(**enc)
    assert mon.totals()["bad_reasons"]["d_model"] == 1 and mon.traffic(1).d_model == 64


@torch.no_grad()
def test_internal_errors_never_break_the_model(tiny, monkeypatch):
    model, tok = tiny
    enc = tok(["hello world"], return_tensors="pt")
    plain = model(**enc).logits
    mon = BandwidthMonitor(model, layers=[0])

    def broken(*a, **k):
        raise ZeroDivisionError("monitor bug")

    monkeypatch.setattr(mon.measure, "layer_stats", broken)
    with mon:
        assert torch.equal(model(**enc).logits, plain)
    assert mon.totals()["internal_errors"] == 1
    assert mon.registry.get_sample_value("residual_bandwidth_internal_errors_total") == 1


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------
def test_concurrent_threads_give_the_same_totals_as_sequential(tiny):
    model, tok = tiny
    prompts = [f"{p} (variant {i})" for i in range(3) for p in PROMPTS]  # 24 requests
    encs = [tok([p], return_tensors="pt") for p in prompts]

    def new():
        return BandwidthMonitor(model, layers="all", config=MonitorConfig(exclude_massive=False, max_positions=None, history_size=100))

    seq = new()
    with seq, torch.no_grad():
        for e in encs:
            model(**e)

    conc = new()
    n_threads = 4
    barrier = threading.Barrier(n_threads)
    errors = []

    def worker(k):
        try:
            barrier.wait()
            with torch.no_grad():
                for e in encs[k::n_threads]:
                    model(**e)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with conc:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    a, b = seq.totals(), conc.totals()
    for key in ("requests", "requests_ok", "requests_bad", "tokens", "massive_tokens", "covariance_rows"):
        assert a[key] == b[key], key
    for L in range(3):
        s, c = seq.traffic(L), conc.traffic(L)
        np.testing.assert_allclose(c.mean.numpy(), s.mean.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(c.scatter.numpy(), s.scatter.numpy(), rtol=1e-9, atol=1e-9)
    # each request's own record is intact: no thread's activations leaked into another's
    def per_request(mon):
        return sorted((r.n_tokens, round(r.layers[2].mean_norm, 6)) for r in mon.history)
    assert per_request(seq) == per_request(conc)
    assert len({r.thread for r in conc.history}) == n_threads


# --------------------------------------------------------------------------------------------
# Prometheus, JSON lines, contracts, recommendations
# --------------------------------------------------------------------------------------------
def _fill(mon, rng, n=30, d=16):
    for i in range(n):
        x = torch.from_numpy(rng.normal(size=(12, d)) * np.linspace(3, 0.1, d))
        if i == 10:
            x[2:6] *= 30
        mon.observe({0: x, 3: 2 * x})
    mon.observe({0: torch.full((4, d), float("nan")), 3: torch.zeros(4, d)})


def test_prometheus_text_parses_and_matches_the_monitor(rng):
    mon = BandwidthMonitor(layers=[0, 3])
    _fill(mon, rng)
    text = mon.prometheus_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ns = "residual_bandwidth"
    for name in ("requests", "bad_requests", "tokens", "massive_activations", "alerts", "alert_level",
                 "last_participation_ratio", "request_participation_ratio", "processing_seconds",
                 "traffic_variance_rank", "traffic_participation_ratio", "traffic_rows"):
        assert f"{ns}_{name}" in fams, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[(f"{ns}_requests_total", (("status", "ok"),))] == 30
    assert samples[(f"{ns}_requests_total", (("status", "bad"),))] == 1
    for L in (0, 3):
        summ = mon.traffic_summary(L)
        assert samples[(f"{ns}_traffic_variance_rank", (("layer", str(L)),))] == summ["variance_rank"]
        assert samples[(f"{ns}_traffic_participation_ratio", (("layer", str(L)),))] == pytest.approx(
            mon.traffic(L).participation_ratio())
        assert samples[(f"{ns}_tokens_total", (("layer", str(L)),))] == 30 * 12
    assert samples[(f"{ns}_alerts_total", (("layer", "0"), ("level", "critical"), ("metric", "massive_other_fraction")))] == 1
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value(f"{ns}_requests_total", {"status": "ok"}) is None  # private registry


def test_http_server_on_loopback_and_stop(rng):
    mon = BandwidthMonitor(layers=[0], alerts=AlertPolicy({}))
    _fill(mon, rng, n=5)
    port = mon.serve(port=0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        names = {f.name for f in text_string_to_metric_families(body)}
        assert "residual_bandwidth_traffic_rows" in names
        with pytest.raises(BandwidthInputError):
            mon.serve(port=0)
    finally:
        mon.stop_server()
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    mon.stop_server()  # idempotent


def test_jsonl_log_file(tmp_path, rng):
    path = tmp_path / "monitor.jsonl"
    mon = BandwidthMonitor(layers=[0, 3], log=path)
    _fill(mon, rng, n=12)
    mon.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(e["event"] == "request" for e in lines) == 13
    assert {e["level"] for e in lines if e["event"] == "alert"} >= {"critical", "resolved"}
    first = next(e for e in lines if e["event"] == "request")
    assert set(first["layers"]) == {"0", "3"} and first["status"] == "ok"
    quiet = BandwidthMonitor(layers=[0, 3], log=JsonLinesLog(io.StringIO(), requests=False))
    _fill(quiet, rng, n=3)
    kinds = [json.loads(line)["event"] for line in quiet.log.stream.getvalue().splitlines()]
    assert kinds.count("request") == 1  # only the bad one


def test_timeline_and_alert_record_contracts(rng):
    mon = BandwidthMonitor(layers=[0, 3], config=MonitorConfig(history_size=20))
    _fill(mon, rng)
    tl = mon.timeline_records()
    assert tl and all(set(r) == {"request", "timestamp", "layer", "metric", "value"} for r in tl)
    assert {r["request"] for r in tl} == {r.request for r in mon.history}  # the ring buffer only
    assert {"mean_norm", "participation_ratio", "massive_other_fraction", "bad_input"} <= {r["metric"] for r in tl}
    only = mon.timeline_records(metrics=["mean_norm"])
    assert len(only) == 2 * 19 and {r["metric"] for r in only} == {"mean_norm"}
    alerts = mon.alert_records()
    assert alerts and all(set(a) == {"request", "timestamp", "layer", "metric", "level", "value", "threshold"}
                          for a in alerts)
    assert mon.thresholds == {m: dict(v) for m, v in DEFAULT_THRESHOLDS.items()}
    mon.thresholds["mean_norm"] = {}  # a copy: the monitor is unaffected
    assert "mean_norm" not in mon.thresholds


class FakeCurve:
    """The compression-curve contract (another engineer's object)."""
    base_loss = 2.5
    tolerance = 0.01
    smallest_k = {0: 64, 3: None}

    def records(self):
        return [
            {"layer": 0, "k": 32, "subspace": "pca", "loss": 2.6, "kl": 0.05, "delta_loss": 0.1},
            {"layer": 0, "k": 64, "subspace": "pca", "loss": 2.52, "kl": 0.01, "delta_loss": 0.02},
            {"layer": 0, "k": 64, "subspace": "random", "loss": 2.51, "kl": 0.3, "delta_loss": 0.01},
            {"layer": 3, "k": 64, "subspace": "pca", "loss": 2.75, "kl": 0.2, "delta_loss": 0.25},
        ]


def test_recommendations_state_only_measurements(rng):
    mon = BandwidthMonitor(layers=[0, 3])
    _fill(mon, rng)
    recs = mon.recommendations(curve=FakeCurve())
    r0 = mon.traffic(0).variance_threshold_rank(0.95)
    line0 = next(r for r in recs if r.startswith("layer 0:"))
    assert f"95 % of traffic variance in {r0} of 16 directions" in line0
    assert "compression curve says k = 64 costs +0.8 % loss" in line0.lower()
    line3 = next(r for r in recs if r.startswith("layer 3:"))
    assert "no tested k stays within tolerance" in line3
    assert any("1 of 31 requests were rejected" in r for r in recs)
    text = " ".join(recs).lower()
    for invented in ("latency", "slowdown", "speed", "consider increasing"):
        assert invented not in text
    assert "compression" not in " ".join(mon.recommendations()).lower()


def test_default_layers_and_alias():
    assert default_layers(30) == [9, 19, 29]
    assert default_layers(30, count=4) == [7, 14, 21, 29]
    assert default_layers(3) == [0, 1, 2]
    assert default_layers(1) == [0]
    assert ProductionBandwidthMonitor is BandwidthMonitor
    with pytest.raises(BandwidthInputError):
        BandwidthMonitor(layers=[-1])
    with pytest.raises(BandwidthInputError):
        BandwidthMonitor(config=MonitorConfig(max_positions=1))


def test_attach_validates_layers_and_model(tiny):
    model, _ = tiny
    with pytest.raises(BandwidthInputError):
        BandwidthMonitor(model, layers=[5]).attach()
    with pytest.raises(BandwidthInputError):
        BandwidthMonitor().attach()
    with pytest.raises(BandwidthInputError):
        BandwidthMonitor(torch.nn.Linear(2, 2)).attach()
    mon = BandwidthMonitor(model)
    with mon:
        assert mon.layers == [0, 1, 2] and mon.d_model == 64
    assert isinstance(mon.traffic_summary(), list)
    with pytest.raises(BandwidthInputError):
        mon.traffic(0)


def test_processing_restores_the_callers_thread_setting(rng):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        mon = BandwidthMonitor(layers=[0], alerts=AlertPolicy({}))
        orig = mon._process_request
        mon._process_request = lambda req: (seen.append(torch.get_num_threads()), orig(req))[1]
        assert mon.observe({0: torch.from_numpy(rng.normal(size=(10, 8)))}).status == "ok"
        assert seen == [1] and torch.get_num_threads() == 2
        off = BandwidthMonitor(layers=[0], config=MonitorConfig(single_thread=False), alerts=AlertPolicy({}))
        orig_off = off._process_request
        off._process_request = lambda req: (seen.append(torch.get_num_threads()), orig_off(req))[1]
        off.observe({0: torch.from_numpy(rng.normal(size=(10, 8)))})
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)


def test_width_is_judged_only_from_a_sample_that_can_span_it(rng):
    """The lesson's sample-size rule: n centred positions span at most n - 1 directions, so the width
    (r_p / d) is judged only when n - 1 >= d; before that the summary and the recommendations say so."""
    from residual_bandwidth.monitor import width_rule
    assert width_rule(48, 48) == {"can_judge_width": False, "positions_needed": 49, "positions_missing": 1}
    assert width_rule(49, 48)["can_judge_width"] and width_rule(49, 48)["positions_missing"] == 0
    d = 16
    mon = BandwidthMonitor(layers=[0], config=MonitorConfig(exclude_massive=False, max_positions=None), alerts=AlertPolicy({}))
    mon.observe({0: torch.from_numpy(rng.normal(size=(1, 10, d)))})
    s = mon.traffic_summary(0)
    assert s["n"] == 10 and s["variance_rank"] <= 9 and not s["can_judge_width"] and s["positions_missing"] == 7
    line = next(r for r in mon.recommendations() if r.startswith("layer 0:"))
    assert "describes the sample, not the width of 16" in line and "at least 17 positions (7 more)" in line
    mon.observe({0: torch.from_numpy(rng.normal(size=(1, 7, d)))})
    s = mon.traffic_summary(0)
    assert s["n"] == 17 and s["can_judge_width"]
    assert not any("describes the sample" in r for r in mon.recommendations())
