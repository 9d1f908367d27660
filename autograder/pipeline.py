"""The grading pipeline: submissions in, results, feedback and a merged gradebook out.

For each submission, :func:`grade_one` runs these steps, one function each, in a process whose
grading context (:func:`open_context`: sandbox check, kernelspec, nbgrader workers) the executor
made (:mod:`autograder.executors`: ``--executor local``, ``--jobs N`` threads here, each with its own
nbgrader worker; ``--executor dask``, one task per submission on a Dask worker):

1. :func:`read_and_prepare`: read and check the notebook (corrupt, empty, oversized → ``errored``);
   put back deleted nbgrader cells; in ``fast`` mode drop the source notebook's demo cells. Integrity
   evidence about the submitted file (structure, static rules) comes from :mod:`autograder.check.integrity`;
2. :func:`make_folders`: the submission's own course folders and copy of the template gradebook;
3. :func:`start_recheck`: the out-of-kernel re-check (:mod:`autograder.check.recheck`), in its own
   sandbox, in parallel with
4. :func:`autograde`: the real ``nbgrader autograde`` by a worker outside the sandbox, with the
   kernel inside it (:mod:`autograder.isolate.sandbox`, :mod:`autograder.isolate.kernel`), under per-cell and
   per-submission limits; a cell that times out, ignores the interrupt or kills the kernel costs its
   exercise only (the worker restarts the kernel and goes on; every cell is labelled with the
   student's own cell number by :func:`label_cells`); afterwards nothing of the sandbox is left;
5. :func:`read_grades`: the executed notebook and nbgrader's grades, checked against the lesson;
6. :func:`score_items`: item scores by :mod:`autograder.check.scoring` (hidden points need the re-check's
   pass; a failing check is a wrong answer, not a flag; a lost exercise scores 0 with a note naming
   it), and the failed property into the feedback;
7. :func:`decide_status`: score and evidence → totals, pass, ``graded`` or ``flagged``;
8. :func:`make_feedback`: ``nbgrader generate_feedback`` (hidden test code and tracebacks removed)
   with the course's page (:mod:`autograder.results.feedback_summary`: pass line, objectives, exercises by
   title); a collected submission's ``timestamp.txt``/``submission_secret.txt`` go next to it.

Then :func:`publish`, in the main thread of the grading command — the only writer of the results
folder and the store, whichever executor graded (Dask workers send their files back as bytes) —
replaces the student's entry in ``<out>/gradebook.db`` (with the student's manual overrides applied) and copies the
autograded notebook and feedback, or removes them if the student errored, and last records the
attempt in the results store (:mod:`autograder.results.store`, the commit point). After the run every results
file is regenerated from the whole store (:mod:`autograder.results.exports`). Nothing in the results folder
is written by a process that runs student code.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import queue
import re
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

from autograder.isolate import cgroups, sandbox
from autograder.results import feedback_summary, gradebook
from autograder.check import scoring
from autograder.results import store as results_store
from autograder.results.exports import export_all
from autograder.offering import probe_seed as offering_probe_seed
from autograder.ingest.discover import Submission, discover, student_id
from autograder.results.feedback_html import add_csp, make_accessible
from autograder.isolate.guard import PipeReader, read_log
from autograder.check.integrity import runtime_findings, submission_findings
from autograder.check.static import unparsed_cells_that_ran
from autograder.isolate.kernel import KERNEL_NAME, write_kernelspec
from autograder.ingest.notebook import (LABEL, OUTPUT_CAP_MARK, LessonSpec, SubmissionError, drop_demo_cells, grade_id, is_demo, load_spec,
                       read_submission, repair)
from autograder.isolate.procs import Worker, WorkerDied, kill_tree, read_pidfile
from autograder.check.recheck import ProbeSet, RegradeNeeded, Running, clean_text, finish, start
from autograder.results.records import ERRORED, FLAGGED, GRADED, Finding, ItemResult, RunResult, StudentResult

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
    max_total_output_mb: float = 32.0     # all output of one notebook (display updates, widget messages included)
    interrupt_grace: int = 10
    probe_seed: int | None = None         # None: the offering's seed (autograder/offering.toml; recorded in results.json)
    recheck: bool = True
    feedback: bool = True
    keep_work: bool = False
    work_root: Path = WORK / "runs"
    progress: bool = True
    roster: Path | None = None
    sandbox: bool = True                  # False only with --sandbox off (see sandbox.NOT_GUARANTEED)
    regrade: bool = False                 # grade even submissions the store has graded (same file and grader)
    late: bool = False                    # mark every submission of this batch late
    drop_overrides: bool = False          # re-graded students lose their manual overrides
    wait: bool = True                     # another run holds --out: wait (else stop with StoreBusy)
    cgroups: str = "auto"                 # auto: per-submission cgroups if available, else warn | require | off
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
    (regenerating there deletes the released folder when grade cells changed).
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
    cgroup_run: cgroups.RunGroup | None = None   # parent of the submissions' cgroups (None: not applied)


@dataclass
class SubmissionFolders:
    """One submission's own folders. Only ``kernel_scratch`` and ``recheck/box`` are visible to
    (and writable by) student code, each in its own sandbox; everything else is the grader's."""
    root: Path
    student: str
    lesson: str
    ipc: Path | None = None    # socket folder of the sandboxed kernel (short path: Unix socket limit)
    cgroup: cgroups.Group | None = None   # the submission's cgroup (kernel and re-check leaves)
    guard_reader: PipeReader | None = None   # the kernel guard's log (a FIFO read here, see guard.py)
    uid: int | None = None     # the sandboxed kernel's uid (the same after a restart: it owns the scratch files)

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

    @property
    def guard_fifo(self) -> Path:
        """The sandboxed kernel guard's log: a FIFO outside the sandbox; only its write end goes in."""
        return self.root / "guard-kernel.fifo"

    def kernel_guard_records(self) -> list[dict]:
        """What the kernel's guard logged (the FIFO's content, or the log file without the sandbox)."""
        if self.guard_reader is not None:
            self.guard_reader.finish()
            return self.guard_reader.records()
        return read_log(self.root / "guard-kernel.jsonl")


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




