"""The results store: one SQLite file per results folder, the single source of truth for grades.

``<out>/grades.sqlite`` sits beside nbgrader's merged ``<out>/gradebook.db`` (which stays, for
formgrader and ``nbgrader export``). Every grading run *adds* to it; nothing is ever deleted:

* ``runs``      one row per grading run (lesson, grader version, mode, probe seed, options, state);
* ``attempts``  one row per graded submission: the stable student id, the LMS identity (LMS, user
  id, display name, submission id, late), the submission's sha256, status, reason, score and the
  whole :class:`~autograder.results.records.StudentResult` as JSON (``asdict``: items, evidence, notes…, so
  new result fields need no schema change), probe seed, grader version, time;
* ``students``  (lesson, student) -> the latest attempt: what every export shows;
* ``overrides`` manual adjustments (student, item, points, who, when, why); a dropped override is
  marked dropped (when, by whom, why), never deleted;
* ``meta``      ``schema_version`` (see :data:`MIGRATIONS`).

**One writer.** Only the grading client (``pipeline.grade``'s main thread), ``override`` and
``export`` write, and only while holding the results folder's lock (:func:`locked`, an exclusive
``fcntl`` lock on ``<out>/.grading.lock``): a second run on the same folder waits and says so (or
stops with ``StoreBusy`` when told not to wait). The kernel releases the lock when its holder dies,
even by ``SIGKILL``. Each write is one transaction (``BEGIN IMMEDIATE … COMMIT``), so a killed
grader leaves every finished student recorded and no half-written one; the next run finds the rest
(:meth:`Store.already_graded`: same submission sha256, grader version, mode and probe seed).

**Schema versions.** :data:`MIGRATIONS` lists the DDL of each version; a new store runs them all, an
older store the missing ones (in one transaction), a store from a *newer* grader is refused with
:class:`StoreVersionError` rather than misread.
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

STORE_NAME = "grades.sqlite"
LOCK_NAME = ".grading.lock"
ROOT = Path(__file__).resolve().parents[2]

MIGRATIONS: list[str] = [
    # version 1: runs, attempts, the latest attempt per student
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        run_id INTEGER PRIMARY KEY AUTOINCREMENT,
        lesson TEXT NOT NULL,
        started TEXT NOT NULL,
        finished TEXT,
        state TEXT NOT NULL CHECK (state IN ('running', 'finished', 'interrupted')),
        grader_version TEXT NOT NULL,
        mode TEXT, probe_seed INTEGER,
        info TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE attempts (
        attempt_id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER NOT NULL REFERENCES runs(run_id),
        lesson TEXT NOT NULL,
        student TEXT NOT NULL,
        submitted_as TEXT NOT NULL DEFAULT '',
        sha256 TEXT,
        grader_version TEXT NOT NULL,
        mode TEXT, probe_seed INTEGER,
        status TEXT NOT NULL CHECK (status IN ('graded', 'flagged', 'errored')),
        reason TEXT NOT NULL DEFAULT '',
        score REAL, max_score REAL,
        result TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        CHECK (status != 'errored' OR score IS NULL)
    );
    CREATE INDEX attempts_by_student ON attempts(lesson, student, attempt_id);
    CREATE TABLE students (
        lesson TEXT NOT NULL,
        student TEXT NOT NULL,
        latest_attempt INTEGER NOT NULL REFERENCES attempts(attempt_id),
        first_recorded TEXT NOT NULL,
        PRIMARY KEY (lesson, student)
    );
    """,
    # version 2: LMS identity and the late flag; manual overrides
    """
    ALTER TABLE attempts ADD COLUMN lms TEXT;
    ALTER TABLE attempts ADD COLUMN lms_user_id TEXT;
    ALTER TABLE attempts ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
    ALTER TABLE attempts ADD COLUMN lms_submission_id TEXT;
    ALTER TABLE attempts ADD COLUMN late INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE overrides (
        override_id INTEGER PRIMARY KEY AUTOINCREMENT,
        lesson TEXT NOT NULL,
        student TEXT NOT NULL,
        item TEXT NOT NULL,
        points REAL NOT NULL CHECK (points >= 0),
        reason TEXT NOT NULL CHECK (length(trim(reason)) > 0),
        by TEXT NOT NULL,
        at TEXT NOT NULL,
        dropped_at TEXT, dropped_by TEXT, dropped_reason TEXT
    );
    CREATE INDEX overrides_by_student ON overrides(lesson, student, item, override_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The store cannot be used (the message says why and what to do)."""


class StoreBusy(StoreError):
    """Another run holds the results folder's lock and we were told not to wait."""


