"""Lesson metadata as data: objectives, assessment items and the passing threshold.

One YAML file per lesson lives in ``residual_bandwidth/lessons/`` (shipped with the package, so a
Colab install has it too) and is validated against ``lesson.schema.json``. The notebook prints its
objectives from here, the grader reads the threshold and the LO of every grade cell from here, and a
test checks that the notebook's nbgrader grade cells and this mapping agree.

Grade cells are named ``"<item>__<part>"`` (e.g. ``checkpoint_1__hidden``): :func:`item_of` maps a
grade id to its assessment item, and :attr:`LessonMeta.objective_of` maps an item to its LO.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import yaml

DEFAULT_LESSON = "tc-module-03-lesson-02-subspaces-bandwidth"


class LessonMetadataError(ValueError):
    """The lesson metadata file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class LessonMeta:
    """Validated lesson metadata (``raw`` is the whole YAML document)."""
    raw: dict

    @property
    def lesson_id(self) -> str:
        return self.raw["metadata"]["identification"]["unique_id"]

    @property
    def title(self) -> str:
        return self.raw["metadata"]["identification"]["title"]

    @property
    def notebook(self) -> str:
        return self.raw["metadata"]["execution"]["notebook"]

    @property
    def passing_threshold(self) -> float:
        return float(self.raw["metadata"]["assessment"]["passing_threshold"])

    @property
    def objectives(self) -> dict[str, str]:
        return {lo["id"]: lo["text"] for lo in self.raw["metadata"]["learning_objectives"]}

    @property
    def items(self) -> dict[str, dict]:
        return self.raw["metadata"]["assessment"]["items"]

    @property
    def objective_of(self) -> dict[str, str]:
        """assessment item -> learning objective id."""
        return {item: lo["id"] for lo in self.raw["metadata"]["learning_objectives"]
                for item in lo["assessment_mapping"]}


def item_of(grade_id: str) -> str:
    """``"checkpoint_1__hidden" -> "checkpoint_1"``."""
    return grade_id.split("__", 1)[0]


def _schema() -> dict:
    return json.loads(resources.files("residual_bandwidth").joinpath("lessons/lesson.schema.json").read_text())


def validate_lesson(raw: dict) -> LessonMeta:
    """Check ``raw`` against the JSON Schema and for internal consistency; return :class:`LessonMeta`."""
    import jsonschema
    try:
        jsonschema.validate(raw, _schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise LessonMetadataError(f"lesson metadata at {where}: {e.message}") from None
    meta = LessonMeta(raw)
    a = raw["metadata"]["assessment"]
    mapped = [i for lo in raw["metadata"]["learning_objectives"] for i in lo["assessment_mapping"]]
    dupes = sorted({i for i in mapped if mapped.count(i) > 1})
    if dupes:
        raise LessonMetadataError(f"items {dupes} are mapped to more than one learning objective")
    if set(mapped) != set(meta.items):
        raise LessonMetadataError(
            f"assessment_mapping and assessment.items disagree: only mapped {sorted(set(mapped) - set(meta.items))}, "
            f"only listed {sorted(set(meta.items) - set(mapped))}")
    kinds = [v["kind"] for v in meta.items.values()]
    if kinds.count("formative") != a["formative_checkpoints"] or kinds.count("summative") != a["summative_questions"]:
        raise LessonMetadataError(
            f"assessment counts say {a['formative_checkpoints']} formative / {a['summative_questions']} summative "
            f"but items list {kinds.count('formative')} / {kinds.count('summative')}")
    return meta


def load_lesson(lesson_id: str = DEFAULT_LESSON) -> LessonMeta:
    """Load and validate ``lessons/<lesson_id>.yaml`` from the package."""
    path = resources.files("residual_bandwidth").joinpath(f"lessons/{lesson_id}.yaml")
    if not path.is_file():
        raise LessonMetadataError(f"no metadata for lesson {lesson_id!r} (expected {path})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LessonMetadataError(f"{path}: not valid YAML: {e}") from None
    return validate_lesson(raw)
