"""Grading on Dask (``--executor dask``) against a real ``LocalCluster`` of two worker processes.

Asserted: the same class graded by the local executor and by Dask gives byte-identical results.csv
and the same results.json apart from timings; a worker process killed (SIGKILL) while it grades a
submission -> the submission is graded elsewhere and stored once; a submission whose grading kills
its worker twice -> ``errored`` naming the killed worker, the batch completes; the client killed
mid-batch -> the same command again grades only what is missing; a scheduler that does not answer,
a worker of another course version or without a working sandbox, and a result that fails
validation each give a clear message and lose nothing.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

distributed = pytest.importorskip("distributed")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder import executors  # noqa: E402
from autograder.ingest.notebook import load_spec  # noqa: E402
from autograder.results.records import ERRORED, GRADED, ItemResult, StudentResult  # noqa: E402
from autograder.check.threshold_suite import solved, threshold_choices, with_failing  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
COMMON = ["--cell-timeout", "30", "--timeout", "240", "--probe-seed", "7", "--memory-gb", "2"]
ENV = {**os.environ, "MPLBACKEND": "Agg"}


def make_class(folder: Path, names: dict[str, str]) -> Path:
    """``names``: student -> kind (correct | threshold | untouched | corrupt | missing)."""
    base = solved(SPEC)
    (_, at_fail), _ = threshold_choices(SPEC)
    kinds = {"correct": with_failing(base, SPEC, set()), "threshold": with_failing(base, SPEC, set(at_fail)),
             "untouched": copy.deepcopy(SPEC.release)}
    for student, kind in names.items():
        d = folder / student / SPEC.lesson_id
        d.mkdir(parents=True)
        if kind == "corrupt":
            (d / SPEC.notebook_name).write_text('{"cells": [')
        elif kind != "missing":
            nbformat.write(kinds[kind], str(d / SPEC.notebook_name))
    return folder


def grade_cmd(subs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autograder", "grade", str(subs), "--lesson", SPEC.lesson_id, "--out", str(out),
            *COMMON, *extra]


def load(out: Path) -> dict:
    data = json.loads((out / "results.json").read_text())
    data["by"] = {s["student"]: s for s in data["students"]}
    return data


def journal(out: Path) -> list[dict]:
    """Every attempt the results store (the single writer) recorded, oldest first; ``final``: an
    attempt the next run keeps (graded or flagged; an errored one is graded again)."""
    import sqlite3
    path = out / "grades.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT student, status, score, result FROM attempts ORDER BY attempt_id").fetchall()
    except sqlite3.OperationalError:   # the store is being created
        return []
    finally:
        con.close()
    return [{"student": st, "status": status, "score": score, "final": status != "errored", "result": json.loads(r)}
            for st, status, score, r in rows]


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one thread each; a task fails after its second killed worker."""
    import dask
    from distributed import Client, LocalCluster
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.scheduler.worker-saturation": 1.0}):
        cl = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, memory_limit=0,
                          dashboard_address=None, scheduler_port=0)
        client = Client(cl, set_as_default=False)
        try:
            yield cl, client
        finally:
            client.close()
            cl.close()


class Killer(threading.Thread):
    """Kills (SIGKILL) the worker process running student X's task, ``kills[X]`` times, each time
    once the task has run for ``after`` seconds (mid-submission). Reads the scheduler's and the
    nannies' state in this process (no call to a worker that may be restarting)."""

    def __init__(self, cluster, client, kills: dict[str, int], after: float = 2.0):
        super().__init__(daemon=True)
        self.cluster, self.client, self.kills, self.after, self.log, self.stop = cluster, client, dict(kills), after, [], False
        self.seen: dict[tuple, float] = {}

    def run(self):
        while not self.stop and any(self.kills.values()):
            try:
                self._once()
            except Exception:   # a worker restarting: look again
                pass
            time.sleep(0.3)

    def _once(self):
        processing = {w: [str(k) for k in keys] for w, keys in self.client.processing().items()}
        for nanny in list(self.cluster.workers.values()):
            worker, proc = nanny.worker_address, nanny.process
            keys = processing.get(worker, [])
            if proc is None or proc.process is None or len(keys) != 1:   # kill only a worker whose one task is the target
                continue
            key = keys[0]
            student = next((s for s in self.kills if key.startswith(f"grade-{s}-")), None)
            if not student or not self.kills[student]:
                continue
            first = self.seen.setdefault((worker, key), time.monotonic())
            if time.monotonic() - first >= self.after:
                pid = proc.process.pid
                os.kill(pid, signal.SIGKILL)
                self.kills[student] -= 1
                self.log.append((student, worker, pid))
                return


