"""Instructor grading pipeline for the course (nbgrader 0.9.6 + integrity checks).

Run ``python -m autograder grade SUBMISSIONS --lesson <id> --out results/``; see
``autograder/README.md``. Keep this module light: the grading kernel imports the package before
ipykernel starts.
"""
