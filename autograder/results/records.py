"""Grading results as dataclasses, and their CSV / JSON files.

Status values:

* ``graded``   nbgrader ran to the end, nothing suspicious: the score counts;
* ``flagged``  graded, but with integrity evidence (``evidence``); items whose in-kernel result the
  out-of-kernel re-check contradicted are already scored 0. An instructor should read the evidence
  before releasing the grade;
* ``errored``  the submission could not be graded (``reason`` says why). ``score``, ``percent`` and
  ``pass`` are empty: an errored student never shows a score, in particular not an older one (the
  store keeps the older attempts: ``history`` in ``results.json``).

Every text written here passes through :mod:`autograder.results.textsafe` (control characters and terminal
escapes removed, spreadsheet formulas neutralised).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autograder.results.textsafe import csv_row, json_safe

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
    # identity and bookkeeping, filled from the store by the exports (autograder/results/exports.py)
    late: bool = False
    lms: str | None = None
    lms_user_id: str | None = None
    display_name: str = ""
    lms_submission_id: str | None = None
    sha256: str = ""
    grader_version: str = ""
    probe_seed: int | None = None
    mode: str = ""
    graded_at: str = ""
    overrides: list[dict] = field(default_factory=list)   # active manual overrides applied to the items
    history: list[dict] = field(default_factory=list)     # every attempt in the store, oldest first

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("passed")
        return d

    def recompute(self, threshold: float, objectives: list[str] | None = None) -> None:
        """Totals from the item scores: ``score = Σ items``, ``percent = 100·score/max_score``,
        ``pass = score ≥ threshold·max_score`` (1e-9 slack), and per objective ``Σ`` of its items'
        scores and maxima (for ``objectives``, default: the ones already listed)."""
        self.score = sum(i.score for i in self.items)
        self.percent = 100.0 * self.score / self.max_score if self.max_score else 0.0
        self.passed = self.score >= threshold * (self.max_score or 0.0) - 1e-9
        for lo in (objectives if objectives is not None else list(self.objectives)):
            its = [i for i in self.items if i.objective == lo]
            self.objectives[lo] = {"score": sum(i.score for i in its), "max_score": sum(i.max_score for i in its)}


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
    runs: list[dict] = field(default_factory=list)     # every run recorded in the store (summary)
    overrides_log: list[dict] = field(default_factory=list)   # every manual override, dropped ones too
    batch: list[str] | None = None     # students of this run (incl. skipped as already graded); None: all
    skipped: list[str] = field(default_factory=list)   # this run's students already graded (resume)

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(1 for r in self.students if r.status == s) for s in (GRADED, FLAGGED, ERRORED)}

    def exit_code(self) -> int:
        """Over this run's students: 0 all graded; 2 something errored; 3 nothing errored but something flagged."""
        mine = self.students if self.batch is None else [s for s in self.students if s.student in set(self.batch)]
        st = {s.status for s in mine}
        return 2 if ERRORED in st else 3 if FLAGGED in st else 0

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("students", "batch", "skipped")}
        d["counts"] = self.counts
        d["students"] = [s.as_dict() for s in self.students]
        return d


def student_from_dict(d: dict) -> StudentResult:
    """A :class:`StudentResult` from its ``results.json`` form (the inverse of ``as_dict``)."""
    d = dict(d)
    d["passed"] = d.pop("pass", None)
    items = ItemResult.__dataclass_fields__
    d["items"] = [ItemResult(**{k: v for k, v in i.items() if k in items}) for i in d.get("items", [])]
    known = StudentResult.__dataclass_fields__
    return StudentResult(**{k: v for k, v in d.items() if k in known})


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:g}" if float(x) != int(x) else str(int(x))


CSV_IDENTITY = ["late", "lms", "lms_user_id", "display_name", "overrides"]   # no timestamps: the same grades, the same file


def _replace(path: Path, write) -> Path:
    """Write ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)
    return path


def write_csv(path: Path, header: list[str], rows) -> Path:
    """A CSV file whose every field went through :func:`autograder.results.textsafe.csv_cell`."""
    def write(f):
        w = csv.writer(f)
        w.writerow(csv_row(header))
        for r in rows:
            w.writerow(csv_row(r))
    return _replace(path, write)


def write_json(path: Path, data) -> Path:
    """A JSON file whose every string went through :func:`autograder.results.textsafe.json_safe`."""
    return _replace(path, lambda f: f.write(json.dumps(json_safe(data), indent=1, sort_keys=False) + "\n"))


def write_results(run: RunResult, out: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.csv`` into ``out`` (text made safe, files replaced atomically).

    A row depends only on that student's latest attempt and overrides, so grading other students
    leaves it byte-identical."""
    out.mkdir(parents=True, exist_ok=True)
    jpath = write_json(out / "results.json", run.as_dict())
    los = list(run.objectives)
    rows = []
    for s in run.students:
        lo_scores = [_fmt(s.objectives.get(lo, {}).get("score")) for lo in los]
        lo_max = [_fmt(s.objectives.get(lo, {}).get("max_score")) for lo in los]
        evidence = "; ".join(f"{e['rule']} @ {e['where']}" for e in s.evidence if e.get("flag", True))
        overrides = "; ".join(f"{o['item']}={_fmt(o['points'])} by {o['by']}" for o in s.overrides)
        rows.append([s.student, s.submitted_as, s.status, _fmt(s.score), _fmt(s.max_score),
                     "" if s.percent is None else f"{s.percent:.2f}",
                     "" if s.passed is None else ("yes" if s.passed else "no"),
                     *lo_scores, *lo_max, s.reason, evidence,
                     "yes" if s.late else "no", s.lms or "", s.lms_user_id or "", s.display_name, overrides])
    cpath = write_csv(out / "results.csv", ["student", "submitted_as", "status", "score", "max_score", "percent",
                                            "pass", *[f"{lo}_score" for lo in los], *[f"{lo}_max" for lo in los],
                                            "reason", "evidence", *CSV_IDENTITY], rows)
    return jpath, cpath
