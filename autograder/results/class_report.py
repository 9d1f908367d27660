"""The class report: what to re-teach, read from the whole class's results in one screen.

Input is ``results.json`` as the results store exports it (every student of the offering); output is
one HTML page, ``class_report.html``, plus the same numbers as CSV (``class_report_items.csv``,
``class_report_properties.csv``, ``class_report_objectives.csv``). ``python -m autograder.results.class_report
OUT`` reads ``OUT/results.json`` and writes into ``OUT``.

Notation. Students s = 1..N *with a score* (status ``graded`` or ``flagged``; ``errored`` students have
no score and are only counted), items i with maximum m_i, x_si the points of student s on item i, and
T_s = Σ_i x_si the student's total.

* **facility** (classical test theory's item "difficulty" p-value) p_i = (1/N) Σ_s x_si / m_i: the
  share of the item's points the class earned; low means hard.
* **discrimination** r_i = corr_s(x_si, T_s − x_si): the corrected item-total (Pearson) correlation.
  Near 0 or negative, the item does not separate students who know the lesson from those who do
  not (a flawed item, or one everybody gets right or wrong). Undefined (shown as "n/a") when either
  side is constant over the class or N < 3.
* **mastery** of an objective: the share of students whose score on the objective's items is at
  least the lesson's passing threshold times the objective's maximum.
* **failed property**: for a hidden check that failed, the property the out-of-kernel re-check found
  false (the first part of ``recheck_detail``, before " — "; the rest is instructor-only detail).
  Each (item, property) pair is a misconception, counted over the class with up to three example
  students.
"""
from __future__ import annotations

import csv
import html
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autograder.results.textsafe import clean, csv_cell

SCORED = ("graded", "flagged")
MAX_EXAMPLES = 3


def _text(value) -> str:
    """Student-controlled text for the page or a CSV (the one rule: :func:`autograder.results.textsafe.clean`)."""
    return clean(value)


@dataclass
class ItemStats:
    """One item over the class (formulas in the module docstring)."""
    item: str
    title: str
    objective: str
    max_score: float
    n: int                              # students with a score
    mean: float | None
    facility: float | None              # p_i
    discrimination: float | None        # r_i, None when undefined
    full: int                           # students with every point
    zero: int                           # students with no point
    distribution: dict[str, int]        # points -> number of students


@dataclass
class PropertyCount:
    """One failed hidden-check property (a misconception) with how many students it caught."""
    item: str
    title: str
    prop: str
    count: int
    examples: list[str]


@dataclass
class ObjectiveStats:
    """One learning objective over the class."""
    objective: str
    text: str
    max_score: float
    n: int
    mean_percent: float | None
    mastery: float | None               # share of students at or above the threshold


