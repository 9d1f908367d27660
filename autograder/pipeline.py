"""The grading pipeline: submissions in, results, feedback and a merged gradebook out.

For each submission, :func:`grade_one` runs these steps, one function each, in a process whose
grading context (:func:`open_context`: sandbox check, kernelspec, nbgrader workers) the executor
made (:mod:`autograder.executors`: ``--executor local``, ``--jobs N`` threads here, each with its own
nbgrader worker; ``--executor dask``, one task per submission on a Dask worker):

1. :func:`read_and_prepare`: read and check the notebook (corrupt, empty, oversized → ``errored``);
   put back deleted nbgrader cells; in ``fast`` mode drop the source notebook's demo cells. Integrity
   evidence about the submitted file (structure, static rules) comes from :mod:`autograder.integrity`;
2. :func:`make_folders`: the submission's own course folders and copy of the template gradebook;
3. :func:`start_recheck`: the out-of-kernel re-check (:mod:`autograder.recheck`), in its own
   sandbox, in parallel with
4. :func:`autograde`: the real ``nbgrader autograde`` by a worker outside the sandbox, with the
   kernel inside it (:mod:`autograder.sandbox`, :mod:`autograder.kernel`), under per-cell and
   per-submission limits; afterwards nothing of the sandbox is left;
5. :func:`read_grades`: the executed notebook and nbgrader's grades, checked against the lesson;
6. :func:`score_items`: item scores by :mod:`autograder.scoring` (hidden points need the re-check's
   pass; a failing check is a wrong answer, not a flag), and the failed property into the feedback;
7. :func:`decide_status`: score and evidence → totals, pass, ``graded`` or ``flagged``;
8. :func:`make_feedback`: ``nbgrader generate_feedback`` (hidden test code and tracebacks removed).

Then :func:`publish`, in the main thread of the grading command — the only writer of the results
folder, whichever executor graded (Dask workers send their files back as bytes) — replaces the
student's entry in ``<out>/gradebook.db`` and copies the autograded notebook and feedback, or removes
them if the student errored. Nothing in the results folder is written by a process that runs
student code.
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
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import gradebook, sandbox, scoring
from .offering import probe_seed as offering_probe_seed
from .discover import Submission, discover, sanitize
from .feedback_html import make_accessible
from .integrity import runtime_findings, submission_findings
from .kernel import KERNEL_NAME, write_kernelspec
from .notebook import OUTPUT_CAP_MARK, LessonSpec, SubmissionError, drop_demo_cells, load_spec, read_submission, repair
from .procs import Worker, WorkerDied, kill_tree, read_pidfile
from .recheck import ProbeSet, Running, finish, start
from .results import ERRORED, FLAGGED, GRADED, Finding, ItemResult, RunResult, StudentResult, write_results

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
    sandbox: bool = True                  # False only with --sandbox off (see sandbox.NOT_GUARANTEED)
    executor: str = "local"               # local | dask (autograder/executors.py)
    scheduler: str | None = None          # the Dask scheduler's address (executor dask)
    connect_timeout: float = 20.0         # seconds to reach the Dask scheduler

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
        return Worker([sys.executable, "-m", "autograder.nbgrader_worker"], self.env, self.run_dir / f"worker-{n}.log", ROOT)

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
    pool: WorkerPool | None          # None in a Dask client (the workers grade)
    cell_timeout: int
    submission_timeout: float
    protect: list[str] = field(default_factory=list)
    ipc_root: Path | None = None   # short folder for the kernels' socket folders (Unix socket paths <= 107 bytes)


@dataclass
class SubmissionFolders:
    """One submission's own folders. Only ``kernel_scratch`` and ``recheck/box`` are visible to
    (and writable by) student code, each in its own sandbox; everything else is the grader's."""
    root: Path
    student: str
    lesson: str
    ipc: Path | None = None    # socket folder of the sandboxed kernel (short path: Unix socket limit)

    @property
    def submitted(self) -> Path:
        return self.root / "submitted"

    @property
    def autograded(self) -> Path:
        return self.root / "autograded"

    @property
    def feedback(self) -> Path:
        return self.root / "feedback"

    @property
    def notebook_dir(self) -> Path:
        """Where nbgrader writes the executed notebook (and the kernel's working folder)."""
        return self.autograded / self.student / self.lesson

    @property
    def db(self) -> Path:
        return self.root / "gradebook.db"

    @property
    def kernel_scratch(self) -> Path:
        """Mounted over :attr:`notebook_dir` inside the kernel's sandbox (the notebook is not visible there)."""
        return self.root / "kernel-scratch"

    @property
    def pidfile(self) -> Path:
        return self.root / "kernel.pids"

    def kernel_guard_log(self, sandboxed: bool) -> tuple[str, Path]:
        """(path the kernel writes, path the grader reads) of the kernel guard's log."""
        if sandboxed:
            return str(self.notebook_dir / ".guard.jsonl"), self.kernel_scratch / ".guard.jsonl"
        return str(self.root / "guard-kernel.jsonl"), self.root / "guard-kernel.jsonl"


