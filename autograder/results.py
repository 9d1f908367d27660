"""Grading results as dataclasses, and their CSV / JSON files.

Status values:

* ``graded``   nbgrader ran to the end, nothing suspicious: the score counts;
* ``flagged``  graded, but with integrity evidence (``evidence``); items whose in-kernel result the
  out-of-kernel re-check contradicted are already scored 0. An instructor should read the evidence
  before releasing the grade;
* ``errored``  the submission could not be graded (``reason`` says why). ``score``, ``percent`` and
  ``pass`` are empty: an errored student never shows a score, in particular not an older one.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

GRADED, FLAGGED, ERRORED = "graded", "flagged", "errored"


@dataclass(frozen=True)
class Finding:
    """One piece of integrity evidence about a submission."""
    kind: str      # "structure" | "static" | "runtime" | "recheck"
    rule: str      # short machine-readable name, e.g. "edited-test-cell"
    where: str     # cell / line
    detail: str    # what was seen
    flag: bool = True  # False: informational only (does not make the student "flagged")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "rule": self.rule, "where": self.where, "detail": self.detail, "flag": self.flag}


@dataclass
class ItemResult:
    """One assessment item (``<item>__visible`` + ``<item>__hidden`` cells) for one student."""
    item: str
    objective: str
    score: float
    max_score: float
    parts: dict[str, float]          # grade id -> points nbgrader awarded
    recheck: str = "not-run"         # pass | mismatch | error | no-probe | not-run
    recheck_detail: str = ""
    zeroed: bool = False             # the grader set this item to 0 (re-check contradicted nbgrader)
    notes: list[str] = field(default_factory=list)   # e.g. "Checkpoint 2 — …: your cell 41 ran past the 15 s limit …"


@dataclass
class StudentResult:
    """Everything the grader reports about one student."""
    student: str
    submitted_as: str
    status: str
    reason: str = ""
    score: float | None = None
    max_score: float | None = None
    percent: float | None = None
    passed: bool | None = None
    objectives: dict[str, dict] = field(default_factory=dict)   # LO -> {"score", "max_score"}
    items: list[ItemResult] = field(default_factory=list)
    evidence: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    autograde_score: float | None = None   # nbgrader's own total before the re-check (information)
    notebook: str = ""
    feedback: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("passed")
        return d


@dataclass
class RunResult:
    """One grading run."""
    lesson: str
    threshold: float
    mode: str
    probe_seed: int
    max_score: float
    items: dict[str, dict]            # item -> {"objective", "max_score", "probe"}
    objectives: dict[str, str]
    missing_items: list[str]
    students: list[StudentResult]
    nbgrader_version: str = ""
    started: str = ""
    seconds: float = 0.0
    jobs: int = 1
    warnings: list[str] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)   # set by `autograder merge`: the merged runs

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(1 for r in self.students if r.status == s) for s in (GRADED, FLAGGED, ERRORED)}

    def exit_code(self) -> int:
        """0 all graded; 2 something errored; 3 nothing errored but something flagged."""
        c = self.counts
        return 2 if c[ERRORED] else 3 if c[FLAGGED] else 0

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "students"}
        d["counts"] = self.counts
        d["students"] = [s.as_dict() for s in self.students]
        return d


def student_from_dict(d: dict) -> StudentResult:
    """A :class:`StudentResult` from its ``results.json`` form (the inverse of ``as_dict``)."""
    d = dict(d)
    d["passed"] = d.pop("pass", None)
    d["items"] = [ItemResult(**i) for i in d.get("items", [])]
    known = StudentResult.__dataclass_fields__
    return StudentResult(**{k: v for k, v in d.items() if k in known})


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:g}" if float(x) != int(x) else str(int(x))


def write_results(run: RunResult, out: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.csv`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out / "results.json", out / "results.csv"
    jpath.write_text(json.dumps(run.as_dict(), indent=1, sort_keys=False) + "\n")
    los = list(run.objectives)
    with open(cpath, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "submitted_as", "status", "score", "max_score", "percent", "pass",
                    *[f"{lo}_score" for lo in los], *[f"{lo}_max" for lo in los], "reason", "evidence"])
        for s in run.students:
            lo_scores = [_fmt(s.objectives.get(lo, {}).get("score")) for lo in los]
            lo_max = [_fmt(s.objectives.get(lo, {}).get("max_score")) for lo in los]
            evidence = "; ".join(f"{e['rule']} @ {e['where']}" for e in s.evidence if e.get("flag", True))
            w.writerow([s.student, s.submitted_as, s.status, _fmt(s.score), _fmt(s.max_score),
                        "" if s.percent is None else f"{s.percent:.2f}",
                        "" if s.passed is None else ("yes" if s.passed else "no"),
                        *lo_scores, *lo_max, s.reason, evidence])
    return jpath, cpath
