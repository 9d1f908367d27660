"""Where submissions are graded: on this machine, or on a Dask cluster (``--executor local|dask``).

Both executors run the same per-submission step, :func:`autograder.pipeline.grade_one` (read,
bubblewrap sandbox, limits, out-of-kernel re-check, nbgrader autograde, feedback), and hand every
result to ``on_result`` in the calling (main) thread, which is the only writer of the results folder:

* :class:`LocalExecutor` (the default): ``--jobs`` threads, each with its own nbgrader worker
  process, in this process (what ``grade`` always did);
* :class:`DaskExecutor`: one ``dask.distributed`` task per submission. The client ships the
  notebook's bytes and a small job description (lesson, options, probe seed, course version); each
  Dask worker process builds its grading context once (:func:`worker_context`: template gradebook,
  probe set, nbgrader workers, sandbox check) and returns a self-contained result: the
  :class:`StudentResult` plus the files the client needs (the submission's gradebook, autograded
  notebook and feedback) as bytes, since a worker need not share a filesystem with the client. The
  client checks every result (:func:`accept`: types, finiteness, sizes, paths, the gradebook's score
  against the result's) before it is published; a result that fails is that student's ``errored``
  with a reason naming the worker. A worker with another course version, or whose sandbox does not
  work, refuses its tasks (the message names the worker) and the client sends them elsewhere.

Exactly once: Dask re-runs a task whose worker died (the scheduler's ``allowed-failures``; after that
it raises ``KilledWorker``, and the student is ``errored`` with that reason). However often a task
runs, the client publishes one result per student into the results store (``autograder/results/store.py``,
the single writer, one transaction per student), keyed by the notebook's SHA-256, the grader version
and the run's settings, so that re-running an interrupted command grades only what is missing
(:meth:`autograder.results.store.Run.resume`; an ``errored`` attempt, such as a killed worker's, is always
graded again).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Callable, Protocol

from autograder.ingest.discover import Submission
from autograder.results.records import ERRORED, FLAGGED, GRADED, ItemResult, StudentResult, student_from_dict

FORMAT = 1                       # version of the task/result payloads
MAX_RESULT_BYTES = 200 * 10**6   # a result's files together (notebook + outputs + feedback)
OnResult = Callable[[StudentResult, Submission], None]


class Executor(Protocol):
    """What :func:`autograder.pipeline.grade` needs of an executor."""
    ctx: object    # the client-side Context (publish, and submissions graded without running anything)

    def describe(self) -> str:
        """One line: where the grading runs (and the Dask dashboard's address)."""

    def run(self, subs: list[Submission], on_result: OnResult, progress: "Progress | None" = None) -> None:
        """Grade ``subs``; call ``on_result(result, submission)`` once per submission, in this thread."""

    def close(self) -> None:
        """Release workers / the cluster connection."""


class ExecutorUnavailable(RuntimeError):
    """The executor cannot start (e.g. the Dask scheduler does not answer); nothing was graded."""


class WorkerRefused(RuntimeError):
    """This Dask worker cannot grade for this client (another course version, no working sandbox)."""


class InvalidResult(ValueError):
    """A result from a worker failed validation (the message says what is wrong)."""


# ---- what must be equal on the client and every worker -----------------------------------------------
def course_version() -> str:
    """SHA-256 over everything that decides a grade: the grader's code, the library, the lesson's
    notebooks and metadata, nbgrader's configuration and version, the offering and Python's version.
    A worker whose value differs from the client's refuses to grade."""
    import nbgrader
    from autograder.pipeline import ROOT
    h = hashlib.sha256()
    files = sorted((ROOT / "autograder").glob("*.py")) + [ROOT / "autograder" / "offering.toml", ROOT / "nbgrader_config.py"]
    files += sorted((ROOT / "solutions").glob("*/lesson.ipynb"))
    lib = ROOT / "lib" / "residual_bandwidth"
    files += sorted(p for p in lib.rglob("*") if p.suffix in (".py", ".yaml", ".json") and "__pycache__" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(f"nbgrader {nbgrader.__version__}; python {sys.version_info.major}.{sys.version_info.minor}".encode())
    return h.hexdigest()




# ---- progress -----------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar (done / failed / remaining, rate and ETA) and one line per failure, on stderr."""

    def __init__(self, total: int, already: int, desc: str, enabled: bool, where: str = ""):
        self.total, self.done, self.failed, self.enabled = total, already, 0, enabled
        self.bar = None
        if enabled:
            from tqdm import tqdm
            if where:
                print(f"{desc}: {where}", file=sys.stderr)
            if already:
                print(f"{desc}: {already} of {total} already graded with the same notebook and settings "
                      f"(kept); grading {total - already}", file=sys.stderr)
            self.bar = tqdm(total=total, initial=already, desc=desc, unit="nb", file=sys.stderr, dynamic_ncols=True)
            self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"done {self.done} failed {self.failed} remaining {self.total - self.done}",
                                 refresh=False)

    def note(self, message: str) -> None:
        """One line above the bar (e.g. a worker that refuses tasks)."""
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def update(self, res: StudentResult) -> None:
        self.done += 1
        if res.status == ERRORED:
            self.failed += 1
            self.note(f"errored {res.student}: {' '.join(res.reason.split())[:200]}")
        if self.bar is not None:
            self._postfix()
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the local executor -------------------------------------------------------------------------------
class LocalExecutor:
    """``opts.jobs`` submissions at a time in this process's threads, each with its own nbgrader worker."""

    def __init__(self, ctx):
        self.ctx = ctx

    def describe(self) -> str:
        return f"local executor, {self.ctx.opts.jobs} at a time"

    def run(self, subs: list[Submission], on_result: OnResult, progress: Progress | None = None) -> None:
        from autograder.pipeline import grade_one
        with ThreadPoolExecutor(max_workers=max(1, self.ctx.opts.jobs)) as ex:
            futures = {ex.submit(grade_one, s, self.ctx): s for s in subs}
            for fut in as_completed(futures):
                on_result(fut.result(), futures[fut])

    def close(self) -> None:
        from autograder.pipeline import close_context
        close_context(self.ctx)


# ---- the Dask executor: the worker side ---------------------------------------------------------------
_CONTEXTS: dict[str, object] = {}   # job key -> Context, or WorkerRefused (one per worker process)
_LOCK = threading.Lock()


def _worker_name() -> str:
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()} pid {os.getpid()}"


