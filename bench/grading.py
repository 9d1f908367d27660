"""Benchmark of the grading pipeline (not a test): seconds per submission, serial and with --jobs 2,
with and without the operating-system sandbox.

    python bench/grading.py [--n 20] [--full-n 2] [--skip-full] [--skip-off]

Makes a batch of ``--n`` submissions from the source notebook with the threshold-suite generator
(mostly correct, some at the threshold, some untouched, like a real class), then grades it with the
real command line:

0. the sandbox alone: ``bwrap ... true`` and ``python -c pass`` in the sandbox vs outside (median of 20)
1. fast mode, ``--jobs 1``  (serial), sandbox on   -> seconds per submission
2. the same with ``--sandbox off``                  -> sandbox overhead per submission = (1 - 2) / n
3. fast mode, ``--jobs 2``, sandbox on              -> batch wall time vs serial (target <= 5 s/submission)
4. full mode, ``--jobs 1`` on ``--full-n``          -> seconds per submission when every demo cell runs

Numbers include everything the command does per run (worker start-up, the template gradebook is
cached after the first run). The machine is shared (2 cores, other work running), so repeat and
read the numbers as indicative (the load average before and after is printed and saved). Targets:
<= 20 s per submission serial; sandbox overhead <= 1 s per submission; --jobs 2 <= 5 s per submission.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from autograder.ingest.notebook import load_spec  # noqa: E402
from autograder.check.threshold_suite import threshold_choices, with_failing, solved  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402


def make_batch(folder: Path, n: int, spec) -> None:
    base = solved(spec)
    (_, at_line), _ = threshold_choices(spec)
    kinds = [("correct", with_failing(base, spec, set()))] * 7 + [("threshold", with_failing(base, spec, set(at_line)))] * 2 \
        + [("untouched", spec.release)]
    for i in range(n):
        kind, nb = kinds[i % len(kinds)]
        path = folder / f"student{i:02d}-{kind}" / spec.lesson_id / spec.notebook_name
        path.parent.mkdir(parents=True)
        nbformat.write(nb, str(path))


def run(subs: Path, out: Path, *extra: str) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "autograder", "grade", str(subs), "--out", str(out), "--quiet",
                        "--probe-seed", "1", *extra], cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if not (out / "results.json").exists():
        raise SystemExit(f"grading failed:\n{r.stdout}\n{r.stderr}")
    return wall, json.loads((out / "results.json").read_text())


def sandbox_alone(repeat: int = 20) -> dict:
    """Median seconds of starting ``true`` and ``python -c pass`` in the sandbox and outside."""
    import statistics
    from autograder.isolate import sandbox
    scratch = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    out = {}
    try:
        box = sandbox.Box(scratch / "box", "/tmp/work")
        sandbox.prepare_scratch(box)
        for label, argv in (("true", ["/usr/bin/true"]), ("python", [sys.executable, "-c", "pass"])):
            for where, cmd in (("outside", argv), ("sandbox", sandbox.command(argv, box))):
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    subprocess.run(cmd, check=True, capture_output=True)
                    times.append(time.perf_counter() - t0)
                out[f"{label}_{where}"] = statistics.median(times)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def describe(label: str, wall: float, res: dict) -> str:
    n = len(res["students"])
    per = [s["seconds"] for s in res["students"]]
    counts = res["counts"]
    return (f"{label:<28} {n:>3} submissions  wall {wall:7.1f} s  = {wall / n:6.1f} s/submission   "
            f"(per-student grading time median {sorted(per)[len(per) // 2]:.1f} s, max {max(per):.1f} s; "
            f"{counts['graded']} graded, {counts['flagged']} flagged, {counts['errored']} errored)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--full-n", type=int, default=2)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-off", action="store_true", help="skip the serial run without the sandbox")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    result = {"n": args.n, "machine": machine(), "load_average_before": list(os.getloadavg())}
    spec = load_spec(DEFAULT_LESSON)
    tmp = Path(tempfile.mkdtemp(prefix="bench-grading-"))
    try:
        subs = tmp / "batch"
        make_batch(subs, args.n, spec)
        print(f"machine: {os.cpu_count()} cores (shared; numbers are noisy). Lesson {spec.lesson_id}, "
              f"{len(spec.grade_cells)} grade cells, {spec.total_points:g} points.")
        alone = sandbox_alone()
        result["sandbox_alone"] = alone
        print("sandbox start-up alone (median of 20): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in alone.items()))
        run(subs, tmp / "warm", "--jobs", "1", "--no-feedback")   # warm the template gradebook cache and disk caches
        lines = []
        w1, r1 = run(subs, tmp / "serial", "--jobs", "1")
        lines.append(describe("fast, --jobs 1 (serial)", w1, r1))
        result["fast_serial"] = {"wall": w1, "per_submission": w1 / args.n, "counts": r1["counts"],
                                 "load_average": list(os.getloadavg())}
        print(lines[-1], flush=True)
        if not args.skip_off:
            w0, r0 = run(subs, tmp / "serial-off", "--jobs", "1", "--sandbox", "off")
            print(describe("fast, --jobs 1, --sandbox off", w0, r0), flush=True)
            over = (w1 - w0) / args.n
            result["fast_serial_sandbox_off"] = {"wall": w0, "per_submission": w0 / args.n, "counts": r0["counts"],
                                                 "load_average": list(os.getloadavg())}
            result["sandbox_overhead_per_submission"] = over
            print(f"sandbox overhead: {over:+.2f} s per submission (target <= 1 s: {'met' if over <= 1 else 'NOT met'})")
        w2, r2 = run(subs, tmp / "jobs2", "--jobs", "2")
        lines.append(describe("fast, --jobs 2", w2, r2))
        result["fast_jobs2"] = {"wall": w2, "per_submission": w2 / args.n, "counts": r2["counts"],
                                "load_average": list(os.getloadavg())}
        print(lines[-1], flush=True)
        print(f"--jobs 2 batch of {args.n}: {w2:.1f} s vs serial {w1:.1f} s (speed-up x{w1 / w2:.2f}); "
              f"target <= 5 s per submission: {'met' if w2 / args.n <= 5 else 'NOT met'} ({w2 / args.n:.1f} s)")
        if not args.skip_full:
            full = tmp / "full"
            full.mkdir()
            for d in sorted(subs.iterdir())[: args.full_n]:
                shutil.copytree(d, full / d.name)
            w3, r3 = run(full, tmp / "fullout", "--jobs", "1", "--mode", "full")
            print(describe("full, --jobs 1", w3, r3))
            result["full_serial"] = {"wall": w3, "n": len(r3["students"]), "per_submission": w3 / len(r3["students"]),
                                     "counts": r3["counts"]}
        target = w1 / args.n
        print(f"target <= 20 s per submission (fast, serial): {'met' if target <= 20 else 'NOT met'} ({target:.1f} s)")
        result["load_average_after"] = list(os.getloadavg())
        write_json(args.json, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