# ---- the same class, local and Dask ------------------------------------------------------------------
def test_dask_and_local_give_identical_results(cluster, tmp_path):
    cl, client = cluster
    subs = make_class(tmp_path / "subs", {"alice": "correct", "bob": "threshold", "carol": "untouched",
                                          "dave": "corrupt", "erin": "missing"})
    local = subprocess.run(grade_cmd(subs, tmp_path / "local", "--jobs", "2", "--quiet"), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=900)
    dask = subprocess.run(grade_cmd(subs, tmp_path / "dask", "--executor", "dask", "--scheduler",
                                    cl.scheduler_address), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert local.returncode == dask.returncode == 2, local.stderr[-2000:] + dask.stderr[-2000:]
    assert (tmp_path / "local" / "results.csv").read_bytes() == (tmp_path / "dask" / "results.csv").read_bytes()
    a, b = load(tmp_path / "local"), load(tmp_path / "dask")

    def strip(d: dict, out: Path) -> dict:
        d = {k: v for k, v in d.items() if k not in ("seconds", "started", "jobs", "by", "runs")}
        d["students"] = [{**s, "seconds": None, "graded_at": None, "history": [{**h, "at": None, "attempt": None} for h in s["history"]],
                          "feedback": s["feedback"].replace(str(out), "OUT")} for s in d["students"]]
        return d
    assert strip(a, tmp_path / "local") == strip(b, tmp_path / "dask")
    assert b["by"]["alice"]["score"] == SPEC.total_points and b["by"]["carol"]["score"] == 0
    assert b["by"]["dave"]["status"] == ERRORED and b["by"]["erin"]["status"] == ERRORED
    for name in ("alice", "bob", "carol"):   # the files the workers sent back were published
        assert (tmp_path / "dask" / "autograded" / name / SPEC.lesson_id / SPEC.notebook_name).is_file()
        assert b["by"][name]["feedback"] and Path(b["by"][name]["feedback"]).is_file()
    from autograder.results.gradebook import open_gradebook
    with open_gradebook(tmp_path / "dask" / "gradebook.db") as gb:
        assert gb.find_submission(SPEC.lesson_id, "bob").score == pytest.approx(b["by"]["bob"]["score"])
    assert "Dask scheduler" in dask.stderr and "done 5 failed 2 remaining 0" in dask.stderr, dask.stderr[-2000:]
    assert "errored dave: the notebook is not valid JSON" in dask.stderr


# ---- faults ----------------------------------------------------------------------------------------------
def test_killed_workers_rerun_elsewhere_or_error_and_the_batch_completes(cluster, tmp_path):
    """alice's worker is killed once mid-submission: graded elsewhere, stored once. bob's grading
    kills its worker twice: errored (allowed-failures 1), the rest of the batch is graded."""
    cl, client = cluster
    subs = make_class(tmp_path / "subs", {"alice": "correct", "bob": "correct", "carol": "untouched"})
    # The killer only strikes a worker whose one task is the target; when the scheduler gives a worker two
    # tasks at the wrong moment it can miss its window (the grader is not at fault). Such a run does not
    # test the plan, so it is repeated (at most three runs, each into a fresh folder).
    for attempt_ in range(3):
        out = tmp_path / f"out{attempt_}"
        killer = Killer(cl, client, {"alice": 1, "bob": 2})
        killer.start()
        try:
            r = subprocess.run(grade_cmd(subs, out, "--executor", "dask", "--scheduler", cl.scheduler_address,
                                         "--no-feedback"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
        finally:
            killer.stop = True
            killer.join()
        if [s for s, _, _ in killer.log].count("alice") == 1 and [s for s, _, _ in killer.log].count("bob") == 2:
            break
        deadline = time.monotonic() + 60   # the nannies restart killed workers before the next run
        while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
    assert [s for s, _, _ in killer.log].count("alice") == 1 and [s for s, _, _ in killer.log].count("bob") == 2, killer.log
    res = load(out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert sorted(res["by"]) == ["alice", "bob", "carol"]
    assert res["by"]["alice"]["status"] == GRADED and res["by"]["alice"]["score"] == SPEC.total_points
    assert res["by"]["carol"]["status"] == GRADED and res["by"]["carol"]["score"] == 0
    bob = res["by"]["bob"]
    killed = [w for s, w, _ in killer.log if s == "bob"]
    assert bob["status"] == ERRORED and "killed its Dask worker" in bob["reason"], bob
    assert killed[-1] in bob["reason"], (bob["reason"], killed)   # names the worker
    assert "errored bob: grading infrastructure: grading this submission killed" in r.stderr
    entries = journal(out)
    assert sorted(e["student"] for e in entries) == ["alice", "bob", "carol"]   # each stored exactly once
    assert [e["final"] for e in entries if e["student"] == "bob"] == [False]     # graded again next time
    assert len(client.scheduler_info()["workers"]) == 2   # the nannies restarted the killed workers


def test_client_killed_mid_batch_then_the_same_command_grades_only_what_is_missing(cluster, tmp_path):
    cl, client = cluster
    subs = make_class(tmp_path / "subs", {"alice": "correct", "bob": "untouched", "carol": "threshold",
                                          "dave": "correct"})
    out = tmp_path / "out"
    cmd = grade_cmd(subs, out, "--executor", "dask", "--scheduler", cl.scheduler_address, "--no-feedback")
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(journal(out)) < 1 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.kill()
    p.wait()
    first = {e["student"]: e for e in journal(out)}
    assert 1 <= len(first) < 4 and not (out / "results.json").exists()
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(first)} of 4 already graded" in again.stderr and f"grading {4 - len(first)}" in again.stderr
    res = load(out)
    assert sorted(res["by"]) == ["alice", "bob", "carol", "dave"]
    for name, e in first.items():   # kept as stored (its grading time is the first run's)
        kept = res["by"][name]   # the stored attempt, not graded again
        assert (kept["status"], kept["score"], len(kept["history"])) == (e["status"], e["score"], 1)
    entries = journal(out)
    assert sorted(e["student"] for e in entries) == ["alice", "bob", "carol", "dave"]   # none graded twice
    assert res["by"]["alice"]["score"] == res["by"]["dave"]["score"] == SPEC.total_points
    # a changed notebook is graded again; the unchanged ones are not
    nbformat.write(copy.deepcopy(SPEC.release), str(subs / "dave" / SPEC.lesson_id / SPEC.notebook_name))
    third = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert "3 of 4 already graded" in third.stderr, third.stderr[-2000:]
    assert load(out)["by"]["dave"]["score"] == 0


def test_a_scheduler_that_does_not_answer_is_a_clear_error_and_writes_nothing(tmp_path):
    subs = make_class(tmp_path / "subs", {"alice": "correct"})
    r = subprocess.run(grade_cmd(subs, tmp_path / "out", "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9",
                                 "--connect-timeout", "3"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "the Dask scheduler at tcp://127.0.0.1:9 does not answer" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    r = subprocess.run(grade_cmd(subs, tmp_path / "out", "--executor", "dask"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "needs --scheduler" in r.stderr, r.stderr


def test_workers_of_another_course_version_refuse_and_the_batch_completes(cluster, tmp_path, monkeypatch):
    from autograder.pipeline import Options, grade
    cl, _ = cluster
    monkeypatch.setattr(executors, "course_version", lambda: "0" * 64)   # this client only
    subs = make_class(tmp_path / "subs", {"alice": "correct", "bob": "missing"})
    opts = Options(lesson=SPEC.lesson_id, out=tmp_path / "out", executor="dask", scheduler=cl.scheduler_address,
                   probe_seed=7, progress=False, work_root=tmp_path / "work")
    run = grade(subs, opts)
    alice = {s.student: s for s in run.students}["alice"]
    assert alice.status == ERRORED and "no Dask worker accepted" in alice.reason
    assert "has another version of the course" in alice.reason and "000000000000" in alice.reason
    workers = list(cl.scheduler_info["workers"]) if isinstance(cl.scheduler_info, dict) else []
    assert any(w in alice.reason for w in workers) or "tcp://" in alice.reason


def test_a_worker_without_a_working_sandbox_refuses(monkeypatch, tmp_path):
    from autograder import pipeline
    from autograder.isolate import sandbox
    monkeypatch.setattr(sandbox, "probe", lambda scratch: (False, "bwrap (Debian package bubblewrap) is not installed"))
    opts = pipeline.Options(lesson=SPEC.lesson_id, out=tmp_path / "out")
    job = {"key": "test-no-bwrap", "course_version": executors.course_version(), "probe_seed": 7,
           "options": {**{k: getattr(opts, k) for k in opts.__dataclass_fields__}, "out": str(tmp_path / "out")}}
    with pytest.raises(executors.WorkerRefused, match="cannot grade: the bubblewrap sandbox does not work here"):
        executors.worker_context(job)
    answer = executors.grade_task(job, {"student": "alice", "submitted_as": "alice", "data": b"{}", "sha256": "x"})
    assert "bubblewrap" in answer["refused"] and "pid" in answer["worker"]
    job["course_version"] = "f" * 64
    job["key"] = "test-version"
    with pytest.raises(executors.WorkerRefused, match="another version of the course"):
        executors.worker_context(job)


# ---- what comes back from a worker is checked ------------------------------------------------------------
def _payload(tmp_path, **change) -> tuple[dict, dict]:
    task = {"student": "alice", "submitted_as": "alice", "sha256": "ab" * 32}
    items = [ItemResult(i, SPEC.objective(i), 0.0, SPEC.item_points(i), {}) for i in SPEC.items]
    res = StudentResult("alice", "alice", GRADED, score=0.0, max_score=SPEC.total_points, percent=0.0, passed=False,
                        items=items)
    payload = {"format": executors.FORMAT, "worker": "tcp://w:1", "sha256": task["sha256"], "result": res.as_dict(),
               "files": {}}
    for k, v in change.items():   # the envelope's keys, else the result's fields
        if k in ("format", "worker", "sha256", "files"):
            payload[k] = v
        else:
            payload["result"][k] = v
    return payload, task


@pytest.mark.parametrize("change, message", [
    ({"student": "mallory"}, "is for student 'mallory'"),
    ({"score": float("nan")}, "not a finite number"),
    ({"score": 1e9}, "score 1000000000.0"),
    ({"status": "excellent"}, "unknown status"),
    ({"sha256": "cd" * 32}, "another notebook"),
    ({"files": {"autograded/../../../etc/x": b"x"}}, "unexpected file path"),
    ({"files": {"/etc/passwd": b"x"}}, "unexpected file path"),
    ({"files": {"autograded/x.ipynb": "not bytes"}}, "not a {path: bytes} mapping"),
    ({"files": {}}, "without its gradebook"),
    ({"format": 99}, "not a result of format"),
])
def test_results_that_fail_validation_are_refused(tmp_path, change, message):
    payload, task = _payload(tmp_path, **change)
    with pytest.raises(executors.InvalidResult, match=message.replace("(", r"\(").replace("{", r"\{")):
        executors.accept(payload, task, SPEC, tmp_path / "sdir")


def test_a_result_whose_gradebook_disagrees_is_refused(tmp_path):
    """A gradebook that is not one (or scores otherwise than the result) never reaches the store."""
    payload, task = _payload(tmp_path, files={"gradebook.db": b"SQLite format 3\0garbage"})
    with pytest.raises(executors.InvalidResult, match="gradebook cannot be read"):
        executors.accept(payload, task, SPEC, tmp_path / "sdir")
