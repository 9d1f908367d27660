"""Find the submissions in what an instructor hands the grader, and give each student an id.

Accepted inputs (``SUBMISSIONS`` on the command line):

* a folder of student folders: ``<student>/<lesson-id>/<notebook>`` (nbgrader's own layout) or
  ``<student>/<notebook>``; the notebook may sit deeper but must have the lesson's notebook name;
* a flat folder of ``<student>.ipynb`` files;
* an LMS download (Canvas, Moodle, Blackboard Learn; formats in :mod:`autograder.ingest.lms`), as its zip or
  unpacked;
* a ``.zip`` of any of these. A single wrapper folder at the top is skipped.

**Student ids** (nbgrader's ``student``; they name folders, so only letters, digits, ``.``, ``_``, ``-``):

* an LMS entry is ``<lms>-<LMS user id>`` (``canvas-123456``, ``moodle-987``, ``blackboard-jsmith``),
  never the display name and never a position, so the same student keeps the same id in every batch;
* a plain folder or file name that is already a valid id (at most 64 characters) is the id itself;
* any other name gets ``<sanitized name>-<8 hex of sha256(name)>`` (``ctrl full`` → ``ctrl_full-1a2b3c4d``):
  a changed name never takes the id of a name that needed no change, and the suffix depends on the name
  alone, so the id does not depend on the order of the folder nor on the other students of the batch.
  Should an id be taken anyway (a folder literally named like another's hashed id, or two hashes that
  meet), claims are settled by rank — LMS ids, then unchanged names, then changed names, each in sorted
  order of the raw name — and a loser re-hashes with a counter until its id is free. See :func:`assign_ids`.

**Per-student problems** (the student is ``errored`` with ``problem``; the batch goes on): no notebook,
a renamed notebook, several candidates, a notebook (or the student's folder) that is a symbolic link or
not a regular file (links are never followed, in folders as in zips), a zip entry that points outside
the zip, is a link, appears twice, is corrupt or cannot be written (``OSError``, e.g. a 300-byte UTF-8
name), and — in an LMS download — an entry whose name follows no known scheme. Empty, truncated,
non-UTF-8 or non-notebook files are found when the notebook is read (``notebook.read_submission``), also
per student. Only an input that cannot be used at all raises :class:`InputError`.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from autograder.ingest import lms as lmsmod

IGNORED = {"__MACOSX", ".ipynb_checkpoints", ".DS_Store", "Thumbs.db", ".git"}
MAX_ZIP_BYTES = 4 * 1024**3
MAX_ZIP_FILES = 50_000
MAX_ID = 64


class InputError(ValueError):
    """The SUBMISSIONS argument cannot be used at all (the whole run stops with this message)."""


@dataclass
class Submission:
    """One student's entry: the notebook to grade, or the problem that prevents grading."""
    student: str                 # nbgrader id (see the module docstring for the rule)
    submitted_as: str            # the name in the input (folder or file)
    path: Path | None            # the notebook, or None
    problem: str | None = None   # why it cannot be graded (then path may be None)
    lms: str | None = None       # "canvas" | "moodle" | "blackboard" | None
    lms_user_id: str | None = None
    display_name: str = ""
    late: bool = False
    lms_submission_id: str | None = None
    notes: list[str] = field(default_factory=list)   # what discovery set aside (older attempts, links …)


@dataclass(frozen=True)
class Refused:
    """Something not unpacked or not followed: ``rel`` is its (made safe) path below the input root."""
    rel: tuple[str, ...]
    reason: str

    @property
    def fatal(self) -> bool:
        """A refused notebook decides the student's status; other refused files are only noted."""
        return self.rel[-1].lower().endswith(".ipynb") if self.rel else True


def sanitize(name: str) -> str:
    """Letters, digits, ``.``, ``_``, ``-`` only (never empty). Not an id by itself: see :func:`student_id`."""
    s = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "_", name)).strip("._-")
    return s or "student"


