"""Benchmark of grading at scale (not a test): cost per submission, 1 vs 2 workers, Dask vs local.

    python bench/grading_scale.py [--n 6] [--json out/bench/grading_scale.json]

Fast mode, sandbox on, feedback on, the real command line (``python -m autograder grade``):

1. **cost per submission** for a strong (all correct), typical (exactly at the passing threshold) and
   weak (untouched) notebook: one submission of each kind graded by the command (``--jobs 1``); CPU
   seconds per submission = CPU(that run) - CPU(a run whose only student has no notebook), where CPU
   is the user + system time of the command and every process it waited for (nbgrader worker,
   kernel, re-check process), so the command's start-up cancels; wall = the student's ``seconds``.
2. **throughput** of a class of ``--n`` submissions (strong/typical/weak mixed) with the local
   executor (``--jobs 1``, ``--jobs 2``) and with Dask (``LocalCluster`` of 1 and 2 worker processes,
   one thread each); each Dask run is preceded by a warm-up batch of 2 so that the workers' grading
   contexts exist (a long-running cluster's normal state; ``--no-warm-up`` times a fresh cluster). Scaling efficiency = throughput(2) /
   (2 x throughput(1)); Dask vs local = the Dask throughput / the local one at the same width.
3. **projection**: hours for 2,000 students on N workers = 2000 / (throughput(1 worker) x N x
   efficiency), assuming the 1 -> 2 efficiency holds at N (not measured beyond 2) and ignoring the
   client's publishing (measured in step 2's runs, which include it).

The machine is shared (2 cores, other work running): the load average before and after each step is
printed and saved; read the numbers with it. Targets (quiet machine): <= 5 s CPU per typical
submission; >= 0.9 efficiency from 1 to 2 workers; Dask within 10 % of the local executor.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
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
from autograder.check.threshold_suite import solved, threshold_choices, with_failing  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
KINDS = ("strong", "typical", "weak")


def notebooks() -> dict:
    base = solved(SPEC)
    (_, at_fail), _ = threshold_choices(SPEC)
    return {"strong": with_failing(base, SPEC, set()), "typical": with_failing(base, SPEC, set(at_fail)),
            "weak": copy.deepcopy(SPEC.release)}


def make_class(folder: Path, kinds: list[str]) -> Path:
    nbs = notebooks()
    shutil.rmtree(folder, ignore_errors=True)
    for i, kind in enumerate(kinds):
        d = folder / f"s{i:03d}-{kind}" / SPEC.lesson_id
        d.mkdir(parents=True)
        nbformat.write(nbs[kind], str(d / SPEC.notebook_name))
    return folder


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def grade(subs: Path, out: Path, *extra: str) -> dict:
    """Run the command; wall and CPU seconds (this command and everything it waited for) and results."""
    shutil.rmtree(out, ignore_errors=True)
    cpu0, t0 = children_cpu(), time.monotonic()
    r = subprocess.run([sys.executable, "-m", "autograder", "grade", str(subs), "--out", str(out), "--quiet",
                        "--probe-seed", "1", *extra], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "MPLBACKEND": "Agg"})
    wall, cpu = time.monotonic() - t0, children_cpu() - cpu0
    if not (out / "results.json").exists():
        raise SystemExit(f"grading failed:\n{r.stdout}\n{r.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    if res["counts"]["errored"]:
        raise SystemExit(f"unexpected errors: {[(s['student'], s['reason']) for s in res['students'] if s['reason']]}")
    return {"wall": wall, "cpu": cpu, "seconds": [s["seconds"] for s in res["students"]], "n": len(res["students"])}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cost(tmp: Path) -> dict:
    """CPU and wall seconds of one submission of each kind, less a run that grades nothing."""
    empty = tmp / "empty"
    shutil.rmtree(empty, ignore_errors=True)
    (empty / "nobody" / SPEC.lesson_id).mkdir(parents=True)   # a student without a notebook: start-up only
    shutil.rmtree(tmp / "o", ignore_errors=True)
    cpu0 = children_cpu()
    subprocess.run([sys.executable, "-m", "autograder", "grade", str(empty), "--out", str(tmp / "o"), "--quiet",
                    "--probe-seed", "1", "--jobs", "1"], cwd=ROOT, capture_output=True, env={**os.environ, "MPLBACKEND": "Agg"})
    base = children_cpu() - cpu0
    out = {"startup_cpu": base}
    print(f"  start-up of the command alone (nothing graded): CPU {base:4.1f} s", flush=True)
    for kind in KINDS:
        one = grade(make_class(tmp / f"{kind}-1", [kind]), tmp / "o", "--jobs", "1")
        out[kind] = {"cpu_per_submission": one["cpu"] - base, "wall_per_submission": one["seconds"][0],
                     "load_average": load()}
        print(f"  {kind:<8} CPU {out[kind]['cpu_per_submission']:5.1f} s/submission, wall "
              f"{out[kind]['wall_per_submission']:5.1f} s (the student's grading time)   load {out[kind]['load_average']}",
              flush=True)
    return out


def throughput(tmp: Path, n: int, warm_up: bool) -> dict:
    from distributed import LocalCluster
    import dask
    subs = make_class(tmp / "class", [KINDS[i % 3] for i in range(n)])
    warm = make_class(tmp / "warm", ["strong", "weak"])
    out = {}
    for width in (1, 2):
        r = grade(subs, tmp / "o", "--jobs", str(width))
        out[f"local_{width}"] = {**r, "throughput": r["n"] / r["wall"], "load_average": load()}
        print(f"  local --jobs {width}: {n} in {r['wall']:6.1f} s = {60 * r['n'] / r['wall']:5.2f} submissions/min"
              f"   load {load()}", flush=True)
        with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
            cluster = LocalCluster(n_workers=width, processes=True, threads_per_worker=1, memory_limit=0,
                                   dashboard_address=None)
        try:
            if warm_up:
                grade(warm, tmp / "o", "--executor", "dask", "--scheduler", cluster.scheduler_address)
            r = grade(subs, tmp / "o", "--executor", "dask", "--scheduler", cluster.scheduler_address)
        finally:
            cluster.close()
        out[f"dask_{width}"] = {**r, "throughput": r["n"] / r["wall"], "load_average": load()}
        print(f"  dask {width} worker(s): {n} in {r['wall']:6.1f} s = {60 * r['n'] / r['wall']:5.2f} submissions/min"
              f"   load {load()}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6, help="class size for the throughput runs (default: %(default)s)")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="time the Dask runs from a fresh cluster (worker start-up and context building included)")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = {"machine": machine(), "n": args.n, "load_average_before": load()}
    print(f"machine: {os.cpu_count()} cores, shared (load average {load()}); lesson {SPEC.lesson_id}, "
          f"{len(SPEC.grade_cells)} grade cells; fast mode, sandbox on", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if not args.no_warm_up:   # template gradebook cache, disk caches
            grade(make_class(tmp / "warm0", ["strong"]), tmp / "o", "--jobs", "1")
        if not args.skip_cost:
            print("cost per submission (one submission of each kind, less a run that grades nothing):")
            result["cost"] = cost(tmp)
        print(f"throughput, class of {args.n}:")
        t = result["throughput"] = throughput(tmp, args.n, not args.no_warm_up)
        eff = {k: t[f"{k}_2"]["throughput"] / (2 * t[f"{k}_1"]["throughput"]) for k in ("local", "dask")}
        ratio = {w: t[f"dask_{w}"]["throughput"] / t[f"local_{w}"]["throughput"] for w in (1, 2)}
        result["efficiency_1_to_2"], result["dask_over_local"] = eff, ratio
        print(f"scaling efficiency 1 -> 2: local {eff['local']:.2f}, dask {eff['dask']:.2f} (target >= 0.9)")
        print(f"Dask / local throughput: 1 wide {ratio[1]:.2f}, 2 wide {ratio[2]:.2f} (target >= 0.9)")
        per_worker = t["dask_1"]["throughput"]
        e = min(1.0, eff["dask"])
        proj = {n: 2000 / (per_worker * n * e) / 3600 for n in (1, 2, 8, 32, 64, 128)}
        result["projection_hours_2000"] = proj
        print("projected hours for 2,000 students (Dask, measured 1-worker throughput, efficiency "
              f"{e:.2f} assumed to hold): " + ", ".join(f"{n} workers {h:.1f} h" for n, h in proj.items()))
        if "cost" in result:
            typ = result["cost"]["typical"]["cpu_per_submission"]
            print(f"CPU per typical submission {typ:.1f} s (target <= 5 s: {'met' if typ <= 5 else 'NOT met'})")
        result["load_average_after"] = load()
        print(f"load average after: {load()}")
        write_json(args.json, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
