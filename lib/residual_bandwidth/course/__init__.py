"""The course-facing side of the package: lesson metadata (:mod:`.lesson`), model loading
(:mod:`.models`), the lesson's main job (:mod:`.report`), the command line (:mod:`.cli`), the
interactive explorer (:mod:`.explorer`) and the lesson's checked claims (:mod:`.claims`). The lesson
metadata is importable from here directly (``residual_bandwidth.course.load_lesson``); import the
others by module (most load torch)."""
from .lesson import DEFAULT_LESSON, LessonMeta, LessonMetadataError, item_of, load_lesson, validate_lesson

__all__ = ["DEFAULT_LESSON", "LessonMeta", "LessonMetadataError", "item_of", "load_lesson", "validate_lesson"]