def _errored(res: StudentResult, reason: str) -> StudentResult:
    res.status, res.reason = ERRORED, reason
    res.score = res.percent = res.passed = None
    res.items, res.objectives = [], {}
    return res


def _failure_reason(answer: dict, cell_timeout: int) -> str:
    text = f"{answer.get('log', '')}\n{answer.get('error', '')}"
    if OUTPUT_CAP_MARK in text:
        line = next(l for l in text.splitlines() if OUTPUT_CAP_MARK in l)
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


# step 1
def read_and_prepare(sub: Submission, ctx: Context) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    """The submitted notebook (raises SubmissionError) and the version to grade: deleted nbgrader
    cells put back; in fast mode without the source notebook's demo cells."""
    if sub.problem:
        raise SubmissionError(sub.problem)
    nb = read_submission(sub.path, int(ctx.opts.max_notebook_mb * 1e6))
    prepared = repair(nb, ctx.spec)
    if ctx.opts.mode == "fast":
        prepared = drop_demo_cells(prepared, ctx.spec)
    return nb, prepared


# step 2
def make_folders(sub: Submission, prepared, ctx: Context) -> SubmissionFolders:
    """The submission's own course folders and copy of the template gradebook."""
    f = SubmissionFolders(ctx.run_dir / "subs" / sub.student, sub.student, ctx.spec.lesson_id)
    shutil.rmtree(f.root, ignore_errors=True)
    nb_dir = f.submitted / sub.student / ctx.spec.lesson_id
    nb_dir.mkdir(parents=True)
    nbformat.write(prepared, str(nb_dir / ctx.spec.notebook_name))
    shutil.copyfile(ctx.template_dir / "gradebook.db", f.db)
    if ctx.opts.sandbox:
        f.kernel_scratch.mkdir()
        f.ipc = Path(tempfile.mkdtemp(prefix="s-", dir=ctx.ipc_root))
    return f


# step 3 (runs while step 4 does)
def start_recheck(prepared, f: SubmissionFolders, ctx: Context) -> Running | None:
    """The out-of-kernel re-check of the answers, in its own sandbox (None without probes)."""
    if ctx.probes is None or not ctx.probes.probes:
        return None
    return start(prepared, ctx.spec, ctx.probes, f.root / "recheck", {"protect": ctx.protect},
                 timeout=min(ctx.submission_timeout, 120 + 30 * len(ctx.probes.probes)),
                 memory_bytes=int(ctx.opts.memory_gb * GB), case_timeout=20, cell_timeout=min(ctx.cell_timeout, 60),
                 sandboxed=ctx.opts.sandbox)