def label_cells(nb, spec: LessonSpec) -> None:
    """Label every cell of the notebook to grade (``metadata.autograder``): ``cell``, the student's own
    cell number (1-based, every cell counted; None for a cell the grader put back), ``role``
    (answer, test, locked, demo, added, markdown) and ``item``: an answer or test cell's exercise, and
    for a demo or added code cell the exercise whose cells surround it (None outside the exercises).
    The nbgrader worker reports timeouts and crashes with these labels; nothing else reads them."""
    roles, items = [], []
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in spec.grade_cells:
            role, item = "test", spec.grade_cells[gid].item
        elif gid in spec.answer_cells:
            role, item = "answer", spec.answer_cells[gid].item
        elif gid in spec.locked_cells:
            role, item = "locked", None
        elif cell.cell_type != "code":
            role, item = "markdown", None
        else:
            role, item = ("demo" if is_demo(cell, spec) else "added"), None
        roles.append(role)
        items.append(item)
    spans: dict[str, tuple[int, int]] = {}
    for i, item in enumerate(items):
        if item:
            spans[item] = (spans.get(item, (i, i))[0], i)
    for i, cell in enumerate(nb.cells):
        item = items[i] or next((it for it, (a, b) in spans.items() if a < i < b and roles[i] in ("demo", "added")), None)
        old = cell.metadata.get(LABEL)
        number = old.get("cell") if isinstance(old, dict) else None
        cell.metadata[LABEL] = {"cell": number, "role": roles[i], "item": item}


# step 1
def read_and_prepare(sub: Submission, ctx: Context) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    """The submitted notebook (raises SubmissionError) and the version to grade: deleted nbgrader
    cells put back; in fast mode without the source notebook's demo cells."""
    if sub.problem:
        raise SubmissionError(sub.problem)
    nb = read_submission(sub.path, int(ctx.opts.max_notebook_mb * 1e6))
    numbered = copy.deepcopy(nb)
    for k, cell in enumerate(numbered.cells, 1):   # the student's own cell numbers, through repair and drop
        cell.metadata[LABEL] = {"cell": k}
    prepared = repair(numbered, ctx.spec)
    if ctx.opts.mode == "fast":
        prepared = drop_demo_cells(prepared, ctx.spec)
    label_cells(prepared, ctx.spec)
    return nb, prepared


# nbgrader's exchange files of a collected submission (``nbgrader collect``): ``release_feedback``
# needs both next to the feedback page. Student-written, so checked before they are kept.
EXCHANGE_FILES = {
    "timestamp.txt": re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,9})?( ?[A-Z]{1,5}|[+-]\d{2}:?\d{2})?\s*"),
    "submission_secret.txt": re.compile(r"[A-Za-z0-9+/=_-]{8,200}\s*"),
}