def _hash(raw: str, salt: int = 0) -> str:
    return hashlib.sha256((raw if not salt else f"{raw}\0{salt}").encode("utf-8", "surrogateescape")).hexdigest()[:8]


def student_id(raw: str, salt: int = 0) -> str:
    """The id ``raw`` asks for: itself when it is already valid (and short), else sanitized + hash."""
    s = sanitize(raw)
    if s == raw and len(s) <= MAX_ID and not salt:
        return s
    return f"{s[:MAX_ID - 9].rstrip('._-') or 'student'}-{_hash(raw, salt)}"


def assign_ids(claims: list[tuple[bool, str, str]]) -> list[str]:
    """Unique ids for ``(is_lms, raw key, shown name)`` claims, in the order given (rule: module docstring).

    Claims are settled in the order: LMS keys needing no change, plain names needing no change, changed
    names; within each by raw key, then shown name. A claim whose id is taken re-hashes with a counter.
    """
    def rank(i: int) -> tuple:
        is_lms, key, shown = claims[i]
        return (0 if student_id(key) == key and is_lms else 1 if student_id(key) == key else 2, key, shown)
    ids: list[str] = [""] * len(claims)
    taken: set[str] = set()
    for i in sorted(range(len(claims)), key=rank):
        key, salt = claims[i][1], 0
        sid = student_id(key)
        while sid in taken:
            salt += 1
            sid = student_id(key, salt)
        taken.add(sid)
        ids[i] = sid
    return ids


def _show(name: str) -> str:
    """A name fit for a message: control characters escaped, at most 120 characters."""
    s = name if len(name) <= 120 else name[:117] + "..."
    return repr(s)


# ---- zips ------------------------------------------------------------------------------------------------
def _safe_parts(raw: str) -> tuple[tuple[str, ...], bool]:
    """(path parts without ``..``, ``.``, drive or root; whether the name was unsafe)."""
    norm = raw.replace("\\", "/")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    unsafe = norm.startswith("/") or ".." in parts or bool(parts and re.match(r"^[A-Za-z]:$", parts[0]))
    parts = [p for p in parts if p != ".." and not re.match(r"^[A-Za-z]:$", p)]
    return tuple(parts), unsafe


