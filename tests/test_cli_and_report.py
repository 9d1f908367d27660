"""The main job and the command line on the embedded model."""
from __future__ import annotations

import json

import pytest

from residual_bandwidth.course.cli import main
from residual_bandwidth.course.report import bottleneck_ratios, run_bandwidth_job


def test_bottleneck_ratios_for_gpt2_and_smollm2():
    gpt2 = {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_head": 64, "d_mlp": 3072}
    r = bottleneck_ratios(gpt2)
    assert r["mlp_neurons_per_d_model"] == 4 and r["block_writer_dims_per_d_model"] == 5
    assert r["model_writer_dims"] == 12 * (3072 + 768)
    smol = {"d_model": 576, "n_layers": 30, "n_heads": 9, "d_head": 64, "d_mlp": 1536}
    assert bottleneck_ratios(smol)["block_writer_dims_per_d_model"] == pytest.approx((1536 + 576) / 576)


def test_job_writes_report_covering_every_layer(embedded, tmp_path):
    rep = run_bandwidth_job(loaded=embedded, out_dir=tmp_path, progress=False, fast=True)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["model"]["n_layers"] == 30 and len(saved["bandwidth"]["all_positions"]) == 30
    assert {"prompt": 0, "position": 0} in [{k: p[k] for k in ("prompt", "position")}
                                            for p in saved["bandwidth"]["massive_positions"]]
    table = (tmp_path / "table.txt").read_text().splitlines()
    assert len([l for l in table if l.strip()[:2].strip().isdigit()]) == 30
    for fig in rep["figures"]:
        assert (tmp_path / fig["file"]).stat().st_size > 1000 and fig["alt_text"]
    assert "![" in (tmp_path / "figures.md").read_text()


def test_cli_analyze(tmp_path, capsys, embedded):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Residual streams carry information.\n\nAttention moves it between positions.\n")
    code = main(["analyze", "--model", "embedded", "--text", "The capital of France is Paris.",
                 "--prompts-file", str(prompts), "--out", str(tmp_path / "o"), "--quiet", "--no-figures",
                 "--no-analytics"])
    assert code == 0
    out = capsys.readouterr().out
    assert "massive rows" in out and "layer" in out
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert len(saved["prompts"]) == 3


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["analyze", "--prompts-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", "--text", "   ", "--out", str(tmp_path)]) == 2
    assert "empty prompt" in capsys.readouterr().err
