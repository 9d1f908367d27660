"""Benchmark: wall time of the lesson notebook executed headless on the embedded model.

Runs the instructor (solutions) notebook with papermill exactly as ``make lesson`` does
(``-p MODEL embedded``, matplotlib's Agg backend, the explorer's static fallback) in a temporary
folder, ``--runs`` times, and prints the wall time of each run and the slowest cells (papermill
records every cell's duration). Target (lesson issue): under 90 s on 2 CPU cores.

Usage: python bench/notebook.py [--runs 1] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from common import ROOT, describe_machine, machine, write_json


def notebook_path() -> Path:
    found = sorted((ROOT / "solutions").glob("*/lesson.ipynb"))
    if not found:
        raise SystemExit("no solutions/<lesson>/lesson.ipynb found")
    return found[0]


def run_once(src: Path, out: Path) -> float:
    env = {**os.environ, "MPLBACKEND": "Agg", "RESIDUAL_BANDWIDTH_STATIC": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "papermill", "--log-level", "WARNING", "-k", "python3",
                        "-p", "MODEL", "embedded", str(src), str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"papermill failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    m = machine()
    print("machine:", describe_machine(m))
    src = notebook_path()
    runs, slow = [], []
    with tempfile.TemporaryDirectory(prefix="bench-notebook-") as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}.ipynb"
            runs.append(run_once(src, out))
            nb = nbformat.read(out, as_version=4)
            cells = [(c.metadata.get("papermill", {}).get("duration") or 0.0, c.get("id"), c.source.split("\n")[0][:60])
                     for c in nb.cells if c.cell_type == "code"]
            slow = sorted(cells, reverse=True)[:5]
            print(f"  run {i + 1}: {runs[-1]:.1f} s wall (papermill start-up included), "
                  f"{sum(c[0] for c in cells):.1f} s in {len(cells)} code cells")
    print("  slowest cells of the last run: " + "; ".join(f"{d:.1f} s {cid} ({line!r})" for d, cid, line in slow))
    best = min(runs)
    print(f"  => notebook: {best:.1f} s (best of {len(runs)}); target < 90 s: {'met' if best < 90 else 'NOT met'}")
    out = {"machine": m, "notebook": str(src.relative_to(ROOT)), "runs_seconds": runs, "best_seconds": best,
           "slowest_cells": [{"seconds": d, "id": cid, "first_line": line} for d, cid, line in slow]}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