class StoreVersionError(StoreError):
    """The store was written by a newer grader (unknown schema version)."""


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def login_user() -> str:
    """Who runs this (for the override log)."""
    try:
        return getpass.getuser()
    except Exception:
        return f"uid {os.getuid()}"


def file_sha256(path: Path | None) -> str | None:
    """sha256 of a submitted file (None without a file)."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def grader_version(source_notebook: Path | None = None) -> str:
    """``g<hash>``: a hash of everything that decides a grade — the grader's code and data
    (``autograder/``), the library the references come from (``lib/residual_bandwidth``),
    ``nbgrader_config.py`` and the lesson's source notebook. Any change there re-grades on resume."""
    h = hashlib.sha256()
    files = [ROOT / "nbgrader_config.py"] + ([Path(source_notebook)] if source_notebook else [])
    for top in (ROOT / "autograder", ROOT / "lib" / "residual_bandwidth"):
        for folder, dirs, names in os.walk(top):
            dirs[:] = [d for d in dirs if d not in ("work", "a11y", "__pycache__") and not d.startswith(".")]
            files += [Path(folder) / n for n in names if not n.endswith(".pyc") and not n.startswith(".")]
    for p in sorted(files):
        h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p.name).encode() + b"\0")
        h.update(p.read_bytes())
    return "g" + h.hexdigest()[:16]