def worker_context(job: dict):
    """This worker process's grading context for ``job`` (built once, then cached), or raise
    :class:`WorkerRefused` naming the worker: another course version, or a sandbox that does not work."""
    with _LOCK:
        if job["key"] not in _CONTEXTS:
            try:
                _CONTEXTS[job["key"]] = _build_context(job)
            except WorkerRefused as e:
                _CONTEXTS[job["key"]] = e
        ctx = _CONTEXTS[job["key"]]
    if isinstance(ctx, WorkerRefused):
        raise ctx
    return ctx


def _build_context(job: dict):
    from autograder.isolate import sandbox
    from autograder.ingest.notebook import load_spec
    from autograder.pipeline import WORK, Options, SandboxUnavailable, close_context, open_context, template
    from autograder.check.recheck import ProbeSet
    me = _worker_name()
    mine = course_version()
    if mine != job["course_version"]:
        raise WorkerRefused(f"worker {me} has another version of the course ({mine[:12]}, the client has "
                            f"{job['course_version'][:12]}): install the client's commit on it")
    opts = Options(**{**job["options"], "out": Path(job["options"]["out"]), "work_root": WORK / "runs",
                      "roster": None, "progress": False})
    threads = job.get("threads") or 1
    try:
        from distributed import get_worker
        threads = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        pass
    opts.jobs = max(1, threads)
    run_dir = opts.work_root / f"dask-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True)
    try:
        if opts.sandbox:   # before anything slow: a worker that cannot sandbox refuses at once
            ok, why = sandbox.probe(run_dir)
            if not ok:
                raise SandboxUnavailable(f"the bubblewrap sandbox does not work here ({why})")
        spec = load_spec(opts.lesson)
        probes = ProbeSet.build(spec, job["probe_seed"]) if opts.recheck else None
        ctx = open_context(spec, opts, run_dir, template(spec), probes, opts.jobs)
    except SandboxUnavailable as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise WorkerRefused(f"worker {me} cannot grade: {e}") from None

    def _close():
        close_context(ctx)
        shutil.rmtree(run_dir, ignore_errors=True)
    atexit.register(_close)
    return ctx


