"""Command line: ``python -m autograder grade SUBMISSIONS --lesson <id> --out results/``.

Exit codes: 0 every student graded; 2 at least one student errored; 3 none errored but at least
one flagged (read the evidence); 1 the run itself could not start (bad arguments or input).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from residual_bandwidth.course import DEFAULT_LESSON
    ap = argparse.ArgumentParser(prog="python -m autograder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="autograde a folder or zip of submissions",
                       description="Autograde submissions with nbgrader, re-check answers outside the kernel, "
                                   "write results.csv / results.json, feedback and a merged gradebook.")
    g.add_argument("submissions", type=Path,
                   help="folder of <student>/<lesson>/<notebook> or <student>.ipynb, or an LMS zip")
    g.add_argument("--lesson", default=DEFAULT_LESSON, help="lesson id (default: %(default)s)")
    g.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: %(default)s)")
    g.add_argument("--jobs", "-j", type=int, default=1, help="submissions graded in parallel (default: 1)")
    g.add_argument("--mode", choices=("fast", "full"), default="fast",
                   help="fast: drop the source notebook's demo cells before grading (graded cells are "
                        "self-contained); full: run the whole notebook (default: fast)")
    g.add_argument("--cell-timeout", type=int, default=None,
                   help="seconds per cell (default: Execute.timeout from nbgrader_config.py)")
    g.add_argument("--timeout", type=float, default=None,
                   help="wall-clock seconds per submission before its kernel is killed (default: 600 fast, 1800 full)")
    g.add_argument("--memory-gb", type=float, default=4.0, help="memory per submission (default: %(default)s)")
    g.add_argument("--max-notebook-mb", type=float, default=50.0, help="largest accepted notebook file")
    g.add_argument("--max-output-mb", type=float, default=8.0, help="most output one cell may print")
    g.add_argument("--probe-seed", type=int, default=None,
                   help="seed of the re-check's hidden inputs (default: probe_seed in autograder/offering.toml; recorded in results.json)")
    g.add_argument("--no-recheck", action="store_true", help="skip the out-of-kernel re-check (not recommended)")
    g.add_argument("--no-feedback", action="store_true", help="skip generating feedback HTML")
    g.add_argument("--roster", type=Path, default=None,
                   help="file with one student id per line: students without a submission are reported as errored")
    g.add_argument("--keep-work", action="store_true", help="keep the per-submission work folders (debugging)")
    g.add_argument("--work-root", type=Path, default=None,
                   help="where per-run work folders go (default: autograder/work/runs, git-ignored)")
    g.add_argument("--sandbox", choices=("on", "off"), default="on",
                   help="on (default): every process running student code runs in a bubblewrap sandbox, and grading "
                        "refuses to start if `bwrap` does not work; off: no OS sandbox (machines without user "
                        "namespaces), prints what is then not guaranteed")
    g.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local (default): --jobs submissions at a time on this machine; dask: one task per "
                        "submission on the Dask cluster at --scheduler (every worker needs this repository at the "
                        "same commit and bubblewrap; see autograder/README.md section 7)")
    g.add_argument("--scheduler", default=None, metavar="tcp://HOST:8786",
                   help="address of the Dask scheduler (with --executor dask)")
    g.add_argument("--connect-timeout", type=float, default=20.0,
                   help="seconds to wait for the Dask scheduler before giving up (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    m = sub.add_parser("merge", help="combine results folders graded separately (shards) into one",
                       description="Merge the --out folders of several grading runs (e.g. one per machine) into "
                                   "OUT, refusing students graded twice and shards of another lesson version.")
    m.add_argument("out", type=Path, help="new (or empty) results folder")
    m.add_argument("shards", type=Path, nargs="+", help="results folders of the grading runs")
    return ap


def _summary(run) -> str:
    c = run.counts
    lines = [f"{run.lesson}: {len(run.students)} submissions in {run.seconds:.1f} s "
             f"(jobs {run.jobs}, mode {run.mode}, probe seed {run.probe_seed}): "
             f"{c['graded']} graded, {c['flagged']} flagged, {c['errored']} errored"]
    width = max([len(s.student) for s in run.students] + [7])
    for s in run.students:
        score = "" if s.score is None else f"{s.score:g}/{s.max_score:g} {s.percent:5.1f}% {'pass' if s.passed else 'FAIL'}"
        lines.append(f"  {s.student:<{width}} {s.status:<8} {score:<24} {s.reason[:110]}")
    for w in run.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, grade, print a summary; return the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "merge":
        from .merge import MergeError, merge
        try:
            run = merge(args.out, args.shards)
        except MergeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"merged {len(args.shards)} shards into {args.out}: {len(run.students)} students "
              f"({', '.join(f'{v} {k}' for k, v in run.counts.items())})")
        return run.exit_code()
    from .discover import InputError
    from .executors import ExecutorUnavailable
    from .notebook import SpecError
    from .pipeline import Options, SandboxUnavailable, grade
    from .sandbox import NOT_GUARANTEED
    from residual_bandwidth.course import LessonMetadataError
    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 1
    opts = Options(lesson=args.lesson, out=args.out, jobs=args.jobs, mode=args.mode, cell_timeout=args.cell_timeout,
                   submission_timeout=args.timeout, memory_gb=args.memory_gb, max_notebook_mb=args.max_notebook_mb,
                   max_output_mb=args.max_output_mb, probe_seed=args.probe_seed, recheck=not args.no_recheck,
                   feedback=not args.no_feedback, keep_work=args.keep_work, progress=not args.quiet,
                   roster=args.roster, sandbox=args.sandbox == "on", executor=args.executor,
                   scheduler=args.scheduler, connect_timeout=args.connect_timeout)
    if args.scheduler and args.executor != "dask":
        print("error: --scheduler is for --executor dask", file=sys.stderr)
        return 1
    if args.work_root:
        opts.work_root = args.work_root.resolve()
    if not opts.sandbox:
        print(f"WARNING {NOT_GUARANTEED}", file=sys.stderr)
    try:
        run = grade(args.submissions, opts)
    except (InputError, SpecError, LessonMetadataError, SandboxUnavailable, ExecutorUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(_summary(run))
        print(f"results: {opts.out / 'results.csv'} and results.json; feedback under {opts.out / 'feedback'}")
    return run.exit_code()


if __name__ == "__main__":
    sys.exit(main())