def git_describe() -> str:
    """``git describe --always --dirty`` of the repository (information only), or ""."""
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@contextmanager
def locked(out: Path, wait: bool = True, say=None):
    """Hold ``<out>/.grading.lock`` exclusively for the block (one run per results folder).

    If another process holds it: with ``wait`` say so (``say(message)``, default: stderr) and wait;
    without, raise :class:`StoreBusy`. The lock file records who holds it (pid, host, time, command).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 2000, 0).decode("utf-8", "replace").strip() or "unknown process"
            msg = f"the results folder {out} is in use by another grading run ({holder})"
            if not wait:
                raise StoreBusy(msg + "; try again when it has finished, or use another --out") from None
            (say or (lambda m: print(m, file=sys.stderr, flush=True)))(
                f"waiting: {msg}; runs on one results folder are serialized, this one starts when it finishes")
            fcntl.flock(fd, fcntl.LOCK_EX)
        info = f"pid {os.getpid()} on {socket.gethostname()} since {now()}: {' '.join(sys.argv)[:300]}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock


class Store:
    """The SQLite results store of one results folder (open it while holding :func:`locked`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(f"{self.path} is not a readable results store ({e}); move it away (it may be "
                             "damaged) or grade into another --out") from None
        except StoreError:
            self.db.close()
            raise

    @classmethod
    def open(cls, out: Path) -> "Store":
        """The store of results folder ``out`` (created if missing)."""
        Path(out).mkdir(parents=True, exist_ok=True)
        return cls(Path(out) / STORE_NAME)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any exception)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- schema ----------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            if self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise StoreError(f"{self.path} is an SQLite file but not a results store (no meta table)")
            return 0
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        v = self.schema_version()
        if v > SCHEMA_VERSION:
            raise StoreVersionError(
                f"{self.path} has schema version {v}, but this grader knows versions up to {SCHEMA_VERSION}: it was "
                "written by a newer version of the grader. Update the repository (git pull) before grading into it; "
                "nothing was changed.")
        if v == SCHEMA_VERSION:
            return
        with self.transaction() as db:
            for n in range(v, SCHEMA_VERSION):
                for stmt in (s.strip() for s in MIGRATIONS[n].split(";")):
                    if stmt:
                        db.execute(stmt)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (now(),))
            if v:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"migrated_from_{v}", now()))

    # ---- runs --------------------------------------------------------------------------------------------
    def start_run(self, lesson: str, version: str, mode: str, probe_seed: int, info: dict) -> int:
        """A new run (runs left ``running`` by a killed grader become ``interrupted``)."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET state='interrupted' WHERE state='running'")
            cur = db.execute("INSERT INTO runs (lesson, started, state, grader_version, mode, probe_seed, info) "
                             "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                             (lesson, now(), version, mode, probe_seed, json.dumps(info, sort_keys=True)))
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, info_update: dict) -> None:
        with self.transaction() as db:
            info = json.loads(db.execute("SELECT info FROM runs WHERE run_id=?", (run_id,)).fetchone()[0])
            info.update(info_update)
            db.execute("UPDATE runs SET state='finished', finished=?, info=? WHERE run_id=?",
                       (now(), json.dumps(info, sort_keys=True), run_id))

    def runs(self, lesson: str) -> list[dict]:
        rows = self.db.execute("SELECT * FROM runs WHERE lesson=? ORDER BY run_id", (lesson,)).fetchall()
        return [{**{k: r[k] for k in r.keys() if k != "info"}, "info": json.loads(r["info"])} for r in rows]

    def known(self, lesson: str) -> set[str]:
        """Students of ``lesson`` with any attempt in the store."""
        return {r[0] for r in self.db.execute("SELECT student FROM students WHERE lesson=?", (lesson,))}

    def lessons(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT lesson FROM students ORDER BY lesson")]

    # ---- attempts ----------------------------------------------------------------------------------------
    def record(self, res, sub, run_id: int, lesson: str, sha256: str | None, version: str, mode: str,
               probe_seed: int, late: bool = False, drop_overrides: str | None = None) -> int:
        """Store one finished submission (one transaction) and make it the student's latest attempt;
        with ``drop_overrides`` (the reason) the student's active overrides are marked dropped in the
        same transaction.

        ``res``: a :class:`~autograder.results.records.StudentResult`; ``sub``: its
        :class:`~autograder.ingest.discover.Submission` (LMS fields read with defaults, so older callers work)."""
        from autograder.results.records import ERRORED
        data = asdict(res)
        score = None if res.status == ERRORED else res.score
        row = (run_id, lesson, res.student, res.submitted_as or "", sha256, version, mode, probe_seed, res.status,
               res.reason or "", score, res.max_score, json.dumps(data, sort_keys=True, default=str), now(),
               getattr(sub, "lms", None), _str_or_none(getattr(sub, "lms_user_id", None)),
               getattr(sub, "display_name", "") or "", _str_or_none(getattr(sub, "lms_submission_id", None)),
               int(bool(getattr(sub, "late", False) or late)))
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO attempts (run_id, lesson, student, submitted_as, sha256, grader_version, mode, probe_seed, "
                "status, reason, score, max_score, result, recorded_at, lms, lms_user_id, display_name, "
                "lms_submission_id, late) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            aid = int(cur.lastrowid)
            db.execute("INSERT INTO students (lesson, student, latest_attempt, first_recorded) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (lesson, student) DO UPDATE SET latest_attempt=excluded.latest_attempt",
                       (lesson, res.student, aid, now()))
            if drop_overrides:
                db.execute("UPDATE overrides SET dropped_at=?, dropped_by=?, dropped_reason=? WHERE lesson=? AND "
                           "student=? AND dropped_at IS NULL", (now(), login_user(), drop_overrides, lesson, res.student))
        return aid

    def already_graded(self, lesson: str, student: str, sha256: str | None, version: str, mode: str,
                       probe_seed: int) -> bool:
        """The student's latest attempt is this very file, graded (or flagged) by this grader version
        with the same mode and probe seed: grading it again would give the same result."""
        if not sha256:
            return False
        r = self.db.execute(
            "SELECT a.status, a.sha256, a.grader_version, a.mode, a.probe_seed FROM students s "
            "JOIN attempts a ON a.attempt_id = s.latest_attempt WHERE s.lesson=? AND s.student=?",
            (lesson, student)).fetchone()
        return bool(r) and r["status"] != "errored" and (r["sha256"], r["grader_version"], r["mode"], r["probe_seed"]) \
            == (sha256, version, mode, probe_seed)

    def latest(self, lesson: str) -> list[sqlite3.Row]:
        """Every student's latest attempt (sorted by student id)."""
        return self.db.execute(
            "SELECT a.*, s.first_recorded, (SELECT count(*) FROM attempts b WHERE b.lesson=a.lesson AND "
            "b.student=a.student) AS n_attempts FROM students s JOIN attempts a ON a.attempt_id = s.latest_attempt "
            "WHERE s.lesson=? ORDER BY s.student", (lesson,)).fetchall()

    def latest_of(self, lesson: str, student: str) -> sqlite3.Row | None:
        return next((r for r in self.db.execute(
            "SELECT a.* FROM students s JOIN attempts a ON a.attempt_id = s.latest_attempt "
            "WHERE s.lesson=? AND s.student=?", (lesson, student))), None)

    def history(self, lesson: str, student: str) -> list[dict]:
        """Every attempt of a student, oldest first (attempt, run, time, status, score, sha256)."""
        return [dict(r) for r in self.db.execute(
            "SELECT attempt_id AS attempt, run_id AS run, recorded_at AS at, status, score, sha256 FROM attempts "
            "WHERE lesson=? AND student=? ORDER BY attempt_id", (lesson, student))]

    # ---- overrides ---------------------------------------------------------------------------------------
    def add_override(self, lesson: str, student: str, item: str, points: float, reason: str, by: str) -> int:
        with self.transaction() as db:
            cur = db.execute("INSERT INTO overrides (lesson, student, item, points, reason, by, at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (lesson, student, item, float(points), reason, by, now()))
            return int(cur.lastrowid)

    def drop_overrides(self, lesson: str, students: list[str], by: str, why: str, item: str | None = None) -> int:
        """Mark the active overrides of ``students`` (of one ``item``, or all) dropped; return how many."""
        n = 0
        with self.transaction() as db:
            for s in students:
                q = "UPDATE overrides SET dropped_at=?, dropped_by=?, dropped_reason=? WHERE lesson=? AND student=? " \
                    "AND dropped_at IS NULL" + (" AND item=?" if item else "")
                n += db.execute(q, (now(), by, why, lesson, s, *([item] if item else []))).rowcount
        return n

    def active_overrides(self, lesson: str, student: str | None = None) -> dict[str, dict[str, dict]]:
        """student -> item -> the newest active override (as a dict)."""
        q = "SELECT * FROM overrides WHERE lesson=? AND dropped_at IS NULL" + (" AND student=?" if student else "") + \
            " ORDER BY override_id"
        out: dict[str, dict[str, dict]] = {}
        for r in self.db.execute(q, (lesson, *([student] if student else []))):
            out.setdefault(r["student"], {})[r["item"]] = dict(r)
        return out

    def overrides_log(self, lesson: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM overrides WHERE lesson=? ORDER BY override_id", (lesson,))]


def _str_or_none(x) -> str | None:
    return None if x is None else str(x)


@contextmanager
def open_locked(out: Path, wait: bool = True, say=None):
    """:func:`locked` + :meth:`Store.open`: the only way a writer should open a store."""
    with locked(out, wait, say):
        store = Store.open(out)
        try:
            yield store
        finally:
            store.close()


@dataclass
class Run:
    """One grading run's hand-over to the store (used by ``pipeline.publish`` in the main thread)."""
    store: Store
    run_id: int
    lesson: str
    version: str
    mode: str
    probe_seed: int
    late: bool = False              # --late: every submission of this batch is late
    drop_overrides: bool = False    # --drop-overrides: a re-graded student's overrides are dropped
    shas: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def begin(cls, store: Store, lesson: str, source_notebook: Path, mode: str, probe_seed: int, info: dict,
              late: bool = False, drop_overrides: bool = False, settings: dict | None = None) -> "Run":
        """A new run; its version is :func:`grader_version` plus a hash of ``settings`` (the options
        that can change a score: re-check, sandbox, time and memory limits), so resuming never keeps
        a grade made under other options."""
        version = grader_version(source_notebook)
        if settings:
            version += "." + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        info = {**info, "late": late, "drop_overrides": drop_overrides, "git": git_describe(), "user": login_user(),
                "settings": settings or {}}
        return cls(store, store.start_run(lesson, version, mode, probe_seed, info), lesson, version, mode, probe_seed,
                   late, drop_overrides)

    def resume(self, subs: list, regrade: bool = False) -> tuple[list, list[str]]:
        """(submissions to grade, students skipped): a submission whose file, grader version, mode and
        probe seed match the student's latest graded attempt is skipped unless ``regrade``."""
        todo, skipped = [], []
        for s in subs:
            self.shas[s.student] = sha = file_sha256(s.path)
            if not regrade and self.store.already_graded(self.lesson, s.student, sha, self.version, self.mode,
                                                         self.probe_seed):
                skipped.append(s.student)
            else:
                todo.append(s)
        return todo, skipped

    def active_overrides(self, student: str) -> dict[str, dict]:
        """The overrides that will apply to ``student`` after this run records them."""
        return {} if self.drop_overrides else self.store.active_overrides(self.lesson, student).get(student, {})

    def record(self, res, sub) -> int:
        """Store ``res`` (one transaction, which also drops the student's overrides with ``drop_overrides``)."""
        sha = self.shas.get(res.student) if res.student in self.shas else file_sha256(getattr(sub, "path", None))
        why = f"re-graded with --drop-overrides (run {self.run_id})" if self.drop_overrides else None
        return self.store.record(res, sub, self.run_id, self.lesson, sha, self.version, self.mode, self.probe_seed,
                                 late=self.late, drop_overrides=why)

    def finish(self, **info) -> None:
        self.store.finish_run(self.run_id, info)
