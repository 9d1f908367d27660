"""nbgrader configuration for this course repository (read by every nbgrader command run here).

solutions/<lesson>/  is the instructor source (nbgrader's "source" step),
lessons/<lesson>/    the student version nbgrader generates from it (the "release" step).
Submissions, autograded copies, feedback and the sqlite gradebook live under autograder/work/
(git-ignored).

Grading is `make grade` / `python -m autograder grade` (autograder/README.md), never plain
`nbgrader autograde`: that would skip the out-of-kernel checks, the sandbox and the limits, so its
hidden points would differ. It is refused at once (set AUTOGRADER_PLAIN_NBGRADER=1 to run nbgrader's
own autograde anyway, e.g. in the lesson's tests).

AUTOGRADER_RESULTS=<a results folder of the grader> points nbgrader's gradebook, autograded and
feedback folders at that folder, so formgrader (manual review), `nbgrader export` and
`nbgrader release_feedback` work on the graded store (`python -m autograder formgrader --out DIR`
sets it). Formgrader reads this file, not the server's command line, for its course directory.
"""
import os
import sys

c = get_config()  # noqa: F821  (provided by traitlets when nbgrader loads this file)
ROOT = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(ROOT, "autograder", "work")

c.CourseDirectory.root = ROOT
c.CourseDirectory.course_id = "residual-bandwidth"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "lessons"
c.CourseDirectory.submitted_directory = os.path.join("autograder", "work", "submitted")
c.CourseDirectory.autograded_directory = os.path.join("autograder", "work", "autograded")
c.CourseDirectory.feedback_directory = os.path.join("autograder", "work", "feedback")
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(WORK, "gradebook.db")

# the student version: solutions become a stub that fails loudly, hidden tests are removed
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# grading: a per-cell time limit, and an infinite loop interrupts one cell, not the whole notebook
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True
c.OverwriteCells.add_missing_cells = True

# the lesson's text source (solutions/<lesson>/lesson.py, with the solutions) is never released:
# nbgrader would otherwise copy every file of the source folder into lessons/
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", "lesson.py"]

# manual review and nbgrader's own commands on the graded store (see the docstring)
RESULTS = os.environ.get("AUTOGRADER_RESULTS")
if RESULTS:
    RESULTS = os.path.abspath(RESULTS)
    c.CourseDirectory.db_url = "sqlite:///" + os.path.join(RESULTS, "gradebook.db")
    c.CourseDirectory.autograded_directory = os.path.join(RESULTS, "autograded")
    c.CourseDirectory.feedback_directory = os.path.join(RESULTS, "feedback")

PLAIN_AUTOGRADE = (
    "Plain `nbgrader autograde` does not grade this course: it would skip the out-of-kernel checks of "
    "the hidden tests, the sandbox and the limits, so its scores differ from the course's. Grade with\n"
    "    make grade SUBMISSIONS=<folder, LMS zip or autograder/work/submitted> RESULTS=results\n"
    "(or `python -m autograder grade ...`, autograder/README.md). To run nbgrader's own autograde anyway "
    "(testing the notebook), set AUTOGRADER_PLAIN_NBGRADER=1.")


def _refuse_plain_autograde(**kwargs):
    """nbgrader's pre-convert hook: refuses formgrader's "autograde" button and any other in-process
    Autograde (the grader's own worker sets the hook to None)."""
    raise RuntimeError(PLAIN_AUTOGRADE)


if os.environ.get("AUTOGRADER_PLAIN_NBGRADER") != "1":
    c.Autograde.pre_convert_hook = _refuse_plain_autograde
    _argv0 = sys.argv[0] if sys.argv else ""
    if sys.argv[1:2] == ["autograde"] and (os.path.basename(_argv0) == "nbgrader"
                                           or _argv0.endswith(os.path.join("nbgrader", "__main__.py"))):
        sys.stderr.write(PLAIN_AUTOGRADE + "\n")
        raise SystemExit(2)