def safe_extract(zip_path: Path, dest: Path) -> tuple[Path, list[Refused]]:
    """Unpack ``zip_path`` into ``dest``, entry by entry; return ``dest`` and what was refused.

    Never written: absolute or ``..`` paths, links and other non-regular entries, a path the zip
    holds twice (then neither copy counts), an entry that is corrupt or whose write fails (``OSError``).
    The whole zip is refused (:class:`InputError`) only when it is unreadable or over the size or
    file-count limits.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{zip_path} is not a readable zip file: {e}") from None
    refused: list[Refused] = []
    dest.mkdir(parents=True, exist_ok=True)
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_FILES:
            raise InputError(f"{zip_path} has {len(infos)} entries (limit {MAX_ZIP_FILES})")
        if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
            raise InputError(f"{zip_path} would unpack to more than {MAX_ZIP_BYTES / 1e9:.0f} GB")
        count: dict[tuple[str, ...], int] = {}
        for info in infos:
            parts, unsafe = _safe_parts(info.filename)
            if parts and not unsafe and not info.is_dir():
                count[parts] = count.get(parts, 0) + 1
        reported: set[tuple[str, ...]] = set()
        for info in infos:
            parts, unsafe = _safe_parts(info.filename)
            mode = info.external_attr >> 16
            if not parts:
                continue
            if unsafe:
                refused.append(Refused(parts, f"zip entry {_show(info.filename)} points outside the zip "
                                              "(absolute or '..' path) and was not unpacked"))
                continue
            if stat.S_ISLNK(mode):
                refused.append(Refused(parts, f"zip entry {_show(info.filename)} is a symbolic link; links are "
                                              "never unpacked: submit the file itself"))
                continue
            if info.is_dir():
                try:
                    dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    refused.append(Refused(parts, f"folder {_show(info.filename)} could not be unpacked ({e.strerror or e})"))
                continue
            if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                refused.append(Refused(parts, f"zip entry {_show(info.filename)} is not a regular file"))
                continue
            if count.get(parts, 0) > 1:   # no copy is unpacked; reported once
                if parts not in reported:
                    reported.add(parts)
                    refused.append(Refused(parts, f"the zip holds {count[parts]} entries named {_show(info.filename)}; "
                                                  "cannot tell which one was submitted"))
                continue
            target = dest.joinpath(*parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as out:
                    shutil.copyfileobj(src, out)
            except OSError as e:
                _unlink(target)
                refused.append(Refused(parts, f"{_show(info.filename)} could not be unpacked ({e.strerror or e})"))
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
                _unlink(target)
                refused.append(Refused(parts, f"{_show(info.filename)} is corrupt in the zip ({type(e).__name__}: {e})"))
    return dest, refused


def _unlink(p: Path) -> None:
    try:
        if p.is_file() and not p.is_symlink():
            p.unlink()
    except OSError:
        pass


# ---- folders ---------------------------------------------------------------------------------------------
def _visible(name: str) -> bool:
    return name not in IGNORED and not name.startswith((".", "~$"))


def _kind(p: Path) -> str:
    """dir | file | link | other (never follows a link)."""
    try:
        m = os.lstat(p).st_mode
    except OSError:
        return "other"
    return "link" if stat.S_ISLNK(m) else "dir" if stat.S_ISDIR(m) else "file" if stat.S_ISREG(m) else "other"


def _not_regular(p: Path, shown: str) -> str:
    if _kind(p) == "link":
        try:
            to = os.readlink(p)
        except OSError:
            to = "?"
        return f"{shown} is a symbolic link (to {_show(to)}); links are never followed: submit the file itself"
    return f"{shown} is not a regular file"


def _walk(folder: Path) -> tuple[list[Path], list[tuple[Path, str]], list[str]]:
    """(regular ``.ipynb`` files, [(refused notebook or folder, reason)], [notes]) below ``folder``.

    Never follows a link: a link (or FIFO, socket, device) named ``*.ipynb`` or pointing to a folder
    is refused; any other is only noted."""
    found, refused, notes = [], [], []
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            notes.append(f"{d.name} cannot be read ({e.strerror or e})")
            continue
        for e in entries:
            if not _visible(e.name):
                continue
            p = Path(e.path)
            k = _kind(p)
            if k == "dir":
                stack.append(p)
            elif k == "file":
                if e.name.endswith(".ipynb"):
                    found.append(p)
            elif e.name.endswith(".ipynb") or os.path.isdir(p):
                refused.append((p, _not_regular(p, str(p.relative_to(folder)))))
            else:
                notes.append(_not_regular(p, str(p.relative_to(folder))))
    return sorted(found), refused, notes


def _descend(root: Path, lesson_id: str, notebook: str) -> Path:
    """Skip wrapper folders (a zip's single top folder such as ``submissions/``).

    A lone folder is a wrapper unless it looks like one student's folder (it holds the notebook or
    a ``<lesson-id>/`` folder directly) or like an LMS entry.
    """
    while True:
        children = [c for c in root.iterdir() if _visible(c.name)]
        if len(children) != 1 or _kind(children[0]) != "dir":
            return root
        only = children[0]
        if only.name == lesson_id or _kind(only / lesson_id) == "dir" or (only / notebook).exists() \
                or (only / notebook).is_symlink() or lmsmod.parse(only.name, True):
            return root
        if not any(_kind(c) == "dir" or c.suffix == ".ipynb" for c in only.iterdir() if _visible(c.name)):
            return root
        root = only


# ---- one student's files -----------------------------------------------------------------------------------
@dataclass
class _Entry:
    """One top-level name of the input (a student's folder or file), with what was refused below it."""
    name: str
    path: Path | None                 # None when nothing of it could be unpacked
    kind: str                         # dir | file | link | other | absent
    refused: list[Refused] = field(default_factory=list)
    lms: lmsmod.LmsName | None = None


def _pick(folder: Path, lesson_id: str, notebook: str) -> tuple[Path | None, str | None, list[str]]:
    """(notebook, problem, notes) for a plain student folder or a Moodle submission folder."""
    found, refused, notes = _walk(folder)
    if refused:
        return None, "; ".join(why for _, why in refused[:3]), notes
    for candidate in (folder / lesson_id / notebook, folder / notebook):
        if candidate in found:
            return candidate, None, notes
    named = [p for p in found if p.name == notebook]
    if len(named) == 1:
        return named[0], None, notes
    if len(named) > 1:
        return None, (f"{len(named)} notebooks named {notebook} in the submission "
                      f"({', '.join(str(p.relative_to(folder)) for p in named[:4])}): keep one"), notes
    if found:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:4])
        return None, (f"notebook renamed or wrong file: expected {lesson_id}/{notebook} (or {notebook}), "
                      f"found {names}; rename it to {notebook} and grade again"), notes
    return None, f"missing notebook: no {notebook} (no .ipynb file at all) in the submission folder", notes


