"""The interactive explorer: its pure update function gives the library's numbers, the widget
callbacks call it, and without a widget front end it degrades to a static figure + table."""
from __future__ import annotations

import html
import re
import threading

import pytest

from residual_bandwidth import BandwidthInputError, ResidualBandwidthAnalyzer, ResidualRun, capture_residuals
from residual_bandwidth.course.explorer import (STATIC_ENV, BandwidthExplorer, as_loaded, explore,
                                         explorer_update, fit_to_container, prompt_run,
                                         widget_frontend_available, widget_view_bundle)
from residual_bandwidth.viz import AccessibleFigure, format_percent

PROMPT = "The capital of France is Paris, and the capital of Italy is Rome."
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(autouse=True)
def _close_explorers():
    """Explorers shown live render ahead in a background thread; stop those after each test."""
    yield
    import residual_bandwidth.course.explorer as explorer_module
    for ex in list(explorer_module._OPEN):
        ex.close()


@pytest.fixture(scope="module")
def one_run(embedded):
    """The explorer's run of PROMPT (its capture and kept reports are shared by the tests)."""
    return prompt_run(embedded, PROMPT)


@pytest.fixture(scope="module")
def library_capture(embedded):
    """The library's own path: a plain capture_residuals call (all five kinds)."""
    return capture_residuals(embedded.model, embedded.tokenizer, [PROMPT], progress=False)


@pytest.mark.parametrize("layer, threshold, exclude_massive, reuse", [(14, 0.9, True, False),
                                                                      (3, 0.95, False, True)])
def test_update_gives_the_library_numbers(embedded, library_capture, one_run, layer, threshold,
                                          exclude_massive, reuse):
    # once through the explorer's own forward pass, once re-using its cached capture
    fig, table = explorer_update(embedded, PROMPT, layer, threshold, exclude_massive,
                                 run=one_run if reuse else None)
    report = ResidualBandwidthAnalyzer(variance_threshold=threshold,
                                       exclude_massive=exclude_massive).analyze_layers(library_capture)
    p = round(100 * threshold)
    assert [row["layer"] for row in table] == report.layers
    for row, a, c in zip(table, report.all_positions, report.without_massive):
        assert row[f"r{p}"] == c.variance_rank and row[f"r{p}_all"] == a.variance_rank
        assert row["participation_ratio"] == pytest.approx(c.participation_ratio, rel=1e-9)
        assert row["stable_rank"] == pytest.approx(c.stable_rank, rel=1e-9)
        assert row["entropy_rank"] == pytest.approx(c.entropy_rank, rel=1e-9)
        assert row["util_available"] == pytest.approx(c.utilization_available)
        assert row["n_positions"] == c.n_positions
        assert row["selected"] == (row["layer"] == layer)
    m = report.without_massive[report.layers.index(layer)]
    assert f"r{p} = {m.variance_rank} of min(n, d) = {min(m.n_positions, m.d_model)}" in fig.alt_text
    assert f"utilization {format_percent(m.utilization_available)}" in fig.alt_text
    # a width ratio from n - 1 < d_model positions is refused as a measurement (Section 8's rule)
    assert ("not judgeable: fewer than d_model + 1 positions" in fig.alt_text) == (m.n_positions - 1 < m.d_model)
    if exclude_massive:  # position 0 is massive in the middle layers and is left out
        assert "position 0 'The' is massive" in fig.alt_text and "excluded from the spectrum" in fig.alt_text
        assert m.n_positions == report.all_positions[0].n_positions - 1
    fig.close()


def test_widget_callbacks_call_the_update(embedded, one_run):
    ex = BandwidthExplorer(embedded, prompt=PROMPT, layer=10, interactive=True, run=one_run)
    w = ex.widgets
    assert w["layer"].min == 0 and w["layer"].max == 29
    w["layer"].value = 20
    w["threshold"].value = 0.8
    w["exclude_massive"].value = False
    assert ex.settings == {"prompt": PROMPT, "layer": 20, "threshold": 0.8, "exclude_massive": False}
    fig, table = explorer_update(embedded, PROMPT, 20, 0.8, False, run=one_run)
    assert ex.table == table and ex.figure.alt_text == fig.alt_text
    assert ex.figure.alt_text.replace("'", "&#x27;") in w["view"].value  # the widget shows the alt text
    fig.close()
    # a bad setting keeps the last good view and says why
    w["exclude_massive"].value = True
    w["prompt"].value = "Hi"  # one token, and its only position ... leaves < 2 positions
    assert ex.error and "fewer than 2 positions" in ex.error
    assert ex.settings["prompt"] == PROMPT and "Not updated" in w["status"].value
    bundle = ex._repr_mimebundle_()
    assert WIDGET_VIEW in bundle and 'alt="' in bundle["text/html"] and "Not updated" in bundle["text/plain"]


