"""The course-facing side of the package: lesson metadata (:mod:`.lesson`), model loading
(:mod:`.models`), the lesson's main job (:mod:`.report`), the command line (:mod:`.cli`), the
interactive explorer (:mod:`.explorer`, loaded on first use: it imports matplotlib), the lesson's
checked claims (:mod:`.claims`) and the visible tests of its exercises (:mod:`.checks`). Everything
the lesson uses is importable from here."""
from . import checks
from .checks import (NOT_ATTEMPTED, attempt, check, close, not_attempted, seed_checkpoint_1_data, seed_rank,
                     variance_rank)
from .claims import Claims
from .lesson import DEFAULT_LESSON, LessonMeta, LessonMetadataError, item_of, load_lesson, validate_lesson
from .models import resolve_model
from .report import DEFAULT_PROMPTS, bottleneck_ratios

__all__ = ["DEFAULT_LESSON", "DEFAULT_PROMPTS", "Claims", "LessonMeta", "LessonMetadataError",
           "bottleneck_ratios", "explore", "item_of", "load_lesson", "resolve_model", "validate_lesson",
           # the visible tests and the helpers the lesson's test cells use
           "checks", "NOT_ATTEMPTED", "attempt", "check", "close", "not_attempted", "seed_checkpoint_1_data",
           "seed_rank", "variance_rank"]


def __getattr__(name):
    if name == "explore":
        from .explorer import explore
        return explore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
