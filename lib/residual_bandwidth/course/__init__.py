"""The course-facing side of the package: lesson metadata (:mod:`.lesson`), model loading
(:mod:`.models`), the lesson's main job (:mod:`.report`), the command line (:mod:`.cli`) and the
interactive explorer (:mod:`.explorer`). The lesson metadata is importable from here directly
(``residual_bandwidth.course.load_lesson``); the others load torch, so import them by module."""
from .lesson import DEFAULT_LESSON, LessonMeta, LessonMetadataError, item_of, load_lesson, validate_lesson

__all__ = ["DEFAULT_LESSON", "LessonMeta", "LessonMetadataError", "item_of", "load_lesson", "validate_lesson"]
