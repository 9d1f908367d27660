"""The grading pipeline: submissions in, results, feedback and a merged gradebook out.

For each submission (``--jobs N`` at a time, each in its own thread with its own nbgrader worker):

1. read and check the notebook (corrupt, empty, oversized → ``errored``);
2. collect integrity evidence: structure (edited / deleted / forged nbgrader cells) and static
   analysis of the student's code (:mod:`autograder.static`);
3. put back deleted nbgrader cells; in ``fast`` mode drop the source notebook's demo cells;
4. start the out-of-kernel re-check (:mod:`autograder.recheck`) in parallel with
5. the real ``nbgrader autograde`` in the submission's *own* course folders and gradebook (copied
   from the run's template), in the guarded kernel, under per-cell and per-submission limits;
6. read nbgrader's grades; score the items (:mod:`autograder.scoring`: hidden points need the
   re-check's pass); add the guard's log of blocked reads to the evidence;
7. ``nbgrader generate_feedback`` (hidden test code and tracebacks removed);
8. the main thread — the only writer — replaces the student's entry in ``<out>/gradebook.db`` and
   copies the autograded notebook and feedback, or removes them if the student errored.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import gradebook, scoring
from .offering import probe_seed as offering_probe_seed
from .discover import Submission, discover, sanitize
from .feedback_html import make_accessible
from .guard import read_log
from .kernel import KERNEL_NAME, write_kernelspec
from .notebook import (Finding, LessonSpec, SubmissionError, drop_demo_cells, load_spec, read_submission, repair,
                       structural_findings)
from .procs import Worker, WorkerDied, kill_tree, read_pidfile
from .recheck import ProbeSet, finish, start
from .results import ERRORED, FLAGGED, GRADED, ItemResult, RunResult, StudentResult, write_results
from .static import scan_notebook

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORK = ROOT / "autograder" / "work"
GB = 1024**3


@dataclass
class Options:
    """Settings of one grading run (the command-line flags)."""
    lesson: str
    out: Path
    jobs: int = 1
    mode: str = "fast"                    # fast | full
    cell_timeout: int | None = None       # None: nbgrader_config.py's Execute.timeout
    submission_timeout: float | None = None   # None: 600 s fast, 1800 s full
    memory_gb: float = 4.0
    max_notebook_mb: float = 50.0
    max_output_mb: float = 8.0
    interrupt_grace: int = 10
    probe_seed: int | None = None         # None: the offering's seed (autograder/offering.toml; recorded in results.json)
    recheck: bool = True
    feedback: bool = True
    keep_work: bool = False
    work_root: Path = WORK / "runs"
    progress: bool = True
    roster: Path | None = None

    def resolved_cell_timeout(self) -> int:
        """``--cell-timeout``, else ``Execute.timeout`` from the repository's nbgrader_config.py."""
        if self.cell_timeout:
            return int(self.cell_timeout)
        from traitlets.config import PyFileConfigLoader
        cfg = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
        return int(cfg.Execute.get("timeout", 120))

    def resolved_submission_timeout(self) -> float:
        """``--timeout``, else 600 s (fast) or 1800 s (full)."""
        return float(self.submission_timeout or (600 if self.mode == "fast" else 1800))