def _request(f: SubmissionFolders, ctx: Context, op: str) -> dict:
    opts = ctx.opts
    threads = str(max(1, (os.cpu_count() or 1) // max(1, opts.jobs)))
    writes, _ = f.kernel_guard_log(opts.sandbox)
    guard = {"protect": ctx.protect, "allow": [str(f.notebook_dir)], "log": writes}
    env = {"AUTOGRADER_GUARD": json.dumps(guard), "AUTOGRADER_KERNEL_PIDFILE": str(f.pidfile),
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if opts.sandbox:
        limits = {"memory_bytes": int(opts.memory_gb * GB), "cpu_seconds": int(ctx.submission_timeout) + 60}
        env["AUTOGRADER_SANDBOX"] = json.dumps({"scratch": str(f.kernel_scratch), "ipc": str(f.ipc), "limits": limits})
    return {"op": op, "lesson": ctx.spec.lesson_id, "student": f.student,
            "submitted": str(f.submitted), "autograded": str(f.autograded), "feedback": str(f.feedback),
            "release": str(ctx.template_dir / "release"), "db": str(f.db),
            "cell_timeout": ctx.cell_timeout, "max_output_bytes": int(opts.max_output_mb * 1e6),
            "interrupt_grace": opts.interrupt_grace, "kernel_name": KERNEL_NAME,
            "ipc": str(f.ipc) if f.ipc else None, "env": env}


# step 4
def autograde(f: SubmissionFolders, ctx: Context) -> str | None:
    """``nbgrader autograde`` by a worker (outside the sandbox) with the kernel inside it; None on
    success, else why it failed. Afterwards no process of the kernel's sandbox is left."""
    worker = ctx.pool.take()
    try:
        answer = worker.request(_request(f, ctx, "autograde"), timeout=ctx.submission_timeout,
                                memory_bytes=int(ctx.opts.memory_gb * GB), pidfile=f.pidfile)
        return None if answer.get("ok") else _failure_reason(answer, ctx.cell_timeout)
    except WorkerDied as e:
        if e.reason == "wall-clock":
            return (f"grading took longer than {ctx.submission_timeout:.0f} s (an infinite loop that ignores "
                    "interrupts?); the kernel and its processes were killed")
        if e.reason == "memory":
            return f"the notebook used more than {ctx.opts.memory_gb:g} GB of memory; the kernel was killed"
        return f"the grader's nbgrader worker died ({e.reason}); see {worker.log_path}"
    finally:
        kill_tree(None, read_pidfile(f.pidfile))   # no kernel (no sandbox) outlives its submission
        ctx.pool.give(worker)


# step 5
def read_grades(f: SubmissionFolders, ctx: Context) -> tuple[nbformat.NotebookNode, dict]:
    """The executed notebook and nbgrader's grades, checked against the lesson (raises
    SubmissionError). Both were written by the worker, outside every sandbox."""
    spec = ctx.spec
    path = f.notebook_dir / spec.notebook_name
    if not path.exists():
        raise SubmissionError("nbgrader produced no autograded notebook (see the worker log)")
    graded_nb = nbformat.read(str(path), as_version=4)
    grades = gradebook.cell_grades(f.db, spec.lesson_id, f.student)
    for gid, g in grades.items():
        cell = spec.grade_cells.get(gid)
        if cell is None or abs(g.max_score - cell.points) > 1e-9 or not (0 <= (g.auto_score or 0) <= g.max_score + 1e-9):
            raise SubmissionError(f"nbgrader's gradebook does not match the lesson for grade cell {gid!r}")
    return graded_nb, grades


# step 6
def score_items(f: SubmissionFolders, spec: LessonSpec, grades: dict, verdicts: dict) -> tuple[list[ItemResult], list[Finding]]:
    """Per-item scores by the one scoring rule (:func:`autograder.scoring.score_items`): the hidden
    points need the out-of-kernel check's pass; a failing check sets them to 0 in the submission's
    gradebook and names the failed property in its feedback. Disagreements are notes, not flags."""
    items, zero, notes = scoring.score_items(spec, grades, verdicts)
    gradebook.zero_cells(f.db, spec.lesson_id, f.student, zero)
    scoring.annotate_feedback(f.notebook_dir / spec.notebook_name, spec, items, verdicts)
    return items, notes


# step 7
def decide_status(res: StudentResult, spec: LessonSpec, findings: list[Finding]) -> None:
    """Score + evidence -> totals, pass and status (``graded`` or ``flagged``)."""
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
        res.reason = f"integrity evidence: {', '.join(sorted({f.rule for f in flags}))}"


# step 8
def make_feedback(f: SubmissionFolders, ctx: Context, res: StudentResult) -> None:
    """``nbgrader generate_feedback`` (hidden tests removed), then the accessibility fixes."""
    worker = ctx.pool.take()
    try:
        fb = worker.request(_request(f, ctx, "feedback"), timeout=300, memory_bytes=int(ctx.opts.memory_gb * GB))
        page = f.feedback / f.student / ctx.spec.lesson_id / (Path(ctx.spec.notebook_name).stem + ".html")
        if not fb.get("ok"):
            res.notes.append("feedback generation failed: " + _failure_reason(fb, ctx.cell_timeout))
        elif page.exists():   # WCAG 2.1 AA fixes for nbgrader's feedback template
            page.write_text(make_accessible(page.read_text(encoding="utf-8")), encoding="utf-8")
    except WorkerDied as e:
        res.notes.append(f"feedback generation failed: worker {e.reason}")
    finally:
        ctx.pool.give(worker)


def grade_one(sub: Submission, ctx: Context) -> StudentResult:
    """Grade one submission through the steps above (never raises for problems of the submission)."""
    t0 = time.monotonic()
    spec, opts = ctx.spec, ctx.opts
    res = StudentResult(sub.student, sub.submitted_as, GRADED, notebook=str(sub.path or ""))
    f = None
    try:
        try:
            nb, prepared = read_and_prepare(sub, ctx)
        except SubmissionError as e:
            return _errored(res, str(e))
        findings = submission_findings(nb, spec, opts.sandbox)
        f = make_folders(sub, prepared, ctx)
        running = start_recheck(prepared, f, ctx)
        failure = autograde(f, ctx)
        verdicts, cell_notes = finish(running, ctx.probes, spec) if running else ({}, [])
        findings += runtime_findings(f.kernel_guard_log(opts.sandbox)[1], running.guard_log if running else None)
        res.evidence = [x.as_dict() for x in findings]
        res.notes = [f"re-check: {n}" for n in cell_notes[:10]]
        if failure:
            return _errored(res, failure)
        try:
            graded_nb, grades = read_grades(f, ctx)
        except SubmissionError as e:
            return _errored(res, str(e))
        res.autograde_score = sum((g.auto_score or 0.0) for g in grades.values())
        timed_out = _timeouts(graded_nb)
        if timed_out:   # nbgrader graded the rest; its partial total is kept as information only
            return _errored(res, f"{', '.join(timed_out)} exceeded the {ctx.cell_timeout} s per-cell time limit "
                                 f"(infinite loop?) and was interrupted; nbgrader's partial score "
                                 f"{res.autograde_score:g}/{spec.total_points:g} is not counted")
        res.items, recheck_findings = score_items(f, spec, grades, verdicts)
        findings += recheck_findings
        decide_status(res, spec, findings)
        if opts.feedback:
            make_feedback(f, ctx, res)
        return res
    except Exception as e:  # a bug in the grader for this one student must not stop the batch
        import traceback
        return _errored(res, f"internal grader error ({type(e).__name__}: {e}); please report: "
                             + traceback.format_exc(limit=3).replace("\n", " | ")[-600:])
    finally:
        if f is not None and f.ipc is not None:
            shutil.rmtree(f.ipc, ignore_errors=True)
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


class SandboxUnavailable(RuntimeError):
    """The sandbox was required (the default) but ``bwrap ... true`` failed."""


def open_context(spec: LessonSpec, opts: Options, run_dir: Path, tmpl: Path, probes: ProbeSet | None,
                 jobs: int) -> Context:
    """The grading context of one process that runs :func:`grade_one` (``jobs`` submissions at a time).

    Checks the sandbox (fail closed: raises :class:`SandboxUnavailable`), writes the kernelspec and
    starts ``jobs`` nbgrader workers. Made once by the local executor, and once per Dask worker
    process by :mod:`autograder.executors`. Close it with :func:`close_context`.
    """
    if opts.sandbox:   # fail closed: no student code runs unless the sandbox demonstrably works
        ok, why = sandbox.probe(run_dir)
        if not ok:
            raise SandboxUnavailable(
                f"the bubblewrap sandbox does not work on this machine ({why}). Install it (Debian/Ubuntu: "
                "apt-get install bubblewrap) or, where that is impossible (no user namespaces, e.g. macOS), "
                "grade with --sandbox off and read what it then does not guarantee")
    write_kernelspec(run_dir / "jupyter", sandboxed=opts.sandbox)
    env = tool_env({"JUPYTER_PATH": str(run_dir / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""),
                    "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, jobs)))})
    pool = WorkerPool(max(1, jobs), run_dir, env)
    # the grader's own code is public; its work folder (gradebooks, other students' files) is not
    protect = [str(ROOT / "solutions"), str(ROOT / ".git"), str(WORK), str(run_dir), str(opts.out), str(tmpl)]
    ipc_root = Path(tempfile.mkdtemp(prefix="agk-")) if opts.sandbox else None
    return Context(spec, opts, run_dir, tmpl, probes, pool, opts.resolved_cell_timeout(),
                   opts.resolved_submission_timeout(), protect, ipc_root)


def close_context(ctx: Context) -> None:
    """Stop the context's nbgrader workers and remove its socket folders."""
    if ctx.pool is not None:
        ctx.pool.stop()
    if ctx.ipc_root is not None:
        shutil.rmtree(ctx.ipc_root, ignore_errors=True)


def grade(submissions: Path, opts: Options) -> RunResult:
    """Grade everything under ``submissions``; write ``results.{json,csv}``, feedback and gradebook to ``opts.out``.

    The submissions are graded by an executor (:mod:`autograder.executors`: ``local``, this
    machine's threads and nbgrader workers, or ``dask``, a Dask cluster); this process is the only
    writer of the results folder: it publishes each result as it arrives. Submissions whose
    identical notebook was already graded with the same settings into ``opts.out`` (an interrupted
    run) are not graded again (:func:`autograder.executors.already_graded`).
    """
    import nbgrader
    from . import executors
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    spec = load_spec(opts.lesson)
    opts.out = Path(opts.out).resolve()
    opts.work_root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(opts.work_root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True)
    warnings = [f"items in the lesson metadata without grade cells in the notebook (not graded): {', '.join(spec.missing_items)}"
                ] if spec.missing_items else []
    ex = None
    try:
        tmpl = template(spec)
        seed = opts.probe_seed if opts.probe_seed is not None else offering_probe_seed()
        probes = ProbeSet.build(spec, seed) if opts.recheck else None
        # connects to the cluster / checks the sandbox before anything is written to opts.out
        ex = executors.make(opts, spec, run_dir, tmpl, probes)
        ctx = ex.ctx
        subs = _roster(opts.roster, discover(Path(submissions), spec.lesson_id, spec.notebook_name, run_dir))
        out_db = opts.out / "gradebook.db"
        w = gradebook.ensure_merged(out_db, tmpl / "gradebook.db", spec.lesson_id)
        if w:
            warnings.append(w)
        # ---- seam for autograder/store.py: what is already stored, and the one writer ----
        journal = executors.Journal(opts.out, executors.settings_key(opts, seed))
        results: list[StudentResult] = list(journal.already_graded(subs).values())
        done = {r.student for r in results}
        todo = [s for s in subs if s.student not in done]
        progress = executors.Progress(len(subs), len(results), f"grading {spec.lesson_id}", opts.progress,
                                      ex.describe())

        def on_result(r: StudentResult, sub: Submission) -> None:   # main thread only
            publish(r, ctx, out_db)
            journal.record(r, sub)
            results.append(r)
            progress.update(r)

        ex.run(todo, on_result, progress)
        progress.close()
        results.sort(key=lambda r: r.student)
        items = {i: {"objective": spec.objective(i), "max_score": spec.item_points(i),
                     "probe": bool(probes and i in probes.probes)} for i in spec.items}
        run = RunResult(spec.lesson_id, spec.meta.passing_threshold, opts.mode, seed, spec.total_points, items,
                        spec.meta.objectives, spec.missing_items, results, nbgrader.__version__, started,
                        round(time.monotonic() - t0, 2), opts.jobs, warnings)
        write_results(run, opts.out)
        return run
    finally:
        if ex is not None:
            ex.close()
        if not opts.keep_work:
            shutil.rmtree(run_dir, ignore_errors=True)
