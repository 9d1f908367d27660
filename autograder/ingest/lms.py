"""Who submitted what, read from the names an LMS gives the files of a bulk download.

Three download formats are understood. Each was read from the LMS's own code or from tools written
against real downloads (the references are given so the next reader can check them again):

* **Canvas** ("Download Submissions" of an assignment: one flat zip). Each file is
  ``<sortable name>_[LATE_]<user id>_<submission id>_<original file name>``; the sortable name is
  lower case without spaces or punctuation (``chenwei``), ``LATE_`` marks a file submitted after the
  due date, and a student who uploaded the same file name twice gets ``-1``, ``-2`` … before the
  extension (``lesson-1.ipynb``). Read in example downloads quoted by
  github.com/mikewesthad/canvas-unzipper (README) and github.com/TimHanneman/Canvas_submission_sort
  (README, ``sub_name.awk``: the late field and the ``-N`` suffix).
* **Moodle** ("Download all submissions" of an Assignment). Since Moodle 3.1 one folder per student
  and submission plugin, ``<Full Name>_<participant id>_assignsubmission_file_/<file>``; with "download
  submissions in folders" off, flat files ``<Full Name>_<participant id>_assignsubmission_file_<file>``.
  Moodle builds the prefix as ``clean_filename(str_replace('_', ' ', fullname) . '_' . uniqueid)``
  (``mod/assign/locallib.php``, ``download_submissions``), so the name holds no ``_`` and the
  participant id is the digits after it; blind marking writes ``Participant`` for the name; team
  submissions put ``<group>-`` before it. The file names carry no late mark: ``late`` is read from
  Moodle's *grading worksheet* (``Grades-….csv``, "Download grading worksheet") when it is put next to
  the submissions: its ``Identifier`` column is ``Participant <participant id>`` and its ``Status``
  column ends with Moodle's ``submittedlateshort`` string ``"<time> late"`` for late work
  (``mod/assign/lang/en/assign.php``, ``gradingtable.php`` ``col_status``; English only).
* **Blackboard Learn** (Grade Center → "Assignment File Download"). Flat files
  ``<assignment>_<username>_attempt_<YYYY-MM-DD-HH-MM-SS>_<original file name>`` plus one receipt
  ``<assignment>_<username>_attempt_<YYYY-MM-DD-HH-MM-SS>.txt`` per attempt whose ``Name:`` line is
  ``Name: <First Last> (<username>)``. Read in github.com/vangef/BBGradebookOrganiser
  (``utils/organiser.py``: the username is the field before ``_attempt_``; the receipt's ``Name:``).
  The download names no due date, so ``late`` stays False for Blackboard.

The **LMS user id** is the Canvas user id, the Moodle participant id, the Blackboard username: it is
what identifies the student (display names collide; two "Wei Chen" are two people). A name that looks
like one of these schemes but does not parse gets :func:`lookalike` 's explanation instead of a guess.
"""
from __future__ import annotations

import csv
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

CANVAS = re.compile(r"^(?P<name>[^_]*?)_(?:(?P<late>LATE)_)?(?P<uid>\d+)_(?P<sid>\d+)_(?P<orig>.+)$")
MOODLE_DIR = re.compile(r"^(?P<name>[^_]+)_(?P<pid>\d+)_(?P<plugin>assignsubmission_[a-z]+)_?$")
MOODLE_FILE = re.compile(r"^(?P<name>[^_]+)_(?P<pid>\d+)_(?P<plugin>assignsubmission_[a-z]+)_(?P<orig>.+)$")
BLACKBOARD = re.compile(r"^(?P<assignment>.+)_(?P<user>[^_]+)_attempt_"
                        r"(?P<ts>\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2})(?:_(?P<orig>.+)|(?P<receipt>\.txt))$")
RECEIPT_NAME = re.compile(r"^\s*Name:\s*(?P<name>.*?)\s*\((?P<user>[^()\s]+)\)\s*$", re.M)
CANVAS_COPY = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)$")   # Canvas renames a re-uploaded file name to name-N.ext

FORMATS = {
    "unknown": "no known scheme (Canvas, Moodle and Blackboard downloads are understood)",
    "canvas": "<sortable name>_[LATE_]<user id>_<submission id>_<file name>",
    "moodle": "<Full Name>_<participant id>_assignsubmission_file_/<file> (or …_assignsubmission_file_<file>)",
    "blackboard": "<assignment>_<username>_attempt_<YYYY-MM-DD-HH-MM-SS>_<file name>",
}


