"""nbgrader configuration for this course repository (read by every nbgrader command run here).

solutions/<lesson>/  is the instructor source (nbgrader's "source" step),
lessons/<lesson>/    the student version nbgrader generates from it (the "release" step).
Submissions, autograded copies, feedback and the sqlite gradebook live under autograder/work/
(git-ignored).
"""
import os

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