def grade_task(job: dict, task: dict) -> dict:
    """The Dask task: grade one submission on this worker; return the result and its files as bytes."""
    from autograder.pipeline import grade_one
    me = _worker_name()
    try:
        ctx = worker_context(job)
    except WorkerRefused as e:
        return {"format": FORMAT, "worker": me, "refused": str(e)}
    folder = ctx.run_dir / "incoming" / f"{task['student']}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    path = folder / "submission.ipynb"
    path.write_bytes(task["data"])
    sub = Submission(task["student"], task["submitted_as"], path)
    try:
        res = grade_one(sub, ctx)
        files: dict[str, bytes] = {}
        sdir = ctx.run_dir / "subs" / sub.student
        if res.status != ERRORED:
            files["gradebook.db"] = (sdir / "gradebook.db").read_bytes()
            for kind in ("autograded", "feedback"):
                src = sdir / kind / sub.student / ctx.spec.lesson_id
                for p in sorted(src.rglob("*")) if src.is_dir() else []:
                    if p.is_file() and not p.is_symlink():
                        files[f"{kind}/{p.relative_to(src).as_posix()}"] = p.read_bytes()
        if not ctx.opts.keep_work:
            shutil.rmtree(sdir, ignore_errors=True)
        return {"format": FORMAT, "worker": me, "sha256": task["sha256"], "result": res.as_dict(), "files": files}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the Dask executor: checking what comes back ------------------------------------------------------
_RESULT_TYPES = {"student": str, "submitted_as": str, "status": str, "reason": str, "score": (float, int, type(None)),
                 "max_score": (float, int, type(None)), "percent": (float, int, type(None)),
                 "pass": (bool, type(None)), "objectives": dict, "items": list, "evidence": list, "notes": list,
                 "autograde_score": (float, int, type(None)), "notebook": str, "feedback": str,
                 "seconds": (float, int)}
# identity and bookkeeping fields: the client (the store) fills them from the submission and its own
# records; whatever a worker sends there is type-checked, then discarded
_CLIENT_FIELDS = {"late": bool, "lms": (str, type(None)), "lms_user_id": (str, type(None)), "display_name": str,
                  "lms_submission_id": (str, type(None)), "sha256": str, "grader_version": str,
                  "probe_seed": (int, type(None)), "mode": str, "graded_at": str, "overrides": list, "history": list}


def _finite(x, what: str) -> None:
    if x is not None and (isinstance(x, bool) or not math.isfinite(float(x))):
        raise InvalidResult(f"{what} is not a finite number ({x!r})")