def _key(e: _Entry) -> str:
    """The raw student key of a plain entry: the folder name, or the file name without ``.ipynb``."""
    return e.name[:-len(".ipynb")] if e.kind != "dir" and e.name.endswith(".ipynb") and len(e.name) > 6 else e.name


def _plain(e: _Entry, lesson_id: str, notebook: str) -> Submission:
    """A plain (non-LMS) entry: ``<student>/`` or ``<student>.ipynb``."""
    sub = Submission(_key(e), e.name, None)
    fatal = [r.reason for r in e.refused if r.fatal]
    sub.notes += [r.reason for r in e.refused if not r.fatal]
    if fatal:
        sub.problem = "; ".join(fatal[:3])
    elif e.kind in ("link", "other"):
        sub.problem = _not_regular(e.path, e.name)
    elif e.kind == "dir":
        sub.path, sub.problem, notes = _pick(e.path, lesson_id, notebook)
        sub.notes += notes
    elif e.kind == "file":
        sub.path = e.path
    else:
        sub.problem = f"{_show(e.name)} could not be unpacked"
    return sub


def _lms_group(entries: list[_Entry], lesson_id: str, notebook: str,
               worksheet: dict[str, lmsmod.WorksheetRow]) -> Submission:
    """All entries of one LMS user: pick the notebook (the latest attempt), collect the problems."""
    first = entries[0].lms
    latest = max((e.lms for e in entries if not e.lms.receipt), key=lmsmod.LmsName.order, default=first)
    sub = Submission(first.key, entries[0].name, None, lms=first.lms, lms_user_id=first.user_id,
                     display_name=first.display_name, late=latest.late, lms_submission_id=latest.submission_id)
    fatal: list[str] = []
    candidates: list[tuple[lmsmod.LmsName, Path, str]] = []    # (name, notebook path, shown name)
    others: list[str] = []
    for e in entries:
        sub.notes += [r.reason for r in e.refused if not r.fatal]
        fatal += [r.reason for r in e.refused if r.fatal]
        if e.lms.receipt:
            got = lmsmod.read_receipt(e.path) if e.kind == "file" else None
            if got:
                sub.display_name = got[0]
            continue
        if e.kind in ("link", "other"):
            whole = e.name.endswith(".ipynb") or os.path.isdir(e.path)
            (fatal if whole else sub.notes).append(_not_regular(e.path, e.name))
        elif e.kind == "dir":          # a Moodle submission folder
            found, refused, notes = _walk(e.path)
            fatal += [why for _, why in refused]
            sub.notes += notes
            for p in found:
                candidates.append((e.lms, p, f"{e.name}/{p.relative_to(e.path)}"))
            if not found:
                others += [f"{e.name}/{c.name}" for c in sorted(e.path.iterdir())[:4]]
        elif e.kind == "file":
            if e.lms.original.endswith(".ipynb"):
                candidates.append((e.lms, e.path, e.name))
            else:
                others.append(e.name)
    if first.lms == "moodle" and first.user_id in worksheet:
        row = worksheet[first.user_id]
        sub.late = row.late
        sub.display_name = row.full_name or sub.display_name
    if fatal:
        sub.problem = "; ".join(fatal[:3])
        return sub
    def is_lesson(c: tuple[lmsmod.LmsName, Path, str]) -> bool:
        name = c[0].original or c[1].name
        return lmsmod.is_notebook_named(name, notebook) if c[0].lms == "canvas" else name == notebook
    named = [c for c in candidates if is_lesson(c)]
    if not named:
        if candidates:
            sub.problem = (f"notebook renamed or wrong file: expected {notebook}, found "
                           f"{', '.join(c[2] for c in candidates[:4])}; rename it to {notebook} and grade again")
        else:
            sub.problem = (f"missing notebook: no {notebook} from this {first.lms} user"
                           + (f" (submitted only: {', '.join(others[:4])})" if others else ""))
        return sub
    if first.lms == "moodle" and len(named) > 1:
        sub.problem = f"{len(named)} notebooks named {notebook} in the submission ({', '.join(c[2] for c in named[:4])}): keep one"
        return sub
    named.sort(key=lambda c: (c[0].order(), c[2]))
    chosen = named[-1]
    sub.path, sub.submitted_as = chosen[1], chosen[2].split("/")[0]
    if first.lms == "canvas":
        sub.late = chosen[0].late
    sub.lms_submission_id = chosen[0].submission_id
    if len(named) > 1:
        sub.notes.append(f"{len(named)} notebooks from this {first.lms} user: graded the latest, {chosen[2]}; "
                         f"not graded: {', '.join(c[2] for c in named[:-1][:4])}")
    return sub