def tool_env(extra: dict | None = None) -> dict:
    """Environment for nbgrader and kernels: the venv first on PATH (nbgrader runs alembic)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MPLBACKEND"] = "Agg"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    env.update(extra or {})
    return env


# ---- the template gradebook --------------------------------------------------------------------------
def template(spec: LessonSpec) -> Path:
    """A gradebook + release folder for the lesson, made once per source-notebook version (cached).

    Made by the real ``nbgrader generate_assignment`` into a cache folder, never into ``lessons/``
    (regenerating there deletes the released folder when grade cells changed, see DESIGN.md).
    """
    import nbgrader
    h = hashlib.sha256()
    for p in (spec.source_path, ROOT / "nbgrader_config.py"):
        h.update(p.read_bytes())
    h.update(nbgrader.__version__.encode())
    final = WORK / "cache" / f"template-{spec.lesson_id}-{h.hexdigest()[:16]}"
    if (final / "gradebook.db").exists():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    r = subprocess.run([str(BIN / "nbgrader"), "generate_assignment", spec.lesson_id, "--force", "--log-level", "WARN",
                        f"--CourseDirectory.release_directory={tmp / 'release'}",
                        f"--CourseDirectory.db_url=sqlite:///{tmp / 'gradebook.db'}"],
                       cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not (tmp / "gradebook.db").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"nbgrader generate_assignment failed for the template gradebook:\n{r.stdout}\n{r.stderr}")
    try:
        tmp.rename(final)
    except OSError:  # another run made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---- workers -----------------------------------------------------------------------------------------
class WorkerPool:
    """``jobs`` nbgrader workers; a dead one is replaced on its next use."""

    def __init__(self, jobs: int, run_dir: Path, env: dict):
        self.run_dir, self.env = run_dir, env
        self.slots: queue.Queue = queue.Queue()
        self.started = 0
        self._lock = threading.Lock()
        for _ in range(jobs):
            self.slots.put(self._spawn())

    def _spawn(self) -> Worker:
        with self._lock:
            self.started += 1
            n = self.started
        return Worker([sys.executable, "-m", "autograder.nbjob"], self.env, self.run_dir / f"worker-{n}.log", ROOT)

    def take(self) -> Worker:
        """A live worker (a dead one is replaced)."""
        w = self.slots.get()
        if not w.alive():
            w.close()
            w = self._spawn()
        return w

    def give(self, w: Worker) -> None:
        """Return a worker to the pool."""
        self.slots.put(w)

    def stop(self) -> None:
        """Stop every idle worker."""
        while not self.slots.empty():
            self.slots.get().stop()


# ---- one submission ----------------------------------------------------------------------------------
@dataclass
class Context:
    """What every submission's grading shares."""
    spec: LessonSpec
    opts: Options
    run_dir: Path
    template_dir: Path
    probes: ProbeSet | None
    pool: WorkerPool
    cell_timeout: int
    submission_timeout: float
    protect: list[str] = field(default_factory=list)


def _errored(res: StudentResult, reason: str) -> StudentResult:
    res.status, res.reason = ERRORED, reason
    res.score = res.percent = res.passed = None
    res.items, res.objectives = [], {}
    return res


def _failure_reason(answer: dict, cell_timeout: int) -> str:
    text = f"{answer.get('log', '')}\n{answer.get('error', '')}"
    if "[autograder] output limit exceeded" in text:
        line = next(l for l in text.splitlines() if "[autograder] output limit exceeded" in l)
        return "output too large: " + line.split("output limit exceeded:", 1)[-1].strip()
    if "kernel became unresponsive" in text or "UnresponsiveKernelError" in text:
        detail = next((l.split("UnresponsiveKernelError:", 1)[1].strip() for l in text.splitlines()
                       if "UnresponsiveKernelError:" in l), f"a cell ran past the {cell_timeout} s limit")
        return f"infinite loop that ignores interrupts: {detail}; the kernel was killed"
    if "DeadKernelError" in text or "Kernel died" in text:
        return ("the Python kernel died while running the notebook (a crash, os._exit()/sys.exit in a low-level "
                "library, or running out of memory)")
    if "CellTimeoutError" in text:
        return f"a cell exceeded the {cell_timeout} s time limit"
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith("[INFO]")]
    tail = " | ".join(lines[-3:])[:500]
    return f"nbgrader autograde failed: {tail or 'no message'}"


def _timeouts(nb) -> list[str]:
    """Cells that nbgrader interrupted for exceeding the per-cell time limit."""
    out = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error" and o.get("ename") in ("CellTimeoutError", "KeyboardInterrupt"):
                gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
                out.append(f"cell {i}" + (f" ({gid})" if gid else ""))
                break
    return out


def _guard(ctx: Context, allow: Path, log: Path) -> dict:
    return {"protect": ctx.protect, "allow": [str(allow)], "log": str(log)}