@dataclass
class ClassReport:
    """Everything on the page, as data."""
    lesson: str
    threshold: float
    students: int
    counts: dict[str, int]              # graded / flagged / errored
    late: int
    passed: int
    items: list[ItemStats] = field(default_factory=list)
    properties: list[PropertyCount] = field(default_factory=list)
    objectives: list[ObjectiveStats] = field(default_factory=list)
    errored: list[tuple[str, str]] = field(default_factory=list)   # (student, reason)

    def reteach(self, k: int = 3) -> list[str]:
        """The lowest-facility items, then the most frequent misconceptions: the one-screen summary."""
        hard = sorted((i for i in self.items if i.facility is not None), key=lambda i: i.facility)[:k]
        lines = [f"{i.title}: the class earned {i.facility:.0%} of its points" for i in hard]
        lines += [f"{p.title}: {p.count} student(s) failed '{p.prop}'" for p in self.properties[:k]]
        return lines


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r = Σ(x−x̄)(y−ȳ) / sqrt(Σ(x−x̄)² Σ(y−ȳ)²); None when n < 3 or a side is constant."""
    n = len(x)
    if n < 3 or n != len(y):
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx <= 1e-12 or syy <= 1e-12:
        return None
    return sxy / math.sqrt(sxx * syy)


def _points(v: float) -> str:
    return f"{v:g}"


def _item_stats(item: str, info: dict, title: str, scored: list[dict]) -> ItemStats:
    x = [next((float(r["score"]) for r in s.get("items", []) if r.get("item") == item), 0.0) for s in scored]
    total = [float(s.get("score") or 0.0) for s in scored]
    m = float(info.get("max_score") or 0.0)
    n = len(x)
    mean = sum(x) / n if n else None
    return ItemStats(item, title, info.get("objective", "?"), m, n, mean,
                     (mean / m) if (n and m) else None,
                     pearson(x, [t - xi for t, xi in zip(total, x)]),
                     sum(1 for v in x if m and v >= m - 1e-9), sum(1 for v in x if v <= 1e-9),
                     dict(sorted(Counter(_points(v) for v in x).items(), key=lambda kv: float(kv[0]))))


def _failed_properties(scored: list[dict], titles: dict[str, str]) -> list[PropertyCount]:
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for s in scored:
        for r in s.get("items", []):
            if r.get("recheck") in ("mismatch", "error"):
                prop = _text(str(r.get("recheck_detail") or "").split(" — ", 1)[0]).strip() or "fails on a hidden input"
                found[(r["item"], prop)].append(_text(s.get("student", "?")))
    out = [PropertyCount(i, titles.get(i, i), p, len(who), sorted(who)[:MAX_EXAMPLES]) for (i, p), who in found.items()]
    return sorted(out, key=lambda p: (-p.count, p.item, p.prop))


def _objective_stats(lo: str, text: str, scored: list[dict], threshold: float) -> ObjectiveStats:
    rows = [s.get("objectives", {}).get(lo) for s in scored]
    rows = [r for r in rows if r and r.get("max_score")]
    m = float(rows[0]["max_score"]) if rows else 0.0
    pct = [float(r["score"]) / float(r["max_score"]) for r in rows]
    return ObjectiveStats(lo, text, m, len(rows), (sum(pct) / len(pct)) if pct else None,
                          (sum(1 for p in pct if p >= threshold - 1e-9) / len(pct)) if pct else None)


def build(results: dict, titles: dict[str, str] | None = None) -> ClassReport:
    """The class report from a ``results.json`` document (``titles``: item -> exercise title)."""
    if not isinstance(results, dict) or not isinstance(results.get("students"), list):
        raise ValueError("not a results.json document: expected an object with a 'students' list")
    titles = dict(titles or {})
    students = results["students"]
    scored = [s for s in students if s.get("status") in SCORED and s.get("score") is not None]
    threshold = float(results.get("threshold", 0.75))
    items = results.get("items", {})
    rep = ClassReport(
        results.get("lesson", "?"), threshold, len(students),
        {k: sum(1 for s in students if s.get("status") == k) for k in ("graded", "flagged", "errored")},
        sum(1 for s in students if s.get("late")), sum(1 for s in scored if s.get("pass")))
    rep.items = [_item_stats(i, info, titles.get(i, i), scored) for i, info in items.items()]
    rep.properties = _failed_properties(scored, titles)
    rep.objectives = [_objective_stats(lo, text, scored, threshold) for lo, text in results.get("objectives", {}).items()]
    rep.errored = [(_text(s.get("student", "?")), _text(s.get("reason", ""))) for s in students if s.get("status") == "errored"]
    return rep


# ---- files ----------------------------------------------------------------------------------------------
def _csv_cell(v) -> str:
    """A CSV cell: numbers the report computed as numbers (a discrimination may be negative), every
    text through :func:`autograder.results.textsafe.csv_cell` (no formula injection, no control characters)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return csv_cell(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
    return path


def _item_rows(rep: ClassReport) -> list[dict]:
    return [{"item": i.item, "title": i.title, "objective": i.objective, "max_score": i.max_score, "students": i.n,
             "mean": i.mean, "facility": i.facility, "discrimination": i.discrimination, "full_marks": i.full,
             "zero": i.zero, "distribution": "; ".join(f"{k} pts: {v}" for k, v in i.distribution.items())}
            for i in rep.items]


def _hbars(labels: list[str], values: list[float], row_height: float, **style):
    """A horizontal bar chart, one bar per label, the first at the top; returns (figure, axes)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, row_height * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, **style)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    return fig, ax


def _figures(rep: ClassReport):
    """Two accessible figures: facility with discrimination per item, and mastery per objective."""
    from residual_bandwidth.viz.core import OKABE_ITO, AccessibleFigure, styled

    @styled
    def items_figure():
        fig, ax = _hbars([i.title for i in rep.items], [100 * (i.facility or 0) for i in rep.items], 0.5,
                         color=OKABE_ITO[0], hatch="//", edgecolor="white")
        for y, i in enumerate(rep.items):
            d = "n/a" if i.discrimination is None else f"{i.discrimination:.2f}"
            ax.text(101, y, f"r = {d}", va="center", fontsize=9)
        ax.axvline(100 * rep.threshold, color=OKABE_ITO[3], linestyle="--")
        ax.set_xlim(0, 120)
        ax.set_xlabel(f"share of the item's points the class earned (%); dashed line: pass line ({rep.threshold:.0%})")
        ax.set_title("Item facility (bars) and discrimination r (text)")
        fig.tight_layout()
        hardest = min((i for i in rep.items if i.facility is not None), key=lambda i: i.facility, default=None)
        alt = ("Horizontal bars, one per item, give the share of points the class earned; "
               + (f"the hardest item is '{hardest.title}' at {hardest.facility:.0%}. " if hardest else "no item was scored. ")
               + "The text beside each bar is its corrected item-total correlation; the dashed line is the pass line.")
        return AccessibleFigure(fig, alt, _item_rows(rep), "Item facility and discrimination")

    @styled
    def objectives_figure():
        fig, ax = _hbars([o.objective for o in rep.objectives], [100 * (o.mastery or 0) for o in rep.objectives],
                         0.6, color=OKABE_ITO[2], edgecolor="black")
        for y, o in enumerate(rep.objectives):
            ax.text(1, y, "n/a" if o.mastery is None else f"{o.mastery:.0%}", va="center", fontsize=9)
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"students at or above {rep.threshold:.0%} of the objective's points (%)")
        ax.set_title("Mastery per learning objective")
        fig.tight_layout()
        alt = "Horizontal bars give, per learning objective, the share of students at or above the pass line: " + "; ".join(
            f"{o.objective} {'n/a' if o.mastery is None else f'{o.mastery:.0%}'}" for o in rep.objectives) + "."
        rows = [{"objective": o.objective, "text": o.text, "students": o.n, "mean_percent": o.mean_percent,
                 "mastery": o.mastery} for o in rep.objectives]
        return AccessibleFigure(fig, alt, rows, "Mastery per learning objective")

    return [items_figure(), objectives_figure()]


def _table(caption: str, header: list[str], rows: list[list]) -> str:
    e = lambda v: html.escape(_text("" if v is None else v))  # noqa: E731
    head = "".join(f'<th scope="col">{e(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><caption>{e(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def render_html(rep: ClassReport, figures=()) -> str:
    """One accessible page: summary, what to re-teach, figures with captions and data, tables."""
    e = lambda v: html.escape(_text(v))  # noqa: E731
    c = rep.counts
    parts = [f"<h1>Class report: {e(rep.lesson)}</h1>",
             f"<p>{rep.students} students: {c['graded']} graded, {c['flagged']} flagged (scores pending the "
             f"instructor's review, included below), {c['errored']} errored (no score, listed at the end), "
             f"{rep.late} late. {rep.passed} of {c['graded'] + c['flagged']} scored students reached the pass line "
             f"({rep.threshold:.0%}).</p>",
             "<h2>What to re-teach</h2>",
             "<ul>" + "".join(f"<li>{e(x)}</li>" for x in rep.reteach()) + "</ul>" if rep.reteach() else "<p>Nothing scored yet.</p>"]
    parts.append("<h2>Items</h2>")
    parts += [f._repr_html_() for f in figures[:1]]
    parts.append(_table("Items: facility, discrimination and score distribution",
                        ["item", "objective", "max", "mean", "facility", "discrimination r", "full marks", "zero", "distribution"],
                        [[i.title, i.objective, f"{i.max_score:g}", "n/a" if i.mean is None else f"{i.mean:.2f}",
                          _pct(i.facility), "n/a" if i.discrimination is None else f"{i.discrimination:.2f}", i.full, i.zero,
                          "; ".join(f"{k} pts: {v}" for k, v in i.distribution.items())] for i in rep.items]))
    parts.append("<h2>Most frequent failed properties</h2>")
    parts.append(_table("Failed hidden-check properties, most frequent first", ["item", "property", "students", "examples"],
                        [[p.title, p.prop, p.count, ", ".join(p.examples)] for p in rep.properties])
                 if rep.properties else "<p>No hidden check failed.</p>")
    parts.append("<h2>Learning objectives</h2>")
    parts += [f._repr_html_() for f in figures[1:2]]
    parts.append(_table("Mastery per learning objective", ["objective", "text", "students", "mean", "mastery"],
                        [[o.objective, o.text, o.n, _pct(o.mean_percent), _pct(o.mastery)] for o in rep.objectives]))
    parts.append("<h2>Errored submissions</h2>")
    parts.append(_table("Errored submissions and why", ["student", "reason"], rep.errored) if rep.errored
                 else "<p>None.</p>")
    style = ("body{font-family:sans-serif;max-width:60rem;margin:auto;padding:1rem;color:#111}"
             "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #555;padding:.25rem .5rem;text-align:left}"
             "img{max-width:100%}")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
            f"<title>Class report: {e(rep.lesson)}</title><style>{style}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write(results: dict, out: Path, titles: dict[str, str] | None = None, figures: bool = True) -> dict[str, Path]:
    """Write the page and its CSV files into ``out``; returns their paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = build(results, titles)
    figs = _figures(rep) if figures else []
    paths = {"html": out / "class_report.html"}
    paths["html"].write_text(render_html(rep, figs), encoding="utf-8")
    for f in figs:
        f.close()
    paths["items"] = _write_csv(out / "class_report_items.csv", _item_rows(rep), list(ItemStats.__dataclass_fields__)
                                [:2] + ["objective", "max_score", "students", "mean", "facility", "discrimination",
                                        "full_marks", "zero", "distribution"])
    paths["properties"] = _write_csv(out / "class_report_properties.csv",
                                     [{**asdict(p), "examples": "; ".join(p.examples)} for p in rep.properties],
                                     list(PropertyCount.__dataclass_fields__))
    paths["objectives"] = _write_csv(out / "class_report_objectives.csv", [asdict(o) for o in rep.objectives],
                                     list(ObjectiveStats.__dataclass_fields__))
    return paths


def item_titles(lesson_id: str) -> dict[str, str]:
    """item -> exercise title as the student reads it in the notebook and the feedback page
    (:func:`autograder.check.scoring.exercise_titles`); {} for a lesson this repository does not hold (the
    page then names items by id)."""
    from residual_bandwidth.course.lesson import LessonMetadataError
    from autograder.ingest.notebook import SpecError, load_spec
    from autograder.check.scoring import exercise_titles
    try:
        return exercise_titles(load_spec(lesson_id))
    except (LessonMetadataError, SpecError):
        return {}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m autograder.results.class_report RESULTS_FOLDER", file=sys.stderr)
        return 1
    out = Path(args[0])
    src = out / "results.json"
    if not src.is_file():
        print(f"no results.json in {out} (grade first: make grade)", file=sys.stderr)
        return 1
    results = json.loads(src.read_text(encoding="utf-8"))
    paths = write(results, out, item_titles(results.get("lesson", "")))
    print("\n".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
