"""The interactive explorer: its pure update function gives the library's numbers, the widget
callbacks call it, and without a widget front end it degrades to a static figure + table."""
from __future__ import annotations

import pytest

from residual_bandwidth import BandwidthInputError, ResidualBandwidthAnalyzer, capture_residuals
from residual_bandwidth.course.explorer import (STATIC_ENV, BandwidthExplorer, analyse_capture, as_loaded,
                                         capture_prompt, explore, explorer_update,
                                         widget_frontend_available)
from residual_bandwidth.viz import AccessibleFigure, format_percent

PROMPT = "The capital of France is Paris, and the capital of Italy is Rome."
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def prompt_capture(embedded):
    return capture_prompt(embedded, PROMPT)


@pytest.fixture(scope="module")
def library_capture(embedded):
    """The library's own path: a plain capture_residuals call (all five kinds)."""
    return capture_residuals(embedded.model, embedded.tokenizer, [PROMPT], progress=False)


@pytest.mark.parametrize("layer, threshold, exclude_massive, reuse", [(14, 0.9, True, False),
                                                                      (3, 0.95, False, True)])
def test_update_gives_the_library_numbers(embedded, library_capture, prompt_capture, layer, threshold,
                                          exclude_massive, reuse):
    # once through the explorer's own forward pass, once re-using its cached capture
    fig, table = explorer_update(embedded, PROMPT, layer, threshold, exclude_massive,
                                 capture=prompt_capture if reuse else None)
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
    if exclude_massive:  # position 0 is massive in the middle layers and is left out
        assert "position 0 'The' is massive" in fig.alt_text and "excluded from the spectrum" in fig.alt_text
        assert m.n_positions == report.all_positions[0].n_positions - 1
    fig.close()


def test_widget_callbacks_call_the_update(embedded, prompt_capture):
    ex = BandwidthExplorer(embedded, prompt=PROMPT, layer=10, interactive=True, capture=prompt_capture)
    w = ex.widgets
    assert w["layer"].min == 0 and w["layer"].max == 29
    w["layer"].value = 20
    w["threshold"].value = 0.8
    w["exclude_massive"].value = False
    assert ex.settings == {"prompt": PROMPT, "layer": 20, "threshold": 0.8, "exclude_massive": False}
    fig, table = explorer_update(embedded, PROMPT, 20, 0.8, False, capture=prompt_capture)
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


def test_static_fallback(embedded, prompt_capture, capsys, monkeypatch):
    monkeypatch.delenv(STATIC_ENV, raising=False)
    assert widget_frontend_available() is False  # pytest runs outside a Jupyter kernel
    ex = explore(embedded, prompt=PROMPT, layer=5, capture=prompt_capture)
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


def test_invalid_arguments(embedded, prompt_capture):
    for kwargs, message in [({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"),
                            ({"layer": 30}, "out of range"), ({"layer": "3"}, "integer"),
                            ({"prompt": "   "}, "empty prompt"), ({"prompt": ["a", "b"]}, "one non-empty string")]:
        args = {"prompt": PROMPT, "layer": 3, "threshold": 0.95, **kwargs}
        with pytest.raises(BandwidthInputError, match=message):
            explorer_update(embedded, capture=prompt_capture, **args)
    report = analyse_capture(prompt_capture, 0.9)
    with pytest.raises(BandwidthInputError, match="other settings"):
        explorer_update(embedded, PROMPT, 3, 0.95, capture=prompt_capture, report=report)
    with pytest.raises(BandwidthInputError, match="tokenizer"):
        as_loaded(embedded.model)
    assert as_loaded(embedded.model, embedded.tokenizer).tokenizer is embedded.tokenizer
    ex = BandwidthExplorer(embedded, prompt=PROMPT, interactive=False, capture=prompt_capture)
    with pytest.raises(BandwidthInputError, match="unknown setting"):
        ex.update(colour="red")
