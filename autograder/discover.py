"""Find the submissions in what an instructor hands the grader.

Accepted inputs (``SUBMISSIONS`` on the command line):

* a folder of student folders: ``<student>/<lesson-id>/<notebook>`` (nbgrader's own layout) or
  ``<student>/<notebook>``; the notebook may sit deeper (as in some LMS exports) but must have the
  lesson's notebook name;
* a flat folder of ``<student>.ipynb`` files;
* a ``.zip`` of either (as downloaded from an LMS). LMS naming is understood: Canvas files
  ``<student>_<digits>_<digits>_<original name>.ipynb`` (``LATE_`` allowed) and Moodle folders
  ``<student>_<digits>_assignsubmission_file_``.

A student folder with no notebook gets status ``errored`` ("missing"); one whose only notebooks
have another name gets ``errored`` ("renamed"). Student ids are reduced to characters nbgrader
accepts (letters, digits, ``.``, ``_``, ``-``); the original name is kept in the results.
"""
from __future__ import annotations

import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IGNORED = {"__MACOSX", ".ipynb_checkpoints", ".DS_Store", "Thumbs.db", ".git"}
CANVAS = re.compile(r"^(?P<student>[^_]+?)_(?:LATE_)?\d+_\d+_(?P<rest>.+)$")
MOODLE = re.compile(r"^(?P<student>.+?)_\d+_assignsubmission_\w*?_?$")
MAX_ZIP_BYTES = 4 * 1024**3
MAX_ZIP_FILES = 50_000


class InputError(ValueError):
    """The SUBMISSIONS argument cannot be used at all (the whole run stops with this message)."""


@dataclass
class Submission:
    """One student's entry: the notebook to grade, or the problem that prevents grading."""
    student: str                 # sanitised id used with nbgrader
    submitted_as: str            # the name in the input (folder or file)
    path: Path | None            # the notebook, or None
    problem: str | None = None   # why it cannot be graded (then path may be None)


def sanitize(name: str) -> str:
    """A student id nbgrader accepts: letters, digits, ``.``, ``_``, ``-`` (never empty)."""
    s = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "_", name)).strip("._-")
    return s or "student"


def _visible(p: Path) -> bool:
    return p.name not in IGNORED and not p.name.startswith((".", "~$"))


def _student_name(raw: str) -> str:
    m = MOODLE.match(raw)
    return m.group("student") if m else raw


def safe_extract(zip_path: Path, dest: Path) -> Path:
    """Extract ``zip_path`` into ``dest`` refusing absolute/parent paths, links and zip bombs."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise InputError(f"{zip_path} is not a readable zip file: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_FILES:
            raise InputError(f"{zip_path} has {len(infos)} entries (limit {MAX_ZIP_FILES})")
        if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
            raise InputError(f"{zip_path} would unpack to more than {MAX_ZIP_BYTES / 1e9:.0f} GB")
        for info in infos:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts:
                raise InputError(f"{zip_path} contains an unsafe path {info.filename!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                continue  # never follow links from an upload
            target = dest.joinpath(*name.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def _descend(root: Path, lesson_id: str, notebook: str) -> Path:
    """Skip wrapper folders (a zip's single top folder such as ``submissions/``).

    A lone folder is a wrapper unless it looks like one student's folder (it holds the notebook or
    a ``<lesson-id>/`` folder directly).
    """
    while True:
        children = [c for c in root.iterdir() if _visible(c)]
        if len(children) != 1 or not children[0].is_dir():
            return root
        only = children[0]
        if only.name == lesson_id or (only / lesson_id).is_dir() or (only / notebook).is_file():
            return root
        if not any(c.is_dir() or c.suffix == ".ipynb" for c in only.iterdir() if _visible(c)):
            return root
        root = only


def _notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb")
                  if p.is_file() and not any(part in IGNORED or part.startswith(".") for part in p.relative_to(folder).parts))


def _pick(folder: Path, lesson_id: str, notebook: str) -> tuple[Path | None, str | None]:
    for candidate in (folder / lesson_id / notebook, folder / notebook):
        if candidate.is_file():
            return candidate, None
    found = _notebooks(folder)
    named = [p for p in found if p.name == notebook]
    if len(named) == 1:
        return named[0], None
    if len(named) > 1:
        return None, (f"{len(named)} notebooks named {notebook} in the submission "
                      f"({', '.join(str(p.relative_to(folder)) for p in named[:4])}): keep one")
    if found:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:4])
        return None, (f"notebook renamed or wrong file: expected {lesson_id}/{notebook} (or {notebook}), "
                      f"found {names}; rename it to {notebook} and grade again")
    return None, f"missing notebook: no {notebook} (no .ipynb file at all) in the submission folder"


def discover(path: Path, lesson_id: str, notebook: str, scratch: Path) -> list[Submission]:
    """List the submissions under ``path`` (folder or zip); zips are unpacked into ``scratch``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise InputError(f"{path} is a file but not a .zip; give a folder of submissions or an LMS zip")
        path = safe_extract(path, scratch / "unzipped")
    root = _descend(path, lesson_id, notebook)
    subs: list[Submission] = []
    for entry in sorted(root.iterdir()):
        if not _visible(entry):
            continue
        if entry.is_file() and entry.suffix == ".ipynb":
            stem = entry.stem
            m = CANVAS.match(stem)
            raw = m.group("student") if m else stem
            subs.append(Submission(sanitize(raw), entry.name, entry))
        elif entry.is_dir():
            if entry.name == lesson_id:
                raise InputError(f"{root} looks like one student's folder (it holds {lesson_id}/): give the folder "
                                 "that contains one folder per student")
            nb, problem = _pick(entry, lesson_id, notebook)
            subs.append(Submission(sanitize(_student_name(entry.name)), entry.name, nb, problem))
    if not subs:
        raise InputError(f"no submissions found in {path}: expected <student>/{lesson_id}/{notebook}, "
                         f"<student>/{notebook}, <student>.ipynb files, or a zip of these")
    seen: dict[str, int] = {}
    for s in subs:  # make ids unique after sanitising
        n = seen.get(s.student, 0)
        seen[s.student] = n + 1
        if n:
            s.student = f"{s.student}-{n + 1}"
    return subs