def exchange_files(sub: Submission) -> dict[str, str]:
    """``timestamp.txt`` and ``submission_secret.txt`` next to the submitted notebook, when present,
    regular files, small and well-formed (else left out: the feedback then cannot be released
    through the exchange, and the grade is unaffected)."""
    out = {}
    folder = Path(sub.path).parent if sub.path else None
    for name, pattern in EXCHANGE_FILES.items():
        p = folder / name if folder else None
        try:
            if p is None or p.is_symlink() or not p.is_file() or p.stat().st_size > 256:
                continue
            text = p.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            continue
        if pattern.fullmatch(text):
            out[name] = text
    return out


# step 2
def make_folders(sub: Submission, prepared, ctx: Context) -> SubmissionFolders:
    """The submission's own course folders and copy of the template gradebook (with the exchange
    files of a collected submission, which nbgrader carries into the feedback folder)."""
    f = SubmissionFolders(ctx.run_dir / "subs" / sub.student, sub.student, ctx.spec.lesson_id)
    shutil.rmtree(f.root, ignore_errors=True)
    nb_dir = f.submitted / sub.student / ctx.spec.lesson_id
    nb_dir.mkdir(parents=True)
    nbformat.write(prepared, str(nb_dir / ctx.spec.notebook_name))
    for name, text in exchange_files(sub).items():
        (nb_dir / name).write_text(text, encoding="ascii")
    shutil.copyfile(ctx.template_dir / "gradebook.db", f.db)
    if ctx.opts.sandbox:
        f.kernel_scratch.mkdir()
        f.ipc = Path(tempfile.mkdtemp(prefix="s-", dir=ctx.ipc_root))
        f.guard_reader = PipeReader.fifo(f.guard_fifo)
        f.uid = sandbox.Box(f.kernel_scratch, "").uid
    if ctx.cgroup_run is not None:
        f.cgroup = ctx.cgroup_run.submission(sub.student)
    return f


# step 3 (runs while step 4 does)
def start_recheck(prepared, f: SubmissionFolders, ctx: Context, probes: ProbeSet | None = None,
                  folder: str = "recheck") -> Running | None:
    """The out-of-kernel re-check of the answers, in its own sandbox (None without probes)."""
    probes = probes or ctx.probes
    if probes is None or not probes.probes:
        return None
    return start(prepared, ctx.spec, probes, f.root / folder, {"protect": ctx.protect},
                 timeout=min(ctx.submission_timeout, 120 + 30 * len(ctx.probes.probes)),
                 memory_bytes=int(ctx.opts.memory_gb * GB), case_timeout=min(20, ctx.cell_timeout),
                 cell_timeout=min(ctx.cell_timeout, 60),
                 sandboxed=ctx.opts.sandbox, cgroup_procs=f.cgroup.procs_files("recheck") if f.cgroup else [])


def recheck_again(prepared, f: SubmissionFolders, ctx: Context, faults: list, verdicts: dict) -> tuple[dict, Running | None]:
    """After a cell lost the kernel or timed out, the re-check process may have met the same fault
    (``os._exit`` ends it too) before it checked the later items. Run it once more without the
    student cells that were lost and without the lost exercises' probes (they score 0 anyway), so
    the other exercises are checked: (verdicts merged, the second run, whose ``guard_records`` and
    ``forged`` hold its evidence)."""
    unchecked = [i for i, v in verdicts.items() if v.verdict == "error" and "before checking this item" in v.detail]
    lost = [x for x in faults if x.kind in scoring.LOST]
    if not unchecked or not lost or ctx.probes is None:
        return verdicts, None
    lost_items = {x.item for x in lost if x.item}
    lost_cells = {x.cell for x in lost if x.cell is not None and x.role in ("answer", "added")}
    keep = [i for i in ctx.probes.probes if i not in lost_items]
    if not keep:
        return verdicts, None
    p = ctx.probes
    subset = ProbeSet(p.seed, {i: p.probes[i] for i in keep}, {i: p.cases[i] for i in keep},
                      {i: p.expected[i] for i in keep}, {i: p.payload[i] for i in keep})
    nb = copy.deepcopy(prepared)
    spec = ctx.spec
    # without the lost cells, and without the lost exercises' test cells: the re-check runs the visible
    # tests too, and a crash in one (the test calling the student's function) would end it again
    nb.cells = [c for c in nb.cells if c.metadata.get(LABEL, {}).get("cell") not in lost_cells
                and not (grade_id(c) in spec.grade_cells and spec.grade_cells[grade_id(c)].item in lost_items)]
    running = start_recheck(nb, f, ctx, subset, "recheck-again")
    again, _ = finish(running, subset, ctx.spec)
    return {**verdicts, **{i: again[i] for i in keep}}, running


