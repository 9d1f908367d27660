"""The course offering's grading settings (``autograder/offering.toml``).

Only one setting today: ``probe_seed``, the seed of the out-of-kernel check's hidden inputs. It is
fixed per offering — never drawn per run — so grading the same submission twice gives the same
per-item scores (see ``autograder/README.md``, "Scoring and determinism").
"""
from __future__ import annotations

import tomllib
from pathlib import Path

OFFERING = Path(__file__).with_name("offering.toml")


def probe_seed(path: Path = OFFERING) -> int:
    """The offering's probe seed; a clear error when the file or the value is missing or malformed."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: it holds the offering's probe_seed (see autograder/README.md)") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    seed = data.get("probe_seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{path}: probe_seed must be a non-negative integer, got {seed!r}")
    return seed