@dataclass(frozen=True)
class LmsName:
    """What one file or folder name of an LMS download says."""
    lms: str                          # canvas | moodle | blackboard
    user_id: str                      # Canvas user id, Moodle participant id, Blackboard username
    display_name: str
    late: bool = False
    submission_id: str | None = None  # Canvas submission id, Blackboard attempt time
    original: str = ""                # the student's own file name ("" for a Moodle folder, a receipt)
    receipt: bool = False             # a Blackboard attempt receipt (.txt)

    @property
    def key(self) -> str:
        """The raw student key: ``<lms>-<user id>`` (made a valid nbgrader id by ``discover``)."""
        return f"{self.lms}-{self.user_id}"

    def order(self) -> tuple:
        """Sorts the attempts of one user: the latest last (Canvas: submission id, then the ``-N`` copy
        number; Blackboard: the attempt time, which the name writes in sortable form)."""
        copy = CANVAS_COPY.match(Path(self.original).stem) if self.original else None
        sid = self.submission_id or ""
        return (int(sid) if sid.isdigit() else 0, sid, int(copy.group("n")) if copy else 0)


def parse(name: str, is_dir: bool) -> LmsName | None:
    """The LMS reading of a top-level name of the input, or None when it follows no known scheme."""
    if is_dir:
        m = MOODLE_DIR.match(name)
        return LmsName("moodle", m.group("pid"), m.group("name")) if m else None
    m = MOODLE_FILE.match(name)
    if m:
        return LmsName("moodle", m.group("pid"), m.group("name"), original=m.group("orig"))
    m = BLACKBOARD.match(name)
    if m:
        return LmsName("blackboard", m.group("user"), m.group("user"), submission_id=m.group("ts"),
                       original=m.group("orig") or "", receipt=bool(m.group("receipt")))
    m = CANVAS.match(name)
    if m:
        return LmsName("canvas", m.group("uid"), m.group("name"), late=bool(m.group("late")),
                       submission_id=m.group("sid"), original=m.group("orig"))
    return None


def lookalike(name: str, is_dir: bool) -> str | None:
    """Which LMS scheme a name that :func:`parse` rejected seems to follow (None: a plain name).

    Plain names are left alone, so only marks no plain student name has count: ``_assignsubmission_``
    or ``_onlinetext_`` (Moodle), ``_attempt_`` (Blackboard), ``_LATE_`` or two numbers right after the
    first ``_`` of a file name (Canvas: ``chenwei_1001_7001.ipynb``); ``" - "`` together with a number of five
    or more digits is another LMS's scheme ("unknown": e.g. ``123-456 - Jane Doe - Dec 6, 2026 …``).
    """
    if "_assignsubmission_" in name or "_onlinetext_" in name:
        return "moodle"
    if "_attempt_" in name:
        return "blackboard"
    if not is_dir and ("_LATE_" in name or re.match(r"^[^_]*_\d+_\d+", name)):
        return "canvas"
    if " - " in name and re.search(r"\d{5,}", name):   # e.g. "<ids> - <name> - <date>" of another LMS
        return "unknown"
    return None


def is_notebook_named(original: str, notebook: str) -> bool:
    """``original`` is the lesson's notebook, allowing Canvas's ``-N`` copy suffix (``lesson-2.ipynb``)."""
    if original == notebook:
        return True
    p, want = Path(original), Path(notebook)
    m = CANVAS_COPY.match(p.stem)
    return p.suffix == want.suffix and bool(m) and m.group("stem") == want.stem


def read_receipt(path: Path) -> tuple[str, str] | None:
    """(display name, username) from a Blackboard receipt's ``Name: First Last (username)`` line."""
    try:
        text = path.read_bytes()[:65536].decode("utf-8", errors="replace")
    except OSError:
        return None
    m = RECEIPT_NAME.search(text)
    return (m.group("name"), m.group("user")) if m else None


@dataclass(frozen=True)
class WorksheetRow:
    participant_id: str
    full_name: str
    late: bool


def read_moodle_worksheet(path: Path) -> dict[str, WorksheetRow] | None:
    """Participant id -> row of a Moodle grading worksheet, or None if ``path`` is not one.

    A worksheet is a CSV whose header has ``Identifier`` and ``Status``; ``Identifier`` cells are
    ``Participant <id>``; a ``Status`` ending in ``late`` (Moodle's ``"<time> late"``) marks late work.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
            rows = list(itertools.islice(csv.DictReader(fh), 100_000))
    except (OSError, csv.Error):
        return None
    if not rows or not {"Identifier", "Status"} <= set(rows[0]):
        return None
    out = {}
    for r in rows:
        m = re.search(r"(\d+)\s*$", r.get("Identifier") or "")
        if m:
            status = (r.get("Status") or "").strip()
            out[m.group(1)] = WorksheetRow(m.group(1), (r.get("Full name") or "").strip(),
                                           bool(re.search(r"\blate\b", status, re.I)))
    return out
