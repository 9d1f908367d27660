"""Command line: ``python -m residual_bandwidth analyze --model embedded --text "..."``.

Sub-commands:
  analyze   capture a model's residual stream on prompts and write the bandwidth report
  lesson    the lesson's main job (``make lesson``): ``analyze`` on the built-in prompts
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .models import ModelUnavailableError
from .validation import BandwidthInputError


def _prompts(args) -> list[str] | None:
    prompts = list(args.text or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise BandwidthInputError(f"--prompts-file: {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    return prompts or None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="'embedded' (offline SmolLM2-135M), a Hugging Face id such as gpt2, or a local path")
    p.add_argument("--out", default="out", help="output folder for report.json, table.txt and figures")
    p.add_argument("--kind", default="resid_post",
                   choices=["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
    p.add_argument("--threshold", type=float, default=0.95, help="variance fraction p of the rank r_p")
    p.add_argument("--massive-ratio", type=float, default=4.0,
                   help="flag positions whose norm is this many times the layer's median norm")
    p.add_argument("--keep-massive", action="store_true",
                   help="do not leave massive-activation positions out of the spectra")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m residual_bandwidth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="bandwidth report for a model and prompts")
    _add_common(a)
    a.add_argument("--text", action="append", help="a prompt (repeat for several)")
    a.add_argument("--prompts-file", help="a file with one prompt per line")
    lesson = sub.add_parser("lesson", help="the lesson's main job on the built-in prompts")
    _add_common(lesson)
    args = parser.parse_args(argv)

    from .report import run_bandwidth_job, summary_lines
    try:
        prompts = _prompts(args) if args.command == "analyze" else None
        report = run_bandwidth_job(model=args.model, prompts=prompts, out_dir=args.out, kind=args.kind,
                                   variance_threshold=args.threshold, massive_ratio=args.massive_ratio,
                                   exclude_massive=not args.keep_massive, figures=not args.no_figures,
                                   progress=not args.quiet)
    except (BandwidthInputError, ModelUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(args.out, "table.txt").read_text())
    print("\n".join(summary_lines(report)))
    print(f"wrote {Path(args.out).resolve()}/report.json, table.txt"
          f"{', figures.md and ' + str(len(report.get('figures', []))) + ' PNG figures' if report.get('figures') else ''}"
          f" in {report['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