def accept(payload, task: dict, spec, sdir: Path) -> StudentResult:
    """Check a worker's payload for ``task`` and unpack its files into ``sdir`` (raises InvalidResult)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidResult(f"not a result of format {FORMAT} ({type(payload).__name__})")
    if payload.get("sha256") != task["sha256"]:
        raise InvalidResult("the result is for another notebook (SHA-256 differs)")
    d, files = payload.get("result"), payload.get("files")
    keys = {"pass" if f.name == "passed" else f.name for f in fields(StudentResult)}
    if not isinstance(d, dict) or set(d) != keys:
        raise InvalidResult(f"the result's fields are not those of a StudentResult: {sorted(d)[:20] if isinstance(d, dict) else d!r}")
    for k in keys:   # fields added later to StudentResult: plain JSON values
        t = _RESULT_TYPES.get(k) or _CLIENT_FIELDS.get(k) or (str, int, float, list, dict, type(None))
        if not isinstance(d[k], t) or (isinstance(d[k], bool) and t is not bool and bool not in (t if isinstance(t, tuple) else (t,))):
            raise InvalidResult(f"field {k!r} has type {type(d[k]).__name__}")
    if d["student"] != task["student"] or d["submitted_as"] != task["submitted_as"]:
        raise InvalidResult(f"the result is for student {d['student']!r}, not {task['student']!r}")
    if d["status"] not in (GRADED, FLAGGED, ERRORED):
        raise InvalidResult(f"unknown status {d['status']!r}")
    for k in ("score", "max_score", "percent", "autograde_score", "seconds"):
        _finite(d[k], k)
    item_fields = {f.name for f in fields(ItemResult)}
    for i in d["items"]:
        if not isinstance(i, dict) or set(i) != item_fields or not isinstance(i["item"], str):
            raise InvalidResult("an item result is malformed")
        for k in ("score", "max_score"):
            _finite(i[k], f"item {i['item']!r} {k}")
        if not (0 <= i["score"] <= i["max_score"] + 1e-9) or i["item"] not in spec.items:
            raise InvalidResult(f"item {i['item']!r} scores {i['score']} of {i['max_score']}")
    if any(not isinstance(e, dict) for e in d["evidence"]) or any(not isinstance(n, str) for n in d["notes"]):
        raise InvalidResult("evidence or notes are malformed")
    if d["status"] != ERRORED:
        if d["score"] is None or d["max_score"] != spec.total_points or not (0 <= d["score"] <= d["max_score"] + 1e-9):
            raise InvalidResult(f"score {d['score']!r} of {d['max_score']!r} (the lesson has {spec.total_points:g})")
        if abs(sum(i["score"] for i in d["items"]) - d["score"]) > 1e-6:
            raise InvalidResult("the score is not the sum of the item scores")
    if not isinstance(files, dict) or any(not isinstance(k, str) or not isinstance(v, bytes) for k, v in files.items()):
        raise InvalidResult("the files are not a {path: bytes} mapping")
    size = sum(len(v) for v in files.values())
    if size > MAX_RESULT_BYTES:
        raise InvalidResult(f"the result's files are {size / 1e6:.0f} MB (limit {MAX_RESULT_BYTES / 1e6:.0f} MB)")
    targets = {}
    for name in files:
        p = PurePosixPath(name)
        if name == "gradebook.db":
            targets[name] = sdir / "gradebook.db"
        elif (p.is_absolute() or ".." in p.parts or len(p.parts) < 2 or p.parts[0] not in ("autograded", "feedback")
              or "\\" in name or any(part in ("", ".") for part in p.parts)):
            raise InvalidResult(f"unexpected file path {name[:100]!r}")
        else:
            targets[name] = sdir / p.parts[0] / task["student"] / spec.lesson_id / Path(*p.parts[1:])
    res = student_from_dict({**d, **{k: getattr(StudentResult(d["student"], d["submitted_as"], d["status"]), k)
                                     for k in _CLIENT_FIELDS if k in d}})   # the client's, not the worker's
    shutil.rmtree(sdir, ignore_errors=True)
    if res.status == ERRORED:
        return res
    if "gradebook.db" not in files:
        raise InvalidResult("a graded result without its gradebook")
    for name, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[name])
    from autograder.results import gradebook
    try:
        with gradebook.open_gradebook(sdir / "gradebook.db") as gb:
            stored = float(gb.find_submission(spec.lesson_id, task["student"]).score)
    except Exception as e:
        raise InvalidResult(f"its gradebook cannot be read ({type(e).__name__})") from None
    if abs(stored - res.score) > 1e-6:
        raise InvalidResult(f"its gradebook scores {stored:g}, the result {res.score:g}")
    return res


# ---- the Dask executor: the client side ---------------------------------------------------------------
class DaskExecutor:
    """One Dask task per submission on the cluster at ``address``; this process publishes the results."""

    def __init__(self, address: str, ctx, connect_timeout: float = 20.0):
        try:
            from distributed import Client
        except ImportError:
            raise ExecutorUnavailable("--executor dask needs the grading extra: pip install -e '.[grading]'") from None
        self.ctx, self.address = ctx, address
        try:
            self.client = Client(address, timeout=connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise ExecutorUnavailable(f"the Dask scheduler at {address} does not answer ({type(e).__name__}: {e}); "
                                      "nothing was graded or written. Start it (dask scheduler) or check the "
                                      "address and the firewall") from None
        opts = ctx.opts
        options = {f.name: getattr(opts, f.name) for f in fields(opts)}
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
        self.job = {"options": options, "probe_seed": ctx.probes.seed if ctx.probes else None,
                    "course_version": course_version()}
        if self.job["probe_seed"] is None:
            from autograder.offering import probe_seed
            self.job["probe_seed"] = opts.probe_seed if opts.probe_seed is not None else probe_seed()
        # a worker process keeps one context per key: the same settings reuse it across runs
        same = {**self.job, "options": {k: v for k, v in options.items() if k not in ("out", "progress", "roster", "work_root")}}
        self.job["key"] = hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        info = self.client.scheduler_info()
        workers = info.get("workers", {})
        threads = sum(w.get("nthreads", 1) for w in workers.values())
        text = f"Dask scheduler {self.address}, {len(workers)} workers, {threads} threads"
        port = info.get("services", {}).get("dashboard")
        if port:
            try:
                text += f"; dashboard {self.client.dashboard_link}"
            except Exception:
                pass
        return text

    def _task(self, sub: Submission) -> dict | None:
        """The task for ``sub`` (None: no notebook to ship, graded here in no time)."""
        limit = int(self.ctx.opts.max_notebook_mb * 1e6)
        if sub.problem or sub.path is None:
            return None
        try:
            size = sub.path.stat().st_size
            if size == 0 or size > limit:
                return None
            data = sub.path.read_bytes()
        except OSError:
            return None
        return {"student": sub.student, "submitted_as": sub.submitted_as, "data": data,
                "sha256": hashlib.sha256(data).hexdigest()}

    def _errored(self, sub: Submission, reason: str) -> StudentResult:
        return StudentResult(sub.student, sub.submitted_as, ERRORED, f"grading infrastructure: {reason}",
                             notebook=str(sub.path or ""))

    def run(self, subs: list[Submission], on_result: OnResult, progress: Progress | None = None) -> None:
        from distributed import as_completed as dask_completed
        from autograder.pipeline import grade_one
        note = progress.note if progress else (lambda m: None)
        queue: deque = deque()
        for sub in subs:
            task = self._task(sub)
            if task is None:   # a problem found without running anything (missing, empty, oversize)
                on_result(grade_one(sub, self.ctx), sub)
            else:
                queue.append((sub, task))
        refused: dict[str, str] = {}            # worker -> why it refuses
        refusals: dict[str, set] = {}           # student -> workers that refused it
        running: dict = {}                      # future -> (sub, task)
        ac = dask_completed(loop=self.client.loop)

        def workers() -> list[str]:
            return list(self.client.scheduler_info().get("workers", {}))

        def submit(sub, task, attempt=0) -> None:
            # steer away from refusing workers only (a restriction to workers that all die leaves the
            # task waiting for them, so none is set while every worker accepts)
            good = [w for w in workers() if w not in refused] if refused else None
            fut = self.client.submit(grade_task, self.job, task, key=f"grade-{sub.student}-{task['sha256'][:12]}-"
                                     f"{attempt}-{secrets.token_hex(3)}", pure=False, retries=1,
                                     workers=good or None, allow_other_workers=bool(good))
            running[fut] = (sub, task, attempt)
            ac.add(fut)

        def fill() -> None:
            window = max(4, 2 * sum(self.client.nthreads().values()))
            while queue and len(running) < window:
                submit(*queue.popleft())

        fill()
        while running:
            fut = next(ac)
            sub, task, attempt = running.pop(fut)
            res = self._collect(fut, sub, task, refused, refusals, note)
            if res is None:   # refused: try the other workers
                if set(workers()) <= refusals[sub.student] or attempt > 2 * len(workers()) + 2:
                    why = "; ".join(f"{w}: {refused.get(w, '?')}" for w in sorted(refusals[sub.student]))
                    res = self._errored(sub, f"no Dask worker accepted the submission ({why})")
                else:
                    fut.release()
                    submit(sub, task, attempt + 1)
                    continue
            fut.release()
            res.notebook = str(sub.path or "")
            on_result(res, sub)
            fill()

    def _collect(self, fut, sub, task, refused, refusals, note) -> StudentResult | None:
        from distributed import KilledWorker
        try:
            payload = fut.result()
        except KilledWorker as e:
            last = getattr(getattr(e, "last_worker", None), "address", None) or str(e)[-120:]
            return self._errored(sub, f"grading this submission killed its Dask worker repeatedly (last: {last}); "
                                      "Dask gave up on it (allowed-failures); the rest of the batch went on")
        except Exception as e:   # the task raised (after its retry), or the scheduler was lost
            return self._errored(sub, f"the grading task failed on the Dask cluster ({type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:300]})")
        worker = payload.get("worker", "?") if isinstance(payload, dict) else "?"
        if isinstance(payload, dict) and isinstance(payload.get("refused"), str):
            if worker not in refused:
                refused[worker] = payload["refused"]
                note(f"worker refuses tasks: {payload['refused']}")
            refusals.setdefault(sub.student, set()).add(worker)
            return None
        try:
            return accept(payload, task, self.ctx.spec, self.ctx.run_dir / "subs" / sub.student)
        except InvalidResult as e:
            shutil.rmtree(self.ctx.run_dir / "subs" / sub.student, ignore_errors=True)
            return self._errored(sub, f"the result from worker {worker} failed validation ({e}); not stored")

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


# ---- choosing -----------------------------------------------------------------------------------------
def make(opts, spec, run_dir: Path, tmpl: Path, probes, warnings: list[str] | None = None):
    """The executor ``opts.executor`` names, ready to run (raises ExecutorUnavailable / SandboxUnavailable);
    what the local context could not apply (e.g. no cgroups) is appended to ``warnings``."""
    from autograder.pipeline import Context, open_context
    if opts.executor == "local":
        return LocalExecutor(open_context(spec, opts, run_dir, tmpl, probes, max(1, opts.jobs), warnings))
    if opts.executor == "dask":
        if not opts.scheduler:
            raise ExecutorUnavailable("--executor dask needs --scheduler tcp://HOST:8786 (the Dask scheduler's address)")
        ctx = Context(spec, opts, run_dir, tmpl, probes, None, opts.resolved_cell_timeout(),
                      opts.resolved_submission_timeout())
        return DaskExecutor(opts.scheduler, ctx, opts.connect_timeout)
    raise ExecutorUnavailable(f"unknown executor {opts.executor!r} (local or dask)")