def test_static_fallback(embedded, one_run, capsys, monkeypatch):
    monkeypatch.delenv(STATIC_ENV, raising=False)
    assert widget_frontend_available() is False  # pytest runs outside a Jupyter kernel
    ex = explore(embedded, prompt=PROMPT, layer=5, run=one_run)
    assert not ex.interactive and ex.widgets is None
    printed = capsys.readouterr().out  # plain Python: the static view is printed
    assert ex.figure.alt_text in printed and "r95_all" in printed
    bundle = ex._repr_mimebundle_()
    assert WIDGET_VIEW not in bundle and "<img" in bundle["text/html"] and "<table>" in bundle["text/html"]
    assert isinstance(ex.figure, AccessibleFigure) and len(ex.table) == 30
    ex.update(layer=6)
    assert ex.settings["layer"] == 6 and sum(r["selected"] for r in ex.table) == 1
    monkeypatch.setenv(STATIC_ENV, "1")
    assert widget_frontend_available() is False and widget_frontend_available(True) is True


def test_explorer_on_a_run_reads_its_capture(embedded, monkeypatch):
    """explore(run) shows a prompt of the run from the run's capture, without a forward pass (issue
    23: no analysis re-runs the model for prompts it already has); its table is the table of the
    prompt run on its own (a batch of three, padded, against one prompt: equal to float tolerance)."""
    import residual_bandwidth.run as run_module
    prompts = ["Short one.", PROMPT, "A third prompt about the weather in spring."]
    run = ResidualRun(embedded.model, embedded.tokenizer, prompts, erasure=False)
    run.capture
    _, alone = explorer_update(embedded, PROMPT, 7)

    def no_forward(*args, **kwargs):
        raise AssertionError("the explorer ran the model for a prompt the run already has")
    monkeypatch.setattr(run_module, "run_listeners", no_forward)
    ex = explore(run, prompt=PROMPT, layer=7, interactive=False)
    assert len(ex.table) == len(alone) == 30
    for got, want in zip(ex.table, alone):
        assert got["n_positions"] == want["n_positions"] and got["selected"] == want["selected"]
        assert got["participation_ratio"] == pytest.approx(want["participation_ratio"], rel=1e-4)
        assert abs(got["r95"] - want["r95"]) <= 1
    assert explore(run, interactive=False).settings["prompt"] == prompts[0]   # the run's first prompt
    with pytest.raises(AssertionError, match="ran the model"):   # a typed prompt does run the model
        ex.update(prompt="Something the run has not seen.")
    with pytest.raises(BandwidthInputError, match="not all indices"):
        run.capture.of_prompts([3])


