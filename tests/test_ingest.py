"""Ingestion: LMS downloads (Canvas, Moodle, Blackboard), ids that never collide, and hostile inputs.

Unit tests of ``autograder.ingest.discover`` on zips and folders built in ``tmp_path`` (fast), plus one run of
the real grader on a tiny mixed LMS zip where only one notebook reaches a kernel.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.ingest.discover import assign_ids, discover, safe_extract, student_id  # noqa: E402
from autograder.ingest.notebook import SubmissionError, read_submission  # noqa: E402

LID, NB = "tc-lesson", "lesson.ipynb"   # discovery only needs the two names


def nb(tag: str) -> str:
    """A minimal notebook whose content says whose it is."""
    return json.dumps({"cells": [], "metadata": {"owner": tag}, "nbformat": 4, "nbformat_minor": 5})


def owner(path: Path) -> str:
    return json.loads(path.read_text())["metadata"]["owner"]


def make_zip(path: Path, entries: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def run(tmp_path: Path, src: Path) -> dict:
    return {s.student: s for s in discover(src, LID, NB, tmp_path / "scratch")}


# ---- Canvas -----------------------------------------------------------------------------------------
def test_canvas_same_sortable_name_two_students_ids_from_user_id(tmp_path):
    z = make_zip(tmp_path / "submissions.zip", {
        "chenwei_1001_7001_lesson.ipynb": nb("wei-1001"),
        "chenwei_LATE_1002_7002_lesson.ipynb": nb("wei-1002"),
        "doejane_1003_7003_lesson.ipynb": nb("jane"),
    })
    subs = run(tmp_path, z)
    assert sorted(subs) == ["canvas-1001", "canvas-1002", "canvas-1003"]
    a, b = subs["canvas-1001"], subs["canvas-1002"]
    assert (a.lms, a.lms_user_id, a.display_name, a.late, a.lms_submission_id) == ("canvas", "1001", "chenwei", False, "7001")
    assert (b.lms, b.lms_user_id, b.display_name, b.late, b.lms_submission_id) == ("canvas", "1002", "chenwei", True, "7002")
    assert owner(a.path) == "wei-1001" and owner(b.path) == "wei-1002"
    assert a.problem is None and b.problem is None
    # the id does not depend on who else is in the download (a late batch of one gets the same id)
    late_only = make_zip(tmp_path / "late.zip", {"chenwei_LATE_1002_7002_lesson.ipynb": nb("wei-1002")})
    assert list(run(tmp_path / "late", late_only)) == ["canvas-1002"]


def test_canvas_resubmission_grades_the_latest_and_notes_the_rest(tmp_path):
    z = make_zip(tmp_path / "submissions.zip", {
        "chenwei_1001_7001_lesson.ipynb": nb("first"),
        "chenwei_1001_7001_lesson-1.ipynb": nb("second"),      # Canvas's copy suffix for a re-upload
        "chenwei_1001_7001_notes.pdf": b"%PDF-1.4",
    })
    s = run(tmp_path, z)["canvas-1001"]
    assert s.problem is None and owner(s.path) == "second"
    assert any("graded the latest" in n and "chenwei_1001_7001_lesson.ipynb" in n for n in s.notes), s.notes


def test_canvas_user_without_the_notebook(tmp_path):
    z = make_zip(tmp_path / "s.zip", {"ann_1_2_report.pdf": b"%PDF", "bob_3_4_lesson.ipynb": nb("bob"),
                                      "cy_5_6_lesson_v2.ipynb": nb("cy")})
    subs = run(tmp_path, z)
    assert "missing notebook" in subs["canvas-1"].problem and "ann_1_2_report.pdf" in subs["canvas-1"].problem
    assert "renamed" in subs["canvas-5"].problem and "cy_5_6_lesson_v2.ipynb" in subs["canvas-5"].problem
    assert subs["canvas-3"].problem is None


# ---- Moodle ------------------------------------------------------------------------------------------
def test_moodle_two_wei_chen_with_different_participant_ids_one_late(tmp_path):
    src = tmp_path / "moodle"
    for pid in ("5001", "5002"):
        d = src / f"Wei Chen_{pid}_assignsubmission_file_"
        d.mkdir(parents=True)
        (d / NB).write_text(nb(f"wei-{pid}"))
    (src / "Anna Berg_5003_assignsubmission_onlinetext_").mkdir()
    (src / "Anna Berg_5003_assignsubmission_onlinetext_" / "onlinetext.html").write_text("<p>hi</p>")
    (src / "Anna Berg_5003_assignsubmission_file_lesson.ipynb").write_text(nb("anna"))   # flat form
    (src / "Grades-Course-Lesson.csv").write_text(
        "Identifier,Full name,Email address,Status,Grade\n"
        '"Participant 5001","Wei Chen",w1@x.org,"Submitted for grading",\n'
        '"Participant 5002","Wei Chen",w2@x.org,"Submitted for grading - 2 days 3 hours late",\n'
        '"Participant 5003","Anna Berg",a@x.org,"Submitted for grading",\n')
    subs = run(tmp_path, src)
    assert sorted(subs) == ["moodle-5001", "moodle-5002", "moodle-5003"]
    w1, w2 = subs["moodle-5001"], subs["moodle-5002"]
    assert (w1.display_name, w1.late, owner(w1.path)) == ("Wei Chen", False, "wei-5001")
    assert (w2.display_name, w2.late, owner(w2.path)) == ("Wei Chen", True, "wei-5002")
    assert w1.submitted_as == "Wei Chen_5001_assignsubmission_file_"
    anna = subs["moodle-5003"]
    assert anna.problem is None and owner(anna.path) == "anna" and anna.lms_user_id == "5003"


def test_moodle_zip_without_worksheet_and_blind_marking(tmp_path):
    z = make_zip(tmp_path / "m.zip", {
        "Participant_9001_assignsubmission_file_/lesson.ipynb": nb("p1"),      # blind marking
        "Participant 9002_assignsubmission_file_/lesson.ipynb": nb("p2"),      # no participant id: not Moodle's
        "Participant_9003_assignsubmission_file_/lesson.ipynb": nb("p3"),
    })
    subs = run(tmp_path, z)
    assert {"moodle-9001", "moodle-9003"} <= set(subs) and len(subs) == 3
    good = subs["moodle-9003"]
    assert good.late is False and good.display_name == "Participant" and owner(good.path) == "p3"
    bad = [s for s in subs.values() if not s.lms]
    assert len(bad) == 1 and "looks like a Moodle download name" in bad[0].problem and bad[0].path is None


# ---- Blackboard --------------------------------------------------------------------------------------
def test_blackboard_attempts_take_the_latest_with_receipt_name(tmp_path):
    z = make_zip(tmp_path / "gradebook_HW3.zip", {
        "Lesson 3_jsmith_attempt_2026-12-01-09-00-00_lesson.ipynb": nb("early"),
        "Lesson 3_jsmith_attempt_2026-12-01-09-00-00.txt": "Name: Jane Smith (jsmith)\nAssignment: Lesson 3\n",
        "Lesson 3_jsmith_attempt_2026-12-03-18-30-00_lesson.ipynb": nb("late"),
        "Lesson 3_jsmith_attempt_2026-12-03-18-30-00.txt": "Name: Jane Smith (jsmith)\nAssignment: Lesson 3\n",
        "Lesson 3_asmith_attempt_2026-12-02-10-00-00_lesson.ipynb": nb("anne"),
        "Lesson 3_asmith_attempt_2026-12-02-10-00-00.txt": "Name: Jane Smith (asmith)\n",   # same display name
    })
    subs = run(tmp_path, z)
    assert sorted(subs) == ["blackboard-asmith", "blackboard-jsmith"]
    j = subs["blackboard-jsmith"]
    assert owner(j.path) == "late" and j.lms_submission_id == "2026-12-03-18-30-00" and j.display_name == "Jane Smith"
    assert any("not graded: Lesson 3_jsmith_attempt_2026-12-01-09-00-00_lesson.ipynb" in n for n in j.notes)
    assert owner(subs["blackboard-asmith"].path) == "anne" and subs["blackboard-asmith"].display_name == "Jane Smith"


def test_blackboard_username_with_underscore_is_read_from_the_receipt(tmp_path):
    z = make_zip(tmp_path / "g.zip", {
        "HW_3_j_smith_attempt_2026-12-01-09-00-00_lesson.ipynb": nb("j_smith"),
        "HW_3_j_smith_attempt_2026-12-01-09-00-00.txt": "Name: Jo Smith (j_smith)\n",
        "HW_3_smith_attempt_2026-12-01-10-00-00_lesson.ipynb": nb("smith"),
        "HW_3_smith_attempt_2026-12-01-10-00-00.txt": "Name: Al Smith (smith)\n",
    })
    subs = run(tmp_path, z)
    assert sorted(subs) == ["blackboard-j_smith", "blackboard-smith"]
    assert owner(subs["blackboard-j_smith"].path) == "j_smith" and owner(subs["blackboard-smith"].path) == "smith"
    assert subs["blackboard-j_smith"].notes == [] and subs["blackboard-j_smith"].display_name == "Jo Smith"


# ---- names the parser does not know ------------------------------------------------------------------
def test_unknown_lms_schemes_get_a_per_student_message(tmp_path):
    z = make_zip(tmp_path / "mixed.zip", {
        "chenwei_1001_7001_lesson.ipynb": nb("ok"),
        "Jane Doe - lesson.ipynb": nb("?"),                                          # not Canvas
        "lee_1004_7004.ipynb": nb("?"),                                              # Canvas without a file name
        "Bo Li_assignsubmission_file_/lesson.ipynb": nb("?"),                        # Moodle without an id
        "123456-789012 - Kim Park - Dec 6, 2026 1003 PM/lesson.ipynb": nb("?"),      # another LMS
        "readme.txt": "not a submission",
    })
    subs = run(tmp_path, z)
    assert subs["canvas-1001"].problem is None
    by_name = {s.submitted_as: s for s in subs.values()}
    assert "does not follow the naming of the rest of this canvas download" in by_name["Jane Doe - lesson.ipynb"].problem
    assert "looks like a Moodle download name" in by_name["Bo Li_assignsubmission_file_"].problem
    assert "scheme the grader does not know" in by_name["123456-789012 - Kim Park - Dec 6, 2026 1003 PM"].problem
    assert "looks like a Canvas download name" in by_name["lee_1004_7004.ipynb"].problem
    assert "readme.txt" not in by_name
    assert all(s.path is None for s in subs.values() if s.problem)
    # the same unknown scheme in a plain folder is not silently given an id either
    plain = tmp_path / "plain"
    (plain / "ann").mkdir(parents=True)
    (plain / "ann" / NB).write_text(nb("ann"))
    (plain / "123456-789012 - Kim Park - Dec 6, 2026 1003 PM").mkdir()
    (plain / "123456-789012 - Kim Park - Dec 6, 2026 1003 PM" / NB).write_text(nb("kim"))
    subs = run(tmp_path / "p", plain)
    assert subs["ann"].problem is None
    assert sum("does not know" in (s.problem or "") for s in subs.values()) == 1


def test_one_lms_like_file_does_not_turn_a_class_folder_into_a_download(tmp_path):
    src = _folders(tmp_path / "class", ["ann", "ben", "cy"])
    (src / "dee_2024_1_lesson.ipynb").write_text(nb("dee"))      # happens to parse as Canvas
    (src / "eli_2024_final.ipynb").write_text(nb("eli"))         # a plain name with a number stays plain
    subs = run(tmp_path, src)
    assert all(subs[n].problem is None for n in ("ann", "ben", "cy", "eli_2024_final")), subs
    assert subs["canvas-2024"].problem is None and subs["canvas-2024"].lms == "canvas"


# ---- ids that never collide --------------------------------------------------------------------------
def _folders(root: Path, names: list[str]) -> Path:
    for n in names:
        (root / n).mkdir(parents=True)
        (root / n / NB).write_text(nb(n))
    return root


def test_sanitized_name_never_takes_an_exact_id(tmp_path):
    subs = run(tmp_path, _folders(tmp_path / "a", ["ctrl full", "ctrl_full"]))
    assert owner(subs["ctrl_full"].path) == "ctrl_full"          # the real student keeps her id
    other = [s for s in subs.values() if s.student != "ctrl_full"]
    assert len(other) == 1 and other[0].student == student_id("ctrl full") and other[0].student.startswith("ctrl_full-")
    assert owner(other[0].path) == "ctrl full"
    # the same id when "ctrl full" is graded alone (a later batch)
    assert list(run(tmp_path / "b", _folders(tmp_path / "b1", ["ctrl full"]))) == [student_id("ctrl full")]


def test_renamed_id_never_lands_on_another_students_id(tmp_path):
    subs = run(tmp_path, _folders(tmp_path / "a", ["eve", "eve!", "eve-2"]))
    assert owner(subs["eve"].path) == "eve" and owner(subs["eve-2"].path) == "eve-2"
    bang = [s for s in subs.values() if s.submitted_as == "eve!"][0]
    assert bang.student not in ("eve", "eve-2") and owner(bang.path) == "eve!"
    # a folder named exactly like eve!'s hashed id keeps it; eve! moves on, deterministically
    squat = student_id("eve!")
    subs2 = run(tmp_path / "b", _folders(tmp_path / "b1", ["eve!", squat]))
    assert owner(subs2[squat].path) == squat
    assert len(subs2) == 2 and [s for s in subs2.values() if s.submitted_as == "eve!"][0].student != squat


def test_id_rule_is_independent_of_order():
    claims = [(False, "ctrl full", "ctrl full"), (False, "ctrl_full", "ctrl_full"), (False, "eve!", "eve!"),
              (False, "eve-2", "eve-2"), (True, "canvas-12", "x_12_1_lesson.ipynb"), (False, "canvas-12", "canvas-12"),
              (False, "bob", "bob"), (False, "bob", "bob.ipynb")]
    want = dict(zip([c[2] for c in claims], assign_ids(claims)))
    assert len(set(want.values())) == len(claims)
    assert want["x_12_1_lesson.ipynb"] == "canvas-12" and want["ctrl_full"] == "ctrl_full" and want["eve-2"] == "eve-2"
    for k in range(1, len(claims)):
        rot = claims[k:] + claims[:k]
        assert dict(zip([c[2] for c in rot], assign_ids(rot))) == want


def test_ids_are_valid_and_bounded():
    for raw in ["Ana María", "=cmd|' /C calc'!A0", "a" * 300, "ü" * 200, "..", "", "x\ny"]:
        sid = student_id(raw)
        assert sid and len(sid) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in sid), (raw, sid)


# ---- links and non-regular files ---------------------------------------------------------------------
def test_symlinked_notebook_errors_the_linker_not_the_target(tmp_path):
    src = _folders(tmp_path / "in", ["alice"])
    (src / "mallory").mkdir()
    os.symlink(src / "alice" / NB, src / "mallory" / NB)
    (src / "trudy").mkdir()
    (src / "trudy" / LID).mkdir()
    os.symlink("../../alice/lesson.ipynb", src / "trudy" / LID / NB)
    os.symlink(src / "alice", src / "oscar")                          # a whole folder that is a link
    (src / "walter").mkdir()
    os.symlink(src / "alice", src / "walter" / LID)                   # the lesson folder is a link
    (src / "peggy.ipynb").symlink_to(src / "alice" / NB)              # a flat file that is a link
    subs = run(tmp_path, src)
    assert subs["alice"].problem is None and subs["alice"].path == src / "alice" / NB
    for name in ("mallory", "trudy", "oscar", "peggy", "walter"):
        assert subs[name].path is None and "symbolic link" in subs[name].problem, (name, subs[name].problem)


def test_non_regular_notebook_is_refused_without_being_opened(tmp_path):
    src = _folders(tmp_path / "in", ["alice"])
    (src / "fifo").mkdir()
    os.mkfifo(src / "fifo" / NB)             # opening it would block the grader
    (src / "bob").mkdir()
    (src / "bob" / NB).write_text(nb("bob"))
    os.symlink("/etc/passwd", src / "bob" / "data.csv")   # a link that is not the notebook: a note only
    subs = run(tmp_path, src)
    assert "not a regular file" in subs["fifo"].problem
    assert subs["bob"].problem is None and any("data.csv" in n and "symbolic link" in n for n in subs["bob"].notes)


def _link_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def test_zip_links_traversal_and_duplicates_are_per_student(tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("export/alice/lesson.ipynb", nb("alice"))
        zf.writestr(_link_info("export/mallory/lesson.ipynb"), "../alice/lesson.ipynb")
        zf.writestr("export/bob/lesson.ipynb", nb("bob"))
        zf.writestr(_link_info("export/bob/data"), "/etc")
        zf.writestr("export/../../outside/lesson.ipynb", nb("x"))
        zf.writestr("/abs/lesson.ipynb", nb("x"))
        with pytest.warns(UserWarning):
            zf.writestr("export/dave/lesson.ipynb", nb("dave-1"))
            zf.writestr("export/dave/lesson.ipynb", nb("dave-2"))
    subs = run(tmp_path, z)
    assert subs["alice"].problem is None and owner(subs["alice"].path) == "alice"
    assert subs["bob"].problem is None and any("symbolic link" in n for n in subs["bob"].notes)
    assert "symbolic link" in subs["mallory"].problem and subs["mallory"].path is None
    assert "2 entries named" in subs["dave"].problem and subs["dave"].path is None
    assert "points outside the zip" in subs["outside"].problem and "points outside the zip" in subs["abs"].problem
    assert not (tmp_path / "outside").exists() and not Path("/abs").exists()
    assert not any((tmp_path / "scratch").rglob("mallory/*")) and not any((tmp_path / "scratch").rglob("dave/*"))


def test_long_utf8_name_in_zip_errors_only_that_student(tmp_path):
    long_canvas = "ü" * 150 + "_1001_7001_lesson.ipynb"             # 300+ bytes: too long for the file system
    long_moodle = "Ö" * 140 + "_5001_assignsubmission_file_/lesson.ipynb"
    z = make_zip(tmp_path / "s.zip", {long_canvas: nb("x"), long_moodle: nb("y"),
                                      "doejane_1003_7003_lesson.ipynb": nb("jane")})
    subs = run(tmp_path, z)
    assert subs["canvas-1003"].problem is None
    for sid in ("canvas-1001", "moodle-5001"):
        assert "could not be unpacked" in subs[sid].problem and "too long" in subs[sid].problem.lower(), subs[sid].problem
    plain = make_zip(tmp_path / "p.zip", {"ü" * 130 + "/lesson.ipynb": nb("x"), "ann/lesson.ipynb": nb("ann")})
    subs = run(tmp_path / "p", plain)
    assert subs["ann"].problem is None
    bad = [s for s in subs.values() if s.student != "ann"]
    assert len(bad) == 1 and "could not be unpacked" in bad[0].problem and len(bad[0].student) <= 64


def test_corrupt_zip_entry_errors_only_that_student(tmp_path):
    z = tmp_path / "s.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("ann/lesson.ipynb", nb("ann"))
        zf.writestr("bob/lesson.ipynb", nb("bob-MARKER"))
    data = bytearray(z.read_bytes())
    i = data.index(b"bob-MARKER")
    data[i:i + 3] = b"XYZ"                                   # CRC no longer matches
    z.write_bytes(bytes(data))
    subs = run(tmp_path, z)
    assert subs["ann"].problem is None
    assert "corrupt in the zip" in subs["bob"].problem and subs["bob"].path is None


def test_unreadable_zip_stops_the_run_with_its_reason(tmp_path):
    from autograder.ingest.discover import InputError
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="not a readable zip"):
        safe_extract(tmp_path / "x.zip", tmp_path / "out")


# ---- bad files: found per student when the notebook is read ----------------------------------------
@pytest.mark.parametrize("content,match", [
    (b"", "empty"), (b'{"cells": [{"cell_type": "code", "sour', "not valid JSON"), (b"\xff\xfe\x00\x01", "not UTF-8"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "not UTF-8"), (b"just some text", "not valid JSON"),
])
def test_bad_notebook_files_reach_the_student_not_the_batch(tmp_path, content, match):
    src = _folders(tmp_path / "in", ["ann"])
    (src / "bob").mkdir()
    (src / "bob" / NB).write_bytes(content)
    subs = run(tmp_path, src)
    assert subs["ann"].problem is None and subs["bob"].problem is None and subs["bob"].path
    with pytest.raises(SubmissionError, match=match):
        read_submission(subs["bob"].path, 10**8)


# ---- the real grader on a tiny mixed download -------------------------------------------------------
def test_grader_runs_a_mixed_lms_zip_with_ids_from_lms_user_ids(tmp_path):
    from autograder.ingest.notebook import load_spec
    from residual_bandwidth.course import DEFAULT_LESSON
    spec = load_spec(DEFAULT_LESSON)
    released = spec.release_path.read_text()
    z = make_zip(tmp_path / "submissions.zip", {
        f"chenwei_1001_7001_{spec.notebook_name}": released,                       # graded (untouched: 0 points)
        f"chenwei_1001_7000_{spec.notebook_name}": b"{}",                          # an older attempt: noted
        f"chenwei_LATE_1002_7002_{spec.notebook_name}": b"",                       # same name, empty file
        f"Jane Doe - {spec.notebook_name}": released,                              # unknown scheme
        "ü" * 150 + f"_1003_7003_{spec.notebook_name}": released,                  # file name too long
    })
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "autograder", "grade", str(z), "--lesson", spec.lesson_id,
                        "--out", str(out), "--quiet", "--jobs", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "MPLBACKEND": "Agg"})
    data = json.loads((out / "results.json").read_text())
    by = {s["student"]: s for s in data["students"]}
    assert r.returncode == 2, r.stderr[-2000:]
    assert set(by) == {"canvas-1001", "canvas-1002", "canvas-1003", student_id("Jane Doe - lesson")}, sorted(by)
    assert by["canvas-1001"]["status"] in ("graded", "flagged") and by["canvas-1001"]["score"] is not None
    assert by["canvas-1001"]["submitted_as"] == f"chenwei_1001_7001_{spec.notebook_name}"
    assert any("not graded: chenwei_1001_7000" in n for n in by["canvas-1001"]["notes"]), by["canvas-1001"]["notes"]
    assert by["canvas-1002"]["status"] == "errored" and "empty" in by["canvas-1002"]["reason"]
    assert by["canvas-1003"]["status"] == "errored" and "could not be unpacked" in by["canvas-1003"]["reason"]
    assert "does not follow" in by[student_id("Jane Doe - lesson")]["reason"]


def test_roster_names_map_to_the_ids_discovery_gives(tmp_path):
    from autograder.pipeline import _roster
    subs = discover(_folders(tmp_path / "in", ["Jo Smith", "ann"]), LID, NB, tmp_path / "scratch")
    roster = tmp_path / "roster.txt"
    roster.write_text("Jo Smith\nann\ncanvas-77   # re-grade folder or LMS id\nBo Li\n")
    out = {s.student: s for s in _roster(roster, subs)}
    assert len(out) == 4 and out[student_id("Jo Smith")].problem is None and out["ann"].problem is None
    assert "missing" in out["canvas-77"].problem and "missing" in out[student_id("Bo Li")].problem