# ---- the whole input ---------------------------------------------------------------------------------------
def _entries(root: Path, base: Path, refused: list[Refused]) -> list[_Entry]:
    """Top-level entries of ``root`` plus the refused zip entries (attributed to their top-level name)."""
    prefix = root.relative_to(base).parts
    by_name: dict[str, _Entry] = {}
    for p in sorted(root.iterdir()):
        if _visible(p.name):
            by_name[p.name] = _Entry(p.name, p, _kind(p))
    for r in refused:
        rel = r.rel[len(prefix):] if r.rel[:len(prefix)] == prefix and len(r.rel) > len(prefix) else r.rel
        if not _visible(rel[0]):
            continue
        if rel[0] not in by_name:
            by_name[rel[0]] = _Entry(rel[0], None, "absent" if len(rel) == 1 else "dir-absent")
        by_name[rel[0]].refused.append(Refused(rel, r.reason))
    return list(by_name.values())


def _is_candidate(e: _Entry) -> bool:
    """A top-level entry that is meant as a submission (a folder, a notebook); other files are not."""
    return e.kind in ("dir", "absent", "dir-absent") or e.name.endswith(".ipynb") \
        or (e.kind == "link" and os.path.isdir(e.path))


def _fix_blackboard_users(entries: list[_Entry]) -> None:
    """A Blackboard username with ``_`` in it is cut wrongly by the name alone (``HW_3_j_smith_attempt_…``
    reads as user ``smith``); the attempt's receipt names the user: ``Name: Jo Smith (j_smith)``."""
    stems: dict[str, str] = {}
    for e in entries:
        if e.lms and e.lms.lms == "blackboard" and e.lms.receipt and e.kind == "file":
            got = lmsmod.read_receipt(e.path)
            stem = e.name[:-len(".txt")]
            if got and got[1] != e.lms.user_id and stem.split("_attempt_")[0].endswith("_" + got[1]):
                stems[stem] = got[1]
    for e in entries:
        if e.lms and e.lms.lms == "blackboard":
            for stem, user in stems.items():
                if e.name == stem + ".txt" or e.name.startswith(stem + "_"):
                    e.lms = replace(e.lms, user_id=user, display_name=user)


