"""Command line: ``python -m residual_bandwidth analyze --model embedded --text "..."``.

Sub-commands:
  analyze   capture a model's residual stream on prompts and write the bandwidth report
  lesson    the lesson's main job (``make lesson``): ``analyze`` on the built-in prompts
  figures   every plot as PNG (+ CSV table) and figures.md with the alt texts and tables
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models import ModelUnavailableError
from ..validation import BandwidthInputError


def _prompts(args) -> list[str] | None:
    prompts = list(args.text or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise BandwidthInputError(f"--prompts-file: {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    return prompts or None


def _add_measurement(p: argparse.ArgumentParser, out_default: str) -> None:
    """Options shared by every subcommand: which model, where to write, what to measure."""
    p.add_argument("--model", default="embedded",
                   help="'embedded' (offline SmolLM2-135M), a Hugging Face id such as gpt2, or a local path")
    p.add_argument("--out", default=out_default, help="output folder")
    p.add_argument("--kind", default="resid_post",
                   choices=["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
    p.add_argument("--threshold", type=float, default=0.95, help="variance fraction p of the rank r_p")
    p.add_argument("--massive-ratio", type=float, default=4.0,
                   help="flag positions whose norm is this many times the layer's median norm")
    p.add_argument("--keep-massive", action="store_true",
                   help="do not leave massive rows (norm >= 4x the median) out of the spectra")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", action="append", help="a prompt (repeat for several; default: built-in prompts)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")


def _add_common(p: argparse.ArgumentParser) -> None:
    """analyze / lesson: the bandwidth job's options."""
    _add_measurement(p, "out")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--fast", action="store_true", help="analytics on fewer layers and subspace sizes")
    p.add_argument("--no-analytics", action="store_true",
                   help="skip bottlenecks / memory management / composition / compression curve")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the analytics (default: torch's own setting; "
                        "1 helps on a machine whose cores are busy with other jobs)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m residual_bandwidth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="bandwidth report for a model and prompts")
    _add_common(a)
    _add_prompts(a)
    lesson = sub.add_parser("lesson", help="the lesson's main job on the built-in prompts")
    _add_common(lesson)
    _add_figures_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "figures":
        return _figures(args)

    from .report import run_bandwidth_job, summary_lines
    try:
        prompts = _prompts(args) if args.command == "analyze" else None
        report = run_bandwidth_job(model=args.model, prompts=prompts, out_dir=args.out, kind=args.kind,
                                   variance_threshold=args.threshold, massive_ratio=args.massive_ratio,
                                   exclude_massive=not args.keep_massive, figures=not args.no_figures,
                                   progress=not args.quiet, fast=args.fast, analytics=not args.no_analytics,
                                   threads=args.threads)
    except (BandwidthInputError, ModelUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(args.out, "table.txt").read_text())
    print("\n".join(summary_lines(report)))
    print(f"wrote {Path(args.out).resolve()}/report.json, table.txt"
          f"{', figures.md and ' + str(len(report.get('figures', []))) + ' PNG figures' if report.get('figures') else ''}"
          f" in {report['seconds']:.1f} s")
    return 0


def _add_figures_parser(sub) -> None:
    f = sub.add_parser("figures", help="write every plot as PNG plus figures.md (alt texts and tables)")
    _add_measurement(f, "out/figures")
    _add_prompts(f)
    f.add_argument("--prompt-index", type=int, default=0, help="the prompt shown in per-prompt heatmaps")
    f.add_argument("--analytics-json",
                   help="JSON with analytics records: keys bottlenecks, wov_heads, memory_ranking, "
                        "composition, compression (see residual_bandwidth.viz.build_figures)")
    f.add_argument("--monitor-json", help="JSON with monitor records: keys records, alerts, thresholds")
    f.add_argument("--dpi", type=int, default=120, help="resolution of the PNG files")


def _read_json(path: str | None, flag: str):
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise BandwidthInputError(f"{flag}: {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise BandwidthInputError(f"{flag}: {p} is not valid JSON ({e})") from None


def _figures(args) -> int:
    """``figures``: capture, analyse and write every plot the inputs allow."""
    from ..run import ResidualRun
    from .models import load_model
    from .report import DEFAULT_PROMPTS
    from ..viz import write_figures
    try:
        prompts = _prompts(args) or list(DEFAULT_PROMPTS)
        analytics = _read_json(args.analytics_json, "--analytics-json")
        monitor = _read_json(args.monitor_json, "--monitor-json")
        if args.dpi < 10:                            # checked before the model loads
            raise BandwidthInputError(f"--dpi: expected at least 10, got {args.dpi}")
        if not 0 <= args.prompt_index < len(prompts):
            raise BandwidthInputError(f"--prompt-index: {args.prompt_index} is not in 0..{len(prompts) - 1}")
        lm = load_model(args.model)
        run = ResidualRun(lm.model, lm.tokenizer, prompts, kinds=[args.kind], erasure=False,
                          massive_ratio=args.massive_ratio, progress=not args.quiet)
        rep = run.report(args.threshold, kind=args.kind, exclude_massive=not args.keep_massive)
        index = write_figures(rep, run.capture, args.out, analytics=analytics, monitor=monitor,
                              prompt=args.prompt_index, dpi=args.dpi)
    except (BandwidthInputError, ModelUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    for fig in index:
        print(f"{fig['file']}: {fig['alt_text']}\n")
    print(f"wrote {len(index)} PNG figures, their CSV tables and figures.md to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
