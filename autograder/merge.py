"""Combine results folders graded separately (shards of one class) into one, refusing conflicts.

``python -m autograder merge OUT SHARD [SHARD ...]``: each SHARD is the ``--out`` folder of one
``python -m autograder grade`` run (on another machine, another container, or another process on
this one). The merge

1. checks every shard: ``results.json`` readable and complete, and the same lesson, threshold and
   items (grade cells, points, objectives) in every shard — a shard graded against another version
   of the notebook is refused, naming what differs;
2. refuses a student who appears in more than one shard (grade each student in exactly one shard;
   re-grade a student by re-running their shard), naming the student and both shards;
3. checks that every graded or flagged student has their entry in the shard's ``gradebook.db``
   with the score ``results.json`` reports;
4. writes ``OUT/results.json`` + ``results.csv`` (every student of every shard; the shards' probe
   seeds, start times and durations under ``shards``), ``OUT/gradebook.db`` (each student's entry
   copied from their shard) and ``OUT/feedback/`` + ``OUT/autograded/``.

OUT must not exist or be empty: a merge never changes a folder it did not create.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import gradebook
from .results import ERRORED, RunResult, student_from_dict, write_results


class MergeError(ValueError):
    """The shards cannot be merged (the message names the shard and the problem)."""


SAME = ("lesson", "threshold", "max_score", "items", "objectives")


def _load(shard: Path) -> dict:
    path = Path(shard) / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{shard}: no results.json (not a results folder, or its grading run did not finish)") from None
    except ValueError as e:
        raise MergeError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in (*SAME, "students", "probe_seed") if k not in data]
    if missing or not isinstance(data.get("students"), list):
        raise MergeError(f"{path}: incomplete results (missing {', '.join(missing) or 'students list'})")
    for s in data["students"]:
        if not isinstance(s, dict) or not s.get("student") or s.get("status") not in ("graded", "flagged", "errored"):
            raise MergeError(f"{path}: a student entry is malformed: {str(s)[:200]}")
    return data


def merge(out: Path, shards: list[Path]) -> RunResult:
    """Merge ``shards`` into ``out`` (see the module docstring); raise MergeError on any conflict."""
    out, shards = Path(out), [Path(s) for s in shards]
    if len(shards) < 2:
        raise MergeError("give at least two shard folders to merge")
    if len({s.resolve() for s in shards}) != len(shards):
        raise MergeError("the same shard folder is given twice")
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out} is not empty: merge into a new folder")
    datas = [_load(s) for s in shards]
    first = datas[0]
    for shard, d in zip(shards[1:], datas[1:]):
        for key in SAME:
            if d[key] != first[key]:
                raise MergeError(f"{shard} was graded with a different {key} than {shards[0]} "
                                 f"({str(d[key])[:120]} vs {str(first[key])[:120]}): re-grade it with the same lesson")
    owner: dict[str, Path] = {}
    for shard, d in zip(shards, datas):
        for s in d["students"]:
            if s["student"] in owner:
                raise MergeError(f"student {s['student']!r} is in two shards ({owner[s['student']]} and {shard}); "
                                 "grade each student in exactly one shard")
            owner[s["student"]] = shard
    lesson = first["lesson"]
    for shard, d in zip(shards, datas):   # the gradebook agrees with results.json
        db = shard / "gradebook.db"
        for s in d["students"]:
            if s["status"] == ERRORED:
                continue
            if not db.exists():
                raise MergeError(f"{shard}: no gradebook.db")
            try:
                with gradebook.open_gradebook(db) as gb:
                    score = gb.find_submission(lesson, s["student"]).score
            except Exception as e:
                raise MergeError(f"{shard}: {s['student']!r} is {s['status']} in results.json but has no gradebook "
                                 f"entry ({type(e).__name__})") from None
            if abs(float(score) - float(s["score"])) > 1e-6:
                raise MergeError(f"{shard}: {s['student']!r} scores {s['score']} in results.json but {score} in "
                                 "gradebook.db (edited after grading?)")
    out.mkdir(parents=True, exist_ok=True)
    out_db = out / "gradebook.db"
    shutil.copyfile(shards[0] / "gradebook.db", out_db)
    keep = {s["student"] for s in datas[0]["students"] if s["status"] != ERRORED}
    with gradebook.open_gradebook(out_db) as gb:   # only the students results.json reports
        for sub in list(gb.assignment_submissions(lesson)):
            if sub.student_id not in keep:
                gb.remove_submission(lesson, sub.student_id)
    students = []
    for shard, d in zip(shards, datas):
        for s in d["students"]:
            res = student_from_dict(s)
            if shard != shards[0] and res.status != ERRORED:
                gradebook.merge_student(out_db, shard / "gradebook.db", lesson, res.student)
            for kind in ("autograded", "feedback"):
                src = shard / kind / res.student
                if src.exists() and res.status != ERRORED:
                    shutil.copytree(src, out / kind / res.student)
            if res.feedback:
                res.feedback = str(out / "feedback" / res.student / Path(res.feedback).relative_to(shard / "feedback" / res.student)) \
                    if Path(res.feedback).is_relative_to(shard / "feedback" / res.student) else res.feedback
            students.append(res)
    students.sort(key=lambda r: r.student)
    run = RunResult(lesson, first["threshold"], first.get("mode", ""), first["probe_seed"], first["max_score"],
                    first["items"], first["objectives"], first.get("missing_items", []), students,
                    first.get("nbgrader_version", ""), min(d.get("started", "") for d in datas),
                    round(sum(d.get("seconds", 0) for d in datas), 2), first.get("jobs", 1),
                    [w for d in datas for w in d.get("warnings", [])],
                    shards=[{"folder": str(s), "probe_seed": d["probe_seed"], "started": d.get("started"),
                             "seconds": d.get("seconds"), "students": len(d["students"])}
                            for s, d in zip(shards, datas)])
    write_results(run, out)
    return run
