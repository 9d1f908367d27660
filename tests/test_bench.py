"""The benchmark scripts' own logic (not their timings): the baseline is the seed's algorithm, the
summary reports verdicts from the numbers it is given, and the synthetic inputs are what they claim."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import lo1_metrics  # noqa: E402
import summarize  # noqa: E402


def test_seed_baseline_computes_the_seed_quantity(rng):
    """The baseline's rank is the seed's: cumulative *sigma* of the uncentred pooled matrix (not ours)."""
    states = [torch.tensor(rng.normal(size=(30, 12)) * np.linspace(4, 0.1, 12), dtype=torch.float32)
              for _ in range(3)]
    sig = np.linalg.svd(torch.cat(states).double().numpy(), compute_uv=False)
    expected = int(np.sum(np.cumsum(sig) < 0.95 * sig.sum()) + 1)
    assert lo1_metrics.seed_algorithm(states) == expected
    assert lo1_metrics.seed_algorithm(states, positions=None) == expected


def test_synthetic_stack_has_the_advertised_shape_and_massive_row():
    states = lo1_metrics.stack(layers=2, n=64, d=16)
    assert [tuple(s.shape) for s in states] == [(64, 16), (64, 16)]
    for s in states:
        norms = s.norm(dim=1)
        assert norms[0] >= 50 * norms[1:].median()  # position 0 is a massive activation


def test_covariance_pass_is_the_centred_scatter(rng):
    x = torch.tensor(rng.normal(size=(40, 6)) + 3.0)
    c = (x - x.mean(0)).numpy()
    np.testing.assert_allclose(lo1_metrics.covariance_pass(x, torch.float64).numpy(), c.T @ c, rtol=1e-12)


def _lo1(seed, library, floor64):
    seconds = {"seed": seed, "seed_all_positions": seed, "library": library, "library_layers": 1.0,
               "sklearn": 0.5, "floor64": floor64, "floor32": floor64 / 2}
    ratios = {"seed_over_library": seed / library, "seed_all_positions_over_library": seed / library,
              "library_over_floor64": library / floor64, "sklearn_over_library": 0.5 / library,
              "seed_over_floor64": seed / floor64, "seed_over_floor32": 2 * seed / floor64}
    return {"part1": {"shape": [13, 1024, 768], "seconds": seconds, "ratios": ratios}, "part3": []}


@pytest.mark.parametrize("seed,library,floor64,verdicts", [
    (1.0, 0.05, 0.04, ["met", "met"]),
    (1.0, 0.25, 0.2, ["**missed**", "met"]),
    (1.0, 0.5, 0.2, ["**missed**", "**missed**"]),
])
def test_summary_verdicts_follow_the_numbers(seed, library, floor64, verdicts):
    rows = summarize.rows({"lo1": _lo1(seed, library, floor64)})
    by_target = [r[3] for r in rows if r[2] in (">= 10x", "<= 2x")]
    assert by_target == verdicts
    text = summarize.table({"lo1": _lo1(seed, library, floor64)})
    assert f"{seed / library:.2f}x" in text and "`python bench/lo1_metrics.py`" in text


def test_summary_shows_both_precisions_of_the_per_layer_report():
    """The inference benchmark's JSON reaches the summary: float64 (the default) and float32 side by side."""
    row = {"tokens": 2048, "forward_blocks_s": 1.0, "forward_whole_s": 1.2, "spectra_s": 0.1,
           "stored": {"over_blocks_floor": 1.5, "over_whole_floor": 1.3},
           "stored32": {"over_blocks_floor": 1.25, "over_whole_floor": 1.1},
           "streamed32": {"over_blocks_floor": 1.05, "over_whole_floor": 0.95}}
    rows = summarize.rows({"inference": {"report": [row]}})
    assert len(rows) == 1
    label, value = rows[0][0], rows[0][1]
    assert "2,048 tokens" in label and "float64" in label and "float32" in label
    assert value == "1.50x (1.30x) ; 1.25x (1.10x) ; 1.05x (0.95x)"
    assert "|" not in label + value   # one table cell each
    assert "inference_speed.py" in summarize.table({"inference": {"report": [row]}})


def test_summary_reports_the_explorer_latency_from_its_json():
    """The explorer benchmark's JSON reaches the summary with its verdict against the 200 ms target."""
    data = {"layers": 30, "first_view_seconds": 0.7, "render_ahead_seconds": 14.7, "drawn_p95_ms": 704.2,
            "ahead_p95_ms": 1.8, "target_ms": 200}
    rows = summarize.rows({"explorer": data})
    assert [r[1] for r in rows] == ["1.8 ms", "704 ms", "14.7 s in the background"]
    assert rows[0][3] == "met" and rows[0][2] == "<= 200 ms in the browser"
    assert summarize.rows({"explorer": {**data, "ahead_p95_ms": 250.0}})[0][3] == "**missed**"
    assert all("explorer.py" in r[4] for r in rows)


def test_notebook_benchmark_times_sections_and_the_first_figure():
    """bench/notebook.py's per-section seconds and time to the first figure, on a small executed notebook."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
    import notebook as nb_bench

    def code(src, seconds, figure=False):
        cell = new_code_cell(src, metadata={"papermill": {"duration": seconds}})
        if figure:
            cell.outputs = [new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "fig"})]
        return cell

    nb = new_notebook(cells=[code("import os", 0.5), new_markdown_cell("## 0. Setup"),
                             code("lm = load_model('embedded')", 4.0), code("x = 1", 1.5),
                             new_markdown_cell("## 1. First idea\n\ntext"), code("plot()", 2.0, figure=True),
                             code("y = 2", 3.0), new_markdown_cell("### a subsection"), code("z = 3", 1.0)])
    nb = nbformat.from_dict(nb)
    assert nb_bench.section_times(nb) == [("(top)", 0.5), ("0. Setup", 5.5), ("1. First idea", 6.0)]
    assert nb_bench.first_figure_seconds(nb) == 3.5   # 1.5 s after the set-up cell, then the figure's 2.0 s
    assert nb_bench.first_figure_seconds(nbformat.from_dict(new_notebook(cells=[code("load_model()", 1.0)]))) is None