def discover(path: Path, lesson_id: str, notebook: str, scratch: Path) -> list[Submission]:
    """List the submissions under ``path`` (folder or zip); zips are unpacked into ``scratch``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    refused: list[Refused] = []
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise InputError(f"{path} is a file but not a .zip; give a folder of submissions or an LMS zip")
        path, refused = safe_extract(path, scratch / "unzipped")
    root = _descend(path, lesson_id, notebook)
    entries = _entries(root, path, refused)
    worksheet: dict[str, lmsmod.WorksheetRow] = {}
    for e in entries:
        if e.kind == "file" and e.name.lower().endswith(".csv"):
            worksheet.update(lmsmod.read_moodle_worksheet(e.path) or {})
        e.lms = lmsmod.parse(e.name, e.kind in ("dir", "dir-absent") or (e.kind == "link" and os.path.isdir(e.path)))
    if any(e.kind == "dir" and e.name == lesson_id for e in entries):
        raise InputError(f"{root} looks like one student's folder (it holds {lesson_id}/): give the folder "
                         "that contains one folder per student")
    _fix_blackboard_users(entries)
    lms_names = sorted({e.lms.lms for e in entries if e.lms})
    # an LMS download: at least as many LMS (or LMS-looking) entries as plain ones, so that one odd file
    # name does not turn a class folder into a download
    n_plain = sum(1 for e in entries if not e.lms and _is_candidate(e) and not lmsmod.lookalike(e.name, e.kind == "dir"))
    n_lms = len({e.lms.key for e in entries if e.lms}) \
        + sum(1 for e in entries if not e.lms and _is_candidate(e) and lmsmod.lookalike(e.name, e.kind == "dir"))
    lms_batch = bool(lms_names) and n_lms >= n_plain
    groups: dict[str, list[_Entry]] = {}
    subs: list[Submission] = []
    for e in entries:
        if e.kind == "dir-absent":
            e.kind = "absent"
        if e.lms:
            groups.setdefault(e.lms.key, []).append(e)
            continue
        is_candidate = _is_candidate(e)
        like = lmsmod.lookalike(e.name, e.kind == "dir")
        if any(r.fatal for r in e.refused):   # what went wrong in the zip comes first
            subs.append(_plain(e, lesson_id, notebook))
        elif like and is_candidate:
            subs.append(Submission(_key(e), e.name, None, problem=(
                (f"{_show(e.name)} looks like an LMS download name of a scheme the grader does not know"
                 if like == "unknown" else
                 f"{_show(e.name)} looks like a {like.capitalize()} download name but does not follow its format "
                 f"{lmsmod.FORMATS[like]}")
                + ": cannot tell which student it is (an id from it could change with every download); grade it "
                "in a separate batch under a folder named after the student")))
        elif lms_batch and is_candidate:
            subs.append(Submission(_key(e), e.name, None, problem=(
                f"{_show(e.name)} does not follow the naming of the rest of this {'/'.join(lms_names)} download "
                f"({'; '.join(lmsmod.FORMATS[n] for n in lms_names)}): cannot tell which LMS user submitted it; "
                "grade it in a separate batch under a folder named after the student")))
        elif is_candidate:
            subs.append(_plain(e, lesson_id, notebook))
    for key in sorted(groups):
        subs.append(_lms_group(groups[key], lesson_id, notebook, worksheet))
    if not subs:
        raise InputError(f"no submissions found in {path}: expected <student>/{lesson_id}/{notebook}, "
                         f"<student>/{notebook}, <student>.ipynb files, an LMS download, or a zip of these")
    for s in subs:
        s.display_name = s.display_name[:120]
    for s, sid in zip(subs, assign_ids([(s.lms is not None, s.student, s.submitted_as) for s in subs])):
        s.student = sid
    subs.sort(key=lambda s: s.student)
    return subs