def grade_one(sub: Submission, ctx: Context) -> StudentResult:
    """Grade one submission (never raises for problems of the submission itself)."""
    t0 = time.monotonic()
    spec, opts = ctx.spec, ctx.opts
    res = StudentResult(sub.student, sub.submitted_as, GRADED, notebook=str(sub.path or ""))
    try:
        if sub.problem:
            return _errored(res, sub.problem)
        try:
            nb = read_submission(sub.path, int(opts.max_notebook_mb * 1e6))
        except SubmissionError as e:
            return _errored(res, str(e))
        findings: list[Finding] = structural_findings(nb, spec) + scan_notebook(nb, spec)
        prepared = repair(nb, spec)
        if opts.mode == "fast":
            prepared = drop_demo_cells(prepared, spec)

        sdir = ctx.run_dir / "subs" / sub.student
        shutil.rmtree(sdir, ignore_errors=True)
        sub_nb_dir = sdir / "submitted" / sub.student / spec.lesson_id
        sub_nb_dir.mkdir(parents=True)
        nbformat.write(prepared, str(sub_nb_dir / spec.notebook_name))
        db = sdir / "gradebook.db"
        shutil.copyfile(ctx.template_dir / "gradebook.db", db)
        work_dir = sdir / "autograded" / sub.student / spec.lesson_id

        running = None
        if ctx.probes is not None and ctx.probes.probes:
            running = start(prepared, spec, ctx.probes, sdir / "recheck", _guard(ctx, sdir / "recheck" / "sandbox",
                                                                              sdir / "guard-recheck.jsonl"),
                            timeout=min(ctx.submission_timeout, 120 + 30 * len(ctx.probes.probes)),
                            memory_bytes=int(opts.memory_gb * GB), case_timeout=20,
                            cell_timeout=min(ctx.cell_timeout, 60))

        pidfile = sdir / "kernel.pids"
        threads = str(max(1, (os.cpu_count() or 1) // max(1, opts.jobs)))
        req = {"op": "autograde", "lesson": spec.lesson_id, "student": sub.student,
               "submitted": str(sdir / "submitted"), "autograded": str(sdir / "autograded"),
               "feedback": str(sdir / "feedback"), "release": str(ctx.template_dir / "release"), "db": str(db),
               "cell_timeout": ctx.cell_timeout, "max_output_bytes": int(opts.max_output_mb * 1e6),
               "interrupt_grace": opts.interrupt_grace, "kernel_name": KERNEL_NAME,
               "env": {"AUTOGRADER_GUARD": json.dumps(_guard(ctx, work_dir, sdir / "guard-kernel.jsonl")),
                       "AUTOGRADER_KERNEL_PIDFILE": str(pidfile), "OMP_NUM_THREADS": threads,
                       "MKL_NUM_THREADS": threads}}
        worker = ctx.pool.take()
        failure = None
        try:
            answer = worker.request(req, timeout=ctx.submission_timeout, memory_bytes=int(opts.memory_gb * GB),
                                    pidfile=pidfile)
            if not answer.get("ok"):
                failure = _failure_reason(answer, ctx.cell_timeout)
        except WorkerDied as e:
            if e.reason == "wall-clock":
                failure = (f"grading took longer than {ctx.submission_timeout:.0f} s (an infinite loop that ignores "
                           "interrupts?); the kernel and its processes were killed")
            elif e.reason == "memory":
                failure = f"the notebook used more than {opts.memory_gb:g} GB of memory; the kernel was killed"
            else:
                failure = f"the grader's nbgrader worker died ({e.reason}); see {worker.log_path}"
        finally:
            kill_tree(None, read_pidfile(pidfile))   # no kernel outlives its submission
            ctx.pool.give(worker)

        verdicts, cell_notes = ({}, [])
        if running is not None:
            verdicts, cell_notes = finish(running, ctx.probes, spec)
        runtime = [Finding("runtime", "blocked-access", f"{where} guard", f"{e['event']}: {e['target']}")
                   for where, log in (("kernel", sdir / "guard-kernel.jsonl"), ("re-check", sdir / "guard-recheck.jsonl"))
                   for e in read_log(log) if e.get("blocked")]
        runtime += [Finding("runtime", "ran-command", f"{where} guard", f"{e['event']}: {e['target'][:200]}", flag=False)
                    for where, log in (("kernel", sdir / "guard-kernel.jsonl"),) for e in read_log(log)
                    if not e.get("blocked")]
        findings += runtime
        res.evidence = [f.as_dict() for f in findings]
        res.notes = [f"re-check: {n}" for n in cell_notes[:10]]

        if failure:
            return _errored(res, failure)
        graded_nb_path = work_dir / spec.notebook_name
        if not graded_nb_path.exists():
            return _errored(res, "nbgrader produced no autograded notebook (see the worker log)")
        graded_nb = nbformat.read(str(graded_nb_path), as_version=4)
        grades = gradebook.cell_grades(db, spec.lesson_id, sub.student)
        res.autograde_score = sum((g.auto_score or 0.0) for g in grades.values())
        timed_out = _timeouts(graded_nb)
        if timed_out:   # nbgrader graded the rest; its partial total is kept as information only
            return _errored(res, f"{', '.join(timed_out)} exceeded the {ctx.cell_timeout} s per-cell time limit "
                                 f"(infinite loop?) and was interrupted; nbgrader's partial score "
                                 f"{res.autograde_score:g}/{spec.total_points:g} is not counted")
        res.items, zero, disagreements = scoring.score_items(spec, grades, verdicts)
        findings += disagreements
        gradebook.zero_cells(db, spec.lesson_id, sub.student, zero)
        scoring.annotate_feedback(graded_nb_path, spec, res.items, verdicts)
        res.evidence = [f.as_dict() for f in findings]

        res.max_score = spec.total_points
        res.score = sum(i.score for i in res.items)
        res.percent = 100.0 * res.score / res.max_score if res.max_score else 0.0
        res.passed = res.score >= spec.meta.passing_threshold * res.max_score - 1e-9
        for lo in spec.objectives_present():
            its = [i for i in res.items if i.objective == lo]
            res.objectives[lo] = {"score": sum(i.score for i in its), "max_score": sum(i.max_score for i in its)}
        flags = [f for f in findings if f.flag]
        if flags:
            res.status = FLAGGED
            rules = sorted({f.rule for f in flags})
            res.reason = f"integrity evidence: {', '.join(rules)}"

        if opts.feedback:
            worker = ctx.pool.take()
            try:
                fb = worker.request({**req, "op": "feedback"}, timeout=300, memory_bytes=int(opts.memory_gb * GB))
                page = sdir / "feedback" / sub.student / spec.lesson_id / (Path(spec.notebook_name).stem + ".html")
                if not fb.get("ok"):
                    res.notes.append("feedback generation failed: " + _failure_reason(fb, ctx.cell_timeout))
                elif page.exists():   # WCAG 2.1 AA fixes for nbgrader's feedback template
                    page.write_text(make_accessible(page.read_text(encoding="utf-8")), encoding="utf-8")
            except WorkerDied as e:
                res.notes.append(f"feedback generation failed: worker {e.reason}")
            finally:
                ctx.pool.give(worker)
        return res
    except Exception as e:  # a bug in the grader for this one student must not stop the batch
        import traceback
        return _errored(res, f"internal grader error ({type(e).__name__}: {e}); please report: "
                             + traceback.format_exc(limit=3).replace("\n", " | ")[-600:])
    finally:
        res.seconds = round(time.monotonic() - t0, 2)


# ---- merging (main thread only) ---------------------------------------------------------------------
def publish(res: StudentResult, ctx: Context, out_db: Path) -> None:
    """Replace (graded/flagged) or remove (errored) the student's entry in the results folder."""
    spec, out = ctx.spec, ctx.opts.out
    sdir = ctx.run_dir / "subs" / res.student
    for kind in ("autograded", "feedback"):
        shutil.rmtree(out / kind / res.student / spec.lesson_id, ignore_errors=True)
        try:
            (out / kind / res.student).rmdir()   # only if no other lesson is in there
        except OSError:
            pass
    if res.status == ERRORED:
        gradebook.remove_student(out_db, spec.lesson_id, res.student)
    else:
        gradebook.merge_student(out_db, sdir / "gradebook.db", spec.lesson_id, res.student)
        for kind in ("autograded", "feedback"):
            src = sdir / kind / res.student / spec.lesson_id
            if src.exists():
                shutil.copytree(src, out / kind / res.student / spec.lesson_id)
        fb = out / "feedback" / res.student / spec.lesson_id / (Path(spec.notebook_name).stem + ".html")
        res.feedback = str(fb) if fb.exists() else ""
    if not ctx.opts.keep_work:
        shutil.rmtree(sdir, ignore_errors=True)


def _roster(path: Path | None, subs: list[Submission]) -> list[Submission]:
    if not path:
        return subs
    have = {s.student for s in subs}
    for line in Path(path).read_text().splitlines():
        name = line.split("#")[0].strip()
        if name and sanitize(name) not in have:
            subs.append(Submission(sanitize(name), name, None, "missing: no submission from this student"))
            have.add(sanitize(name))
    return subs


def grade(submissions: Path, opts: Options) -> RunResult:
    """Grade everything under ``submissions``; write ``results.{json,csv}``, feedback and gradebook to ``opts.out``."""
    import nbgrader
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    spec = load_spec(opts.lesson)
    opts.out = Path(opts.out).resolve()
    opts.work_root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(opts.work_root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True)
    warnings = [f"items in the lesson metadata without grade cells in the notebook (not graded): {', '.join(spec.missing_items)}"
                ] if spec.missing_items else []
    pool = None
    try:
        write_kernelspec(run_dir / "jupyter")
        env = tool_env({"JUPYTER_PATH": str(run_dir / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""),
                        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, opts.jobs)))})
        pool = WorkerPool(max(1, opts.jobs), run_dir, env)   # importing nbgrader overlaps with what follows
        tmpl = template(spec)
        seed = opts.probe_seed if opts.probe_seed is not None else offering_probe_seed()
        probes = ProbeSet.build(spec, seed) if opts.recheck else None
        subs = _roster(opts.roster, discover(Path(submissions), spec.lesson_id, spec.notebook_name, run_dir))
        out_db = opts.out / "gradebook.db"
        w = gradebook.ensure_merged(out_db, tmpl / "gradebook.db", spec.lesson_id)
        if w:
            warnings.append(w)
        # the grader's own code is public; its work folder (gradebooks, other students' files) is not
        protect = [str(ROOT / "solutions"), str(ROOT / ".git"), str(WORK), str(run_dir), str(opts.out), str(tmpl)]
        ctx = Context(spec, opts, run_dir, tmpl, probes, pool, opts.resolved_cell_timeout(),
                      opts.resolved_submission_timeout(), protect)
        results: list[StudentResult] = []
        bar = None
        if opts.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(subs), desc=f"grading {spec.lesson_id}", unit="nb", file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as ex:
            futures = {ex.submit(grade_one, s, ctx): s for s in subs}
            for fut in as_completed(futures):
                r = fut.result()
                publish(r, ctx, out_db)
                results.append(r)
                if bar:
                    bar.set_postfix_str(f"{r.student}: {r.status}", refresh=False)
                    bar.update(1)
        if bar:
            bar.close()
        results.sort(key=lambda r: r.student)
        items = {i: {"objective": spec.objective(i), "max_score": spec.item_points(i),
                     "probe": bool(probes and i in probes.probes)} for i in spec.items}
        run = RunResult(spec.lesson_id, spec.meta.passing_threshold, opts.mode, seed, spec.total_points, items,
                        spec.meta.objectives, spec.missing_items, results, nbgrader.__version__, started,
                        round(time.monotonic() - t0, 2), opts.jobs, warnings)
        write_results(run, opts.out)
        return run
    finally:
        if pool:
            pool.stop()
        if not opts.keep_work:
            shutil.rmtree(run_dir, ignore_errors=True)
