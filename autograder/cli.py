"""Command line: ``python -m autograder grade SUBMISSIONS --lesson <id> --out results/``, and
``export`` (regenerate every results file from the store) and ``override`` (a logged manual
adjustment of one item) on the same ``--out`` folder.

Exit codes of ``grade``: 0 every student of the batch graded; 2 at least one errored; 3 none errored
but at least one flagged (read the evidence); 1 the run itself could not start (bad arguments or
input, another run holds the folder with ``--no-wait``, a store from a newer grader).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m autograder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="autograde a folder or zip of submissions",
                       description="Autograde submissions with nbgrader, re-check answers outside the kernel, "
                                   "write results.csv / results.json, feedback and a merged gradebook.")
    g.add_argument("submissions", type=Path,
                   help="folder of <student>/<lesson>/<notebook> or <student>.ipynb, or an LMS zip")
    g.add_argument("--lesson", default=None, help="lesson id (default: the course's default lesson)")
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
    g.add_argument("--max-total-output-mb", type=float, default=32.0,
                   help="most output the whole notebook may produce (display updates and widget messages count)")
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
    g.add_argument("--regrade", action="store_true",
                   help="grade every submission, also those the store already has graded from the same file with "
                        "the same grader version, mode and probe seed (default: skip them, so a killed run resumes)")
    g.add_argument("--late", action="store_true", help="mark every submission of this batch late (late column)")
    g.add_argument("--drop-overrides", action="store_true",
                   help="re-graded students lose their manual overrides (default: overrides survive re-grades)")
    g.add_argument("--no-wait", action="store_true",
                   help="stop (exit 1) instead of waiting when another run is using the --out folder")
    g.add_argument("--cgroups", choices=("auto", "require", "off"), default="auto",
                   help="per-submission cgroup with an equal CPU share, a CPU quota and memory/task limits "
                        "(autograder/isolate/cgroups.py). auto (default): used when available, else a warning in the results; "
                        "require: refuse to grade without; off: not used")
    g.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local (default): --jobs submissions at a time on this machine; dask: one task per "
                        "submission on the Dask cluster at --scheduler (every worker needs this repository at the "
                        "same commit and bubblewrap; see autograder/README.md section 7)")
    g.add_argument("--scheduler", default=None, metavar="tcp://HOST:8786",
                   help="address of the Dask scheduler (with --executor dask)")
    g.add_argument("--connect-timeout", type=float, default=20.0,
                   help="seconds to wait for the Dask scheduler before giving up (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    e = sub.add_parser("export", help="regenerate every results file from the results store",
                       description="Rewrite results.csv/json, objectives.csv, items.csv and the LMS grade files of "
                                   "--out from its store (grades.sqlite), with the manual overrides applied.")
    e.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: %(default)s)")
    e.add_argument("--lesson", default=None, help="lesson id (needed only if the store holds several)")
    e.add_argument("--no-wait", action="store_true", help="stop instead of waiting for a run using --out")
    o = sub.add_parser("override", help="set one item's points for one student by hand (logged, survives re-grades)",
                       description="A manual adjustment: STUDENT's ITEM scores POINTS (0 to the item's maximum) in "
                                   "every export and in gradebook.db, logged with who, when and why. It survives "
                                   "re-grades unless `grade --drop-overrides`; `--clear` removes it.")
    o.add_argument("student", help="student id as in results.csv")
    o.add_argument("item", help="item name as in results.json / items.csv (e.g. checkpoint_1)")
    o.add_argument("points", nargs="?", type=float, default=None, help="the item's new points (omit with --clear)")
    o.add_argument("--reason", required=True, help="why (kept in the log and shown in results.json)")
    o.add_argument("--by", default=None, help="who (default: the login user)")
    o.add_argument("--clear", action="store_true", help="drop this item's active override instead")
    o.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: %(default)s)")
    o.add_argument("--lesson", default=None, help="lesson id (needed only if the store holds several)")
    o.add_argument("--no-wait", action="store_true", help="stop instead of waiting for a run using --out")
    sub.add_parser("formgrader", help="open nbgrader's formgrader on a results folder (--out DIR; see "
                                      "python -m autograder formgrader --help)", add_help=False)
    return ap


def _summary(run) -> str:
    from autograder.results.textsafe import clean
    batch = set(run.batch if run.batch is not None else [s.student for s in run.students])
    mine = [s for s in run.students if s.student in batch]
    c = {k: sum(1 for s in mine if s.status == k) for k in ("graded", "flagged", "errored")}
    lines = [f"{run.lesson}: {len(mine)} submissions in {run.seconds:.1f} s "
             f"(jobs {run.jobs}, mode {run.mode}, probe seed {run.probe_seed}): "
             f"{c['graded']} graded, {c['flagged']} flagged, {c['errored']} errored"
             + (f"; {len(run.skipped)} already graded (same file and grader), skipped — --regrade grades them again"
                if run.skipped else "")]
    width = max([len(s.student) for s in mine] + [7])
    for s in mine:
        score = "" if s.score is None else f"{s.score:g}/{s.max_score:g} {s.percent:5.1f}% {'pass' if s.passed else 'FAIL'}"
        extra = " (override)" if s.overrides else ""
        lines.append(clean(f"  {s.student:<{width}} {s.status:<8} {score:<24} {s.reason[:110]}{extra}"))
    t = run.counts
    lines.append(f"the results store now holds {len(run.students)} students: {t['graded']} graded, {t['flagged']} "
                 f"flagged, {t['errored']} errored")
    for w in run.warnings:
        lines.append(clean(f"warning: {w}"))
    return "\n".join(lines)


def _export(args) -> int:
    from autograder.results.exports import export_all
    from autograder.results.store import StoreError, open_locked
    if not (args.out / "grades.sqlite").exists():
        print(f"error: {args.out} has no results store (grades.sqlite): grade into it first", file=sys.stderr)
        return 1
    try:
        with open_locked(args.out, wait=not args.no_wait) as store:
            run = export_all(store, args.out, args.lesson)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {len(run.students)} students of {run.lesson} from {args.out / 'grades.sqlite'} into {args.out}")
    return 0


def _override(args) -> int:
    from autograder.results.exports import export_all
    from autograder.results.store import StoreError, login_user, open_locked
    from autograder.results.textsafe import clean
    if not (args.out / "grades.sqlite").exists():
        print(f"error: {args.out} has no results store (grades.sqlite): grade into it first", file=sys.stderr)
        return 1
    if (args.points is None) != args.clear:
        print("error: give POINTS, or --clear to remove the override", file=sys.stderr)
        return 1
    reason, by = clean(args.reason).strip(), clean(args.by or login_user()).strip()
    if not reason:
        print("error: --reason must say why", file=sys.stderr)
        return 1
    try:
        with open_locked(args.out, wait=not args.no_wait) as store:
            lessons = store.lessons()
            lesson = args.lesson or (lessons[0] if len(lessons) == 1 else None)
            if lesson is None:
                raise StoreError(f"the store holds lessons {', '.join(lessons)}: say which with --lesson")
            row = store.latest_of(lesson, args.student)
            if row is None:
                raise StoreError(f"no student {args.student!r} in {lesson} (see results.csv for the ids)")
            if row["status"] == "errored":
                raise StoreError(f"{args.student} errored in their latest grading ({row['reason'][:200]}); an "
                                 "override needs a graded notebook: fix the submission and grade it first")
            items = {i["item"]: i for i in json.loads(row["result"])["items"]}
            if args.item not in items:
                raise StoreError(f"no item {args.item!r}; items: {', '.join(items)}")
            it = items[args.item]
            db = args.out / "gradebook.db"
            if args.clear:
                n = store.drop_overrides(lesson, [args.student], by, reason, item=args.item)
                if not n:
                    raise StoreError(f"{args.student} has no active override of {args.item}")
                if db.exists():   # back to the computed per-cell scores (a refuted hidden cell stays 0)
                    from autograder.results import gradebook
                    from autograder.check.scoring import is_hidden_part
                    computed = {g: (0.0 if it.get("zeroed") and is_hidden_part(g) else p) for g, p in it["parts"].items()}
                    gradebook.set_item_points(db, lesson, args.student, list(it["parts"]), None, computed)
                what = f"cleared the override of {args.item} for {args.student}"
            else:
                if not 0 <= args.points <= it["max_score"] or args.points != args.points:
                    raise StoreError(f"{args.item} is worth 0 to {it['max_score']:g} points, not {args.points:g}")
                store.add_override(lesson, args.student, args.item, args.points, reason, by)
                if db.exists():   # formgrader and `nbgrader export` show it too
                    from autograder.results import gradebook
                    gradebook.set_item_points(db, lesson, args.student, list(it["parts"]), args.points)
                what = (f"{args.student} {args.item}: {args.points:g}/{it['max_score']:g} "
                        f"(computed {it['score']:g}) by {by}: {reason}")
            run = export_all(store, args.out, lesson)
            page, problem = None, ""
            if (args.out / "autograded" / args.student / lesson).is_dir():   # graded with feedback
                try:   # the student's feedback page shows the store's grade too
                    from autograder.ingest.notebook import load_spec
                    from autograder.pipeline import WORK, refresh_feedback
                    res = next(s for s in run.students if s.student == args.student)
                    page = refresh_feedback(args.out, load_spec(lesson), res, WORK / "runs")
                except Exception as e:   # the override stands; say why the page was not written
                    problem = f"{type(e).__name__}: {e}"
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{what}; results files regenerated in {args.out}")
    if page is not None:
        print(f"feedback page written again: {page}")
    else:
        print(f"warning: the feedback page of {args.student} was not written again "
              f"({problem or 'graded without feedback'}); it shows the grader's score", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, grade, print a summary; return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["formgrader"]:   # its own options (autograder/results/formgrader.py)
        from autograder.results.formgrader import main as formgrader
        return formgrader(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "override":
        return _override(args)
    from autograder.ingest.discover import InputError
    from autograder.executors import ExecutorUnavailable
    from autograder.ingest.notebook import SpecError
    from autograder.pipeline import Options, SandboxUnavailable, grade
    from autograder.isolate.sandbox import NOT_GUARANTEED
    from autograder.results.store import StoreError
    from residual_bandwidth.course import DEFAULT_LESSON, LessonMetadataError
    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 1
    opts = Options(lesson=args.lesson or DEFAULT_LESSON, out=args.out, jobs=args.jobs, mode=args.mode, cell_timeout=args.cell_timeout,
                   submission_timeout=args.timeout, memory_gb=args.memory_gb, max_notebook_mb=args.max_notebook_mb,
                   max_output_mb=args.max_output_mb, max_total_output_mb=args.max_total_output_mb, probe_seed=args.probe_seed, recheck=not args.no_recheck,
                   feedback=not args.no_feedback, keep_work=args.keep_work, progress=not args.quiet,
                   roster=args.roster, sandbox=args.sandbox == "on", regrade=args.regrade, late=args.late,
                   drop_overrides=args.drop_overrides, wait=not args.no_wait, cgroups=args.cgroups,
                   executor=args.executor, scheduler=args.scheduler, connect_timeout=args.connect_timeout)
    if args.scheduler and args.executor != "dask":
        print("error: --scheduler is for --executor dask", file=sys.stderr)
        return 1
    if args.work_root:
        opts.work_root = args.work_root.resolve()
    if not opts.sandbox:
        print(f"WARNING {NOT_GUARANTEED}", file=sys.stderr)
    from autograder.isolate.procs import limit_address_space   # the main process loads what workers wrote: bounded
    print(f"isolation: {limit_address_space(int((3 + 0.125 * opts.jobs) * 1024**3))}", file=sys.stderr)
    try:
        run = grade(args.submissions, opts)
    except (InputError, SpecError, LessonMetadataError, SandboxUnavailable, StoreError, ExecutorUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(_summary(run))
        print(f"results: {opts.out / 'results.csv'} and results.json (from the whole store, {opts.out / 'grades.sqlite'}); "
              f"feedback under {opts.out / 'feedback'}")
    return run.exit_code()


if __name__ == "__main__":
    sys.exit(main())