def _request(f: SubmissionFolders, ctx: Context, op: str) -> dict:
    opts = ctx.opts
    threads = str(max(1, (os.cpu_count() or 1) // max(1, opts.jobs)))
    guard = {"protect": ctx.protect, "allow": [str(f.notebook_dir)],
             "log": None if opts.sandbox else str(f.root / "guard-kernel.jsonl")}   # sandbox: the launcher passes the FIFO
    env = {"AUTOGRADER_GUARD": json.dumps(guard), "AUTOGRADER_KERNEL_PIDFILE": str(f.pidfile),
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if opts.sandbox:
        limits = {"memory_bytes": int(opts.memory_gb * GB), "cpu_seconds": int(ctx.submission_timeout) + 60}
        env["AUTOGRADER_SANDBOX"] = json.dumps({"scratch": str(f.kernel_scratch), "ipc": str(f.ipc), "limits": limits,
                                                "cgroup": f.cgroup.procs_files("kernel") if f.cgroup else [],
                                                "guard_fifo": str(f.guard_fifo), "uid": f.uid})
    return {"op": op, "lesson": ctx.spec.lesson_id, "student": f.student,
            "submitted": str(f.submitted), "autograded": str(f.autograded), "feedback": str(f.feedback),
            "release": str(ctx.template_dir / "release"), "db": str(f.db),
            "cell_timeout": ctx.cell_timeout, "max_output_bytes": int(opts.max_output_mb * 1e6),
            "max_total_output_bytes": int(opts.max_total_output_mb * 1e6),
            "interrupt_grace": opts.interrupt_grace, "kernel_name": KERNEL_NAME,
            "ipc": str(f.ipc) if f.ipc else None, "env": env}


# step 4
def autograde(f: SubmissionFolders, ctx: Context) -> tuple[str | None, list[scoring.Fault]]:
    """``nbgrader autograde`` by a worker (outside the sandbox) with the kernel inside it: (None on
    success, else why it failed; the cells that timed out, raised or lost the kernel — the worker
    restarts a lost kernel and goes on, see ``GuardedExecute``). Afterwards no process of the
    kernel's sandbox is left."""
    worker = ctx.pool.take()
    try:
        answer = worker.request(_request(f, ctx, "autograde"), timeout=ctx.submission_timeout,
                                memory_bytes=int(ctx.opts.memory_gb * GB), pidfile=f.pidfile)
        faults = scoring.read_faults(answer.get("faults"), ctx.spec)
        return (None if answer.get("ok") else _failure_reason(answer, ctx.cell_timeout)), faults
    except WorkerDied as e:
        if e.reason == "wall-clock":
            return (f"grading took longer than {ctx.submission_timeout:.0f} s (an infinite loop that ignores "
                    "interrupts?); the kernel and its processes were killed"), []
        if e.reason == "memory":
            return f"the notebook used more than {ctx.opts.memory_gb:g} GB of memory; the kernel was killed", []
        return f"the grader's nbgrader worker died ({e.reason}); see {worker.log_path}", []
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
    # what the worker wrote is bounded by the output caps; check before loading it into this process
    limit = (ctx.opts.max_notebook_mb + 2 * ctx.opts.max_total_output_mb) * 1e6
    if path.stat().st_size > limit:
        raise SubmissionError(f"the executed notebook is {path.stat().st_size / 1e6:.0f} MB, over the {limit / 1e6:.0f} MB "
                              "the grader loads (submitted notebook plus twice the output limit)")
    graded_nb = nbformat.read(str(path), as_version=4)
    grades = gradebook.cell_grades(f.db, spec.lesson_id, f.student)
    for gid, g in grades.items():
        cell = spec.grade_cells.get(gid)
        if cell is None or abs(g.max_score - cell.points) > 1e-9 or not (0 <= (g.auto_score or 0) <= g.max_score + 1e-9):
            raise SubmissionError(f"nbgrader's gradebook does not match the lesson for grade cell {gid!r}")
    return graded_nb, grades


# step 6
def score_items(f: SubmissionFolders, spec: LessonSpec, grades: dict, verdicts: dict,
                faults: list | None = None, cell_timeout: int = 0) -> tuple[list[ItemResult], list[Finding]]:
    """Per-item scores by the one scoring rule (:func:`autograder.check.scoring.score_items`): the hidden
    points need the out-of-kernel check's pass; a failing check sets them to 0 in the submission's
    gradebook and names the failed property in its feedback; an exercise whose cell timed out or
    lost the kernel scores 0 with a note (:func:`autograder.check.scoring.apply_faults`). Disagreements
    are notes, not flags."""
    items, zero, notes = scoring.score_items(spec, grades, verdicts)
    zero += scoring.apply_faults(items, spec, faults or [], cell_timeout)
    gradebook.zero_cells(f.db, spec.lesson_id, f.student, zero)
    scoring.annotate_feedback(f.notebook_dir / spec.notebook_name, spec, items, verdicts)
    return items, notes


# step 7
def decide_status(res: StudentResult, spec: LessonSpec, findings: list[Finding]) -> None:
    """Score + evidence -> totals, pass and status (``graded`` or ``flagged``)."""
    res.evidence = [f.as_dict() for f in findings]
    res.max_score = spec.total_points
    res.recompute(spec.meta.passing_threshold, spec.objectives_present())   # the one totals/pass rule
    flags = [f for f in findings if f.flag]
    if flags:
        res.status = FLAGGED
        res.reason = f"integrity evidence: {', '.join(sorted({f.rule for f in flags}))}"


# step 8
def make_feedback(f: SubmissionFolders, ctx: Context, res: StudentResult, summary: dict | None = None) -> None:
    """``nbgrader generate_feedback`` (hidden tests removed) with the course's page — ``summary``
    (:func:`autograder.results.feedback_summary.summary`) on top, cells named by exercise — then the
    accessibility fixes."""
    worker = ctx.pool.take()
    try:
        req = _request(f, ctx, "feedback")
        if summary:
            req["summary"] = summary
        fb = worker.request(req, timeout=300, memory_bytes=int(ctx.opts.memory_gb * GB))
        page = f.feedback / f.student / ctx.spec.lesson_id / (Path(ctx.spec.notebook_name).stem + ".html")
        if not fb.get("ok"):
            res.notes.append("feedback generation failed: " + _failure_reason(fb, ctx.cell_timeout))
        elif page.exists():
            _finish_page(page, f.submitted / f.student / ctx.spec.lesson_id)
    except WorkerDied as e:
        res.notes.append(f"feedback generation failed: worker {e.reason}")
    finally:
        ctx.pool.give(worker)


def grade_one(sub: Submission, ctx: Context) -> StudentResult:
    """Grade one submission through the steps above (never raises for problems of the submission)."""
    t0 = time.monotonic()
    spec, opts = ctx.spec, ctx.opts
    res = StudentResult(sub.student, sub.submitted_as, GRADED, notebook=str(sub.path or ""),
                        notes=list(sub.notes))   # what discovery set aside (older attempts, links)
    f = None
    try:
        try:
            nb, prepared = read_and_prepare(sub, ctx)
        except SubmissionError as e:
            return _errored(res, str(e))
        findings = submission_findings(nb, spec, opts.sandbox)
        res.evidence = [x.as_dict() for x in findings]   # kept whatever happens after
        f = make_folders(sub, prepared, ctx)
        running = start_recheck(prepared, f, ctx)
        failure, faults = autograde(f, ctx)
        findings += runtime_findings(f.kernel_guard_records(), None)
        res.evidence = [x.as_dict() for x in findings]   # the kernel's evidence, before the re-check is read
        try:
            verdicts, cell_notes = finish(running, ctx.probes, spec) if running else ({}, [])
            findings += runtime_findings(None, running.guard_records if running else None,
                                         running.forged if running else ())
            if running and faults:   # a crash that also ended the re-check costs only its exercise there too
                verdicts, again = recheck_again(prepared, f, ctx, faults, verdicts)
                if again is not None:
                    findings += [x for x in runtime_findings(None, again.guard_records, again.forged) if x not in findings]
        except RegradeNeeded as e:   # the grader's wall clock, not the student's answer
            return _errored(res, f"re-grade: {e}")
        res.evidence = [x.as_dict() for x in findings]
        res.notes += [f"re-check: {n}" for n in cell_notes[:10]]
        if failure:
            return _errored(res, failure)
        try:
            graded_nb, grades = read_grades(f, ctx)
        except SubmissionError as e:
            return _errored(res, str(e))
        res.autograde_score = sum((g.auto_score or 0.0) for g in grades.values())
        # a cell that timed out or lost the kernel costs its exercise only (scoring.apply_faults)
        res.items, recheck_findings = score_items(f, spec, grades, verdicts, faults, ctx.cell_timeout)
        outside = scoring.fault_notes_outside_items(faults, spec, ctx.cell_timeout)
        res.notes += outside
        findings += recheck_findings + unparsed_cells_that_ran(graded_nb)
        decide_status(res, spec, findings)
        if opts.feedback:
            make_feedback(f, ctx, res, feedback_summary.summary(res, spec, verdicts, outside))
        return res
    except Exception as e:  # a bug in the grader for this one student must not stop the batch
        import traceback
        return _errored(res, f"internal grader error ({type(e).__name__}: {e}); please report: "
                             + traceback.format_exc(limit=3).replace("\n", " | ")[-600:])
    finally:
        if f is not None and f.cgroup is not None:
            try:
                f.cgroup.remove()   # kills whatever of the submission is still running
            except (OSError, RuntimeError) as e:   # reported, never a crash of the batch
                res.notes.append(f"cgroup clean-up failed: {e}")
        if f is not None and f.ipc is not None:
            shutil.rmtree(f.ipc, ignore_errors=True)
        if f is not None and f.guard_reader is not None:
            f.guard_reader.finish(timeout=1)
        res.seconds = round(time.monotonic() - t0, 2)


def _finish_page(page: Path, exchange_src: Path) -> None:
    """WCAG 2.1 AA fixes and the Content-Security-Policy on nbgrader's page, and the exchange files
    next to it (the layout ``nbgrader release_feedback`` expects)."""
    page.write_text(add_csp(make_accessible(page.read_text(encoding="utf-8"))), encoding="utf-8")
    for name in EXCHANGE_FILES:
        if (exchange_src / name).is_file() and not (page.parent / name).exists():
            shutil.copyfile(exchange_src / name, page.parent / name)


def refresh_feedback(out: Path, spec: LessonSpec, res: StudentResult, work: Path) -> Path | None:
    """Write ``res``'s feedback page again from the results folder ``out``, so that it shows what the
    store says now (a manual override, or one that survived a re-grade): ``nbgrader generate_feedback``
    on the kept autograded notebook with ``out/gradebook.db`` (which holds the override's cell points)
    and the summary of ``res`` (overrides applied, see :func:`autograder.results.exports.build`). No student
    code runs. Notes about cells outside every exercise are not kept in the store and are left out.

    Returns the page; None when ``out`` has no autograded notebook of the student (graded with
    ``--no-feedback``, or errored). Raises RuntimeError when nbgrader fails (the old page is kept)."""
    src = out / "autograded" / res.student / spec.lesson_id
    if not (src / spec.notebook_name).is_file() or not (out / "gradebook.db").is_file():
        return None
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="feedback-", dir=work))
    try:
        req = {"op": "feedback", "lesson": spec.lesson_id, "student": res.student,
               "submitted": str(out / "autograded"), "autograded": str(out / "autograded"), "feedback": str(tmp),
               "release": str(template(spec) / "release"), "db": str(out / "gradebook.db"), "cell_timeout": 60,
               "max_output_bytes": 0, "max_total_output_bytes": 0, "interrupt_grace": 0, "kernel_name": KERNEL_NAME,
               "ipc": None, "env": {}, "summary": feedback_summary.summary(res, spec)}
        worker = Worker([sys.executable, "-m", "autograder.nbgrader_worker"], tool_env(), tmp / "worker.log", ROOT)
        try:
            answer = worker.request(req, timeout=300, memory_bytes=4 * GB)
        except WorkerDied as e:
            answer = {"ok": False, "error": f"worker {e.reason}"}
        finally:
            worker.stop()
        page_name = Path(spec.notebook_name).stem + ".html"
        made = tmp / res.student / spec.lesson_id / page_name
        if not answer.get("ok") or not made.is_file():
            raise RuntimeError(f"nbgrader generate_feedback failed for {res.student}: "
                               f"{clean_text(str(answer.get('error') or answer.get('log', ''))[-500:])}")
        page = out / "feedback" / res.student / spec.lesson_id / page_name
        page.parent.mkdir(parents=True, exist_ok=True)
        _finish_page(made, page.parent)
        os.replace(made, page)
        return page
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- merging (main thread only) ---------------------------------------------------------------------
def publish(res: StudentResult, ctx: Context, out_db: Path, run: "results_store.Run | None" = None,
            sub: Submission | None = None) -> None:
    """Replace (graded/flagged) or remove (errored) the student's entry in the results folder, then
    record the attempt in the store (``run``; last, so a grader killed before it re-grades the student)."""
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
        items = {i.item: i for i in res.items}
        for item, o in (run.active_overrides(res.student) if run else {}).items():
            if item in items:   # formgrader and `nbgrader export` show the override too
                gradebook.set_item_points(out_db, spec.lesson_id, res.student, list(items[item].parts), o["points"])
        for kind in ("autograded", "feedback"):
            src = sdir / kind / res.student / spec.lesson_id
            if src.exists():
                shutil.copytree(src, out / kind / res.student / spec.lesson_id)
        fb = out / "feedback" / res.student / spec.lesson_id / (Path(spec.notebook_name).stem + ".html")
        res.feedback = str(fb) if fb.exists() else ""
    if run is not None:
        run.record(res, sub)
    if not ctx.opts.keep_work:
        shutil.rmtree(sdir, ignore_errors=True)


def _roster(path: Path | None, subs: list[Submission], known: set[str] = frozenset()) -> list[Submission]:
    """Add roster students without a submission as ``missing`` (not those the store already has)."""
    if not path:
        return subs
    have = {s.student for s in subs} | set(known)
    for line in Path(path).read_text().splitlines():
        name = line.split("#")[0].strip()
        if name and student_id(name) not in have:   # the id discovery gives that folder name (or LMS key)
            subs.append(Submission(student_id(name), name, None, "missing: no submission from this student"))
            have.add(student_id(name))
    return subs


class SandboxUnavailable(RuntimeError):
    """The sandbox was required (the default) but ``bwrap ... true`` failed."""


def _cgroups(opts: Options, run_dir: Path, warnings: list[str]) -> cgroups.RunGroup | None:
    """The run's cgroup (:mod:`autograder.isolate.cgroups`); says on stderr what was applied. Unavailable:
    a warning in the results (``--cgroups auto``) or :class:`SandboxUnavailable` (``require``)."""
    if opts.cgroups == "off" or not opts.sandbox:
        why = "--cgroups off" if opts.cgroups == "off" else "--sandbox off"
        h = cgroups.Hierarchy("none", reason=why)
    else:
        h = cgroups.detect()
    run = None
    if h.usable:
        limits = sandbox.Limits()
        policy = cgroups.policy_for(int(opts.memory_gb * GB), limits.tmp_bytes, limits.processes, cgroups.cpus(),
                                    opts.jobs)
        try:
            for d in h.sweep_stale():
                print(f"isolation: removed the stale cgroup {d} of a grader that died", file=sys.stderr)
            run = h.run_group(run_dir.name, policy)
        except OSError as e:
            h = cgroups.Hierarchy("none", reason=f"cannot create the run's cgroup: {e}")
    if run is not None:
        print(f"isolation: {run.describe()}", file=sys.stderr)
        return run
    msg = (f"no per-submission cgroup ({h.reason}): submissions are bounded by the sandbox's per-process limits "
           "only, so one submission's processes can slow down others graded in parallel (grade with --jobs 1, or "
           "give the grader a cgroup)")
    if opts.cgroups == "require":
        raise SandboxUnavailable(msg + "; --cgroups require refuses to grade")
    if opts.cgroups != "off":
        warnings.append(msg)
    print(f"isolation: {msg}", file=sys.stderr)
    return None


def open_context(spec: LessonSpec, opts: Options, run_dir: Path, tmpl: Path, probes: ProbeSet | None,
                 jobs: int, warnings: list[str] | None = None) -> Context:
    """The grading context of one process that runs :func:`grade_one` (``jobs`` submissions at a time).

    Checks the sandbox (fail closed: raises :class:`SandboxUnavailable`), makes the run's cgroup
    (:func:`_cgroups`; what could not be applied goes into ``warnings``), writes the kernelspec and
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
    cgroup_run = _cgroups(opts, run_dir, warnings if warnings is not None else [])
    write_kernelspec(run_dir / "jupyter", sandboxed=opts.sandbox)
    env = tool_env({"JUPYTER_PATH": str(run_dir / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""),
                    "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, jobs)))})
    pool = WorkerPool(max(1, jobs), run_dir, env)
    # the grader's own code is public; its work folder (gradebooks, other students' files) is not
    protect = [str(ROOT / "solutions"), str(ROOT / ".git"), str(WORK), str(run_dir), str(opts.out), str(tmpl)]
    ipc_root = Path(tempfile.mkdtemp(prefix="agk-")) if opts.sandbox else None
    return Context(spec, opts, run_dir, tmpl, probes, pool, opts.resolved_cell_timeout(),
                   opts.resolved_submission_timeout(), protect, ipc_root, cgroup_run)


def close_context(ctx: Context) -> None:
    """Stop the context's nbgrader workers, remove its cgroup (killing what is left in it) and its
    socket folders."""
    if ctx.pool is not None:
        ctx.pool.stop()
    if ctx.cgroup_run is not None:
        try:
            ctx.cgroup_run.remove()
        except (OSError, RuntimeError) as e:
            print(f"warning: cgroup clean-up failed: {e}", file=sys.stderr)
    if ctx.ipc_root is not None:
        shutil.rmtree(ctx.ipc_root, ignore_errors=True)


def grade(submissions: Path, opts: Options) -> RunResult:
    """Grade everything under ``submissions`` into the store of ``opts.out`` (holding its lock), write
    feedback and gradebook there, and regenerate every results file from the whole store.

    The submissions are graded by an executor (:mod:`autograder.executors`: ``local``, this
    machine's threads and nbgrader workers, or ``dask``, a Dask cluster); this process is the only
    writer of the results folder and the store: it publishes each result as it arrives. A submission
    whose identical notebook the store already holds as graded with the same grader version, mode and
    probe seed (an interrupted run) is not graded again unless ``opts.regrade``
    (:meth:`autograder.results.store.Run.resume`).
    """
    from contextlib import ExitStack
    import nbgrader
    from autograder import executors
    t0 = time.monotonic()
    spec = load_spec(opts.lesson)
    opts.out = Path(opts.out).resolve()
    opts.work_root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(opts.work_root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True)
    warnings = [f"items in the lesson metadata without grade cells in the notebook (not graded): {', '.join(spec.missing_items)}"
                ] if spec.missing_items else []
    ex = None
    held = ExitStack()
    try:
        tmpl = template(spec)
        seed = opts.probe_seed if opts.probe_seed is not None else offering_probe_seed()
        probes = ProbeSet.build(spec, seed) if opts.recheck else None
        # connects to the cluster / checks the sandbox before anything is written to opts.out
        ex = executors.make(opts, spec, run_dir, tmpl, probes, warnings)
        ctx = ex.ctx
        store = held.enter_context(results_store.open_locked(opts.out, wait=opts.wait))   # one run per --out
        subs = _roster(opts.roster, discover(Path(submissions), spec.lesson_id, spec.notebook_name, run_dir),
                       store.known(spec.lesson_id))
        out_db = opts.out / "gradebook.db"
        w = gradebook.ensure_merged(out_db, tmpl / "gradebook.db", spec.lesson_id)
        if w:
            warnings.append(w)
        items = {i: {"objective": spec.objective(i), "max_score": spec.item_points(i),
                     "probe": bool(probes and i in probes.probes)} for i in spec.items}
        rec = results_store.Run.begin(store, spec.lesson_id, spec.source_path, opts.mode, seed, {
            "threshold": spec.meta.passing_threshold, "max_score": spec.total_points, "items": items,
            "objectives": spec.meta.objectives, "missing_items": spec.missing_items, "jobs": opts.jobs,
            "nbgrader_version": nbgrader.__version__, "warnings": warnings, "regrade": opts.regrade,
            "executor": ex.describe()},
            late=opts.late, drop_overrides=opts.drop_overrides,
            settings={"recheck": opts.recheck, "sandbox": opts.sandbox, "cell_timeout": ctx.cell_timeout,
                      "timeout": ctx.submission_timeout, "memory_gb": opts.memory_gb,
                      "max_output_mb": opts.max_output_mb, "max_notebook_mb": opts.max_notebook_mb})
        todo, skipped = rec.resume(subs, opts.regrade)
        results: list[StudentResult] = []
        progress = executors.Progress(len(subs), len(skipped), f"grading {spec.lesson_id}", opts.progress,
                                      ex.describe())

        def on_result(r: StudentResult, sub: Submission) -> None:   # main thread only: the single writer
            publish(r, ctx, out_db, rec, sub)
            results.append(r)
            progress.update(r)

        ex.run(todo, on_result, progress)
        progress.close()
        rec.finish(seconds=round(time.monotonic() - t0, 2), graded=len(results), skipped=len(skipped))
        run = export_all(store, opts.out, spec.lesson_id)   # every results file, from the whole store
        run.batch, run.skipped = sorted([r.student for r in results] + skipped), skipped
        if opts.feedback:   # a re-graded student's override survived: their page shows it too
            graded_now = {r.student for r in results}
            for s in run.students:
                if s.student in graded_now and s.overrides:
                    try:
                        refresh_feedback(opts.out, spec, s, run_dir)
                    except RuntimeError as e:
                        print(f"warning: {e}", file=sys.stderr)
        return run
    finally:
        if ex is not None:
            ex.close()
        if not opts.keep_work:
            shutil.rmtree(run_dir, ignore_errors=True)
        held.close()   # the store and its lock