def test_invalid_arguments(embedded, one_run):
    for kwargs, message in [({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"),
                            ({"layer": 30}, "out of range"), ({"layer": "3"}, "layer: expected an int"),
                            ({"prompt": "   "}, "empty prompt"), ({"prompt": ["a", "b"]}, "one non-empty string")]:
        args = {"prompt": PROMPT, "layer": 3, "threshold": 0.95, **kwargs}
        with pytest.raises(BandwidthInputError, match=message):
            explorer_update(embedded, run=one_run, **args)
    with pytest.raises(BandwidthInputError, match="other prompts"):
        explorer_update(embedded, "Another prompt entirely.", 3, 0.95, run=one_run)
    with pytest.raises(BandwidthInputError, match="another massive ratio"):
        explorer_update(embedded, PROMPT, 3, 0.95, massive_ratio=8.0, run=one_run)
    with pytest.raises(BandwidthInputError, match="tokenizer"):
        as_loaded(embedded.model)
    assert as_loaded(embedded.model, embedded.tokenizer).tokenizer is embedded.tokenizer
    ex = BandwidthExplorer(embedded, prompt=PROMPT, interactive=False, run=one_run)
    with pytest.raises(BandwidthInputError, match="unknown setting"):
        ex.update(colour="red")


def _img_tags(markup: str) -> list[str]:
    return re.findall(r"<img\b[^>]*>", markup)


def test_image_fits_its_container(embedded, one_run):
    ex = BandwidthExplorer(embedded, prompt=PROMPT, layer=4, interactive=True, run=one_run)
    for markup in (ex.widgets["view"].value, ex.static_html(), ex._repr_mimebundle_()["text/html"]):
        imgs = _img_tags(markup)
        assert len(imgs) == 1
        style = re.search(r'style="([^"]*)"', imgs[0]).group(1).replace(" ", "")
        assert "max-width:100%" in style and "height:auto" in style
        assert 'alt="' in imgs[0]
        # the wide data table scrolls inside its own box instead of widening the output
        assert re.search(r'<div style="overflow-x: auto;[^"]*"><table>', markup)
    assert fit_to_container('<img style="width: 3px" src="x">') == '<img style="width: 3px" src="x">'


def _controls(w) -> dict:
    return {"prompt": w["prompt"].value, "layer": w["layer"].value,
            "threshold": w["threshold"].value, "exclude_massive": w["exclude_massive"].value}


def _assert_view_matches_controls(embedded, one_run, ex):
    w = ex.widgets
    shown = _controls(w)
    assert ex.settings == shown and ex.error is None
    status = w["status"].value
    assert f"layer {shown['layer']}," in status and f"p = {shown['threshold']:.2f}" in status
    assert ("excluded" if shown["exclude_massive"] else "kept") in status
    fig, table = explorer_update(embedded, PROMPT, shown["layer"], shown["threshold"],
                                 shown["exclude_massive"], run=one_run)
    assert ex.table == table
    assert html.escape(fig.alt_text, quote=True) in w["view"].value
    fig.close()


def test_rapid_input_last_input_wins(embedded, one_run):
    ex = BandwidthExplorer(embedded, prompt=PROMPT, layer=10, interactive=True, run=one_run)
    w = ex.widgets
    for layer in (11, 12, 13, 16):
        w["layer"].value = layer
    w["exclude_massive"].value = False
    w["layer"].value = 17
    w["threshold"].value = 0.9
    _assert_view_matches_controls(embedded, one_run, ex)
    # a programmatic update moves the controls too, so they never disagree with the view
    ex.update(layer=5, threshold=0.3)
    assert w["layer"].value == 5 and w["threshold"].value == 0.3 and w["threshold"].min <= 0.3
    _assert_view_matches_controls(embedded, one_run, ex)


def test_slow_render_of_older_input_never_overwrites_newer(embedded, one_run, monkeypatch):
    """The issue's report: after quick slider + checkbox input the view showed layer 16 with the
    slider at 17. Here the render of layer 16 is slow; while it runs (in another thread, as a
    comm message on another kernel thread would), the checkbox and the slider move on."""
    import residual_bandwidth.course.explorer as explorer_module

    real_update = explorer_module.explorer_update
    slow_started, release = threading.Event(), threading.Event()

    def slow_update(loaded, prompt, layer, *args, **kwargs):
        if layer == 16:
            slow_started.set()
            release.wait(10)  # hold the old render until the newer inputs have arrived
        return real_update(loaded, prompt, layer, *args, **kwargs)

    # no background rendering here: it would draw layer 16 itself and this test times the main path
    ex = BandwidthExplorer(embedded, prompt=PROMPT, layer=10, interactive=True, run=one_run,
                           prerender=False)
    w = ex.widgets
    monkeypatch.setattr(explorer_module, "explorer_update", slow_update)
    older = threading.Thread(target=lambda: setattr(w["layer"], "value", 16))
    older.start()
    assert slow_started.wait(10)
    newer = []
    for key, value in (("exclude_massive", False), ("layer", 17)):
        t = threading.Thread(target=lambda k=key, v=value: setattr(w[k], "value", v))
        t.start()
        newer.append(t)
    for t in newer:  # give the newer inputs time to render (they must wait for the old render)
        t.join(2.0)
    release.set()
    for t in [older, *newer]:
        t.join(30)
        assert not t.is_alive()
    assert _controls(w)["layer"] == 17 and _controls(w)["exclude_massive"] is False
    _assert_view_matches_controls(embedded, one_run, ex)


def test_rendered_ahead_views_are_the_views_a_fresh_render_gives(embedded, one_run, monkeypatch):
    """Rendering ahead (issue 23: a slider step must not wait for matplotlib): once the background
    thread is done, moving the slider to a neighbour swaps in a kept view without drawing anything,
    and that view is exactly what explorer_update draws for the setting."""
    import matplotlib

    import residual_bandwidth.course.explorer as explorer_module
    from residual_bandwidth.viz import plot_rank_by_layer

    from residual_bandwidth.viz.core import FIGURE_LOCK
    with FIGURE_LOCK:  # no figure is being made anywhere
        rc_before = dict(matplotlib.rcParams)
    ex = BandwidthExplorer(embedded, prompt=PROMPT, layer=10, interactive=True, run=one_run)
    assert ex.prerender
    for _ in range(3):  # figures made on this thread while the other one draws
        plot_rank_by_layer(one_run.report()).close()
    assert ex.wait_prerendered(120), "the background thread did not finish"
    with FIGURE_LOCK:
        assert dict(matplotlib.rcParams) == rc_before, "a figure's style leaked into matplotlib's settings"
    expected = ex.neighbours()
    assert [n["layer"] for n in expected[:2]] == [9, 11] and expected[2]["exclude_massive"] is False
    assert {n["threshold"] for n in expected} == {0.94, 0.95, 0.96}
    assert sorted(n["layer"] for n in expected if n["threshold"] == 0.95 and n["exclude_massive"]) == [
        L for L in range(30) if L != 10]

    ex.prerender = False  # from here on only this thread draws, so the count below is exact
    real_update, drawn = explorer_module.explorer_update, []

    def counting_update(loaded, prompt, layer, *args, **kwargs):
        drawn.append(layer)
        return real_update(loaded, prompt, layer, *args, **kwargs)

    monkeypatch.setattr(explorer_module, "explorer_update", counting_update)
    w = ex.widgets
    for layer in (11, 12, 25, 0, 9):
        w["layer"].value = layer
        assert ex.settings["layer"] == layer and f"layer {layer}," in w["status"].value
    w["threshold"].value = 0.94   # one slider step from layer 10's threshold, at layer 9: not kept
    assert drawn == [9] and ex.settings["threshold"] == 0.94
    _assert_view_matches_controls(embedded, one_run, ex)
    monkeypatch.undo()
    for layer, threshold in ((12, 0.95), (10, 0.96)):   # rendered ahead of layer 10 at 0.95
        fig, table = explorer_update(embedded, PROMPT, layer, threshold, True, run=one_run)
        kept = ex._cached_view(explorer_module._view_key(
            {"prompt": PROMPT, "layer": layer, "threshold": threshold, "exclude_massive": True}))
        assert kept is not None and kept.table == table
        assert html.escape(fig.alt_text, quote=True) in kept.html
        fig.close()
    ex.close()
    assert ex.wait_prerendered(0) and not ex._start_prerender()


def test_background_drawing_waits_until_the_controls_are_quiet(embedded, one_run, monkeypatch):
    """Drawing ahead must not compete with a student's quick steps: it starts QUIET_SECONDS after the
    last input (here 2 s), and then draws the neighbours."""
    import time

    monkeypatch.setattr(BandwidthExplorer, "QUIET_SECONDS", 2.0)
    ex = BandwidthExplorer(embedded, prompt=PROMPT, layer=10, interactive=True, run=one_run)
    ex.widgets["layer"].value = 11   # an input: the quiet period starts again
    time.sleep(1.0)
    assert len(ex._views) == 2, "the background thread drew while the controls were still moving"
    assert ex.wait_prerendered(120) and len(ex._views) > 2


class _Widget7:
    """What an ipywidgets 7 widget offers for display: a model id and no _repr_mimebundle_."""
    model_id = "abc123"


def test_widget_view_for_ipywidgets_7_and_8():
    import ipywidgets as W
    assert widget_view_bundle(_Widget7()) == {
        WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": "abc123"}}
    box = W.VBox([])
    assert widget_view_bundle(box)[WIDGET_VIEW]["model_id"] == box.model_id
    assert widget_view_bundle(object()) == {}
