"""The lowest-version check (``make test-lowest``): are pyproject.toml's lower bounds true?

``make test-lowest`` builds a separate venv, installs every direct dependency of the course package at
the lowest version its range allows (``uv pip install --resolution lowest-direct``), then runs the
library tests. This script supplies its inputs and checks its result:

``python tools/lowest_env.py requirements DIR``
    writes ``DIR/requirements.txt`` (the package itself, editable, plus the test tools the library
    tests import, with their ranges from the ``dev`` extra) and ``DIR/constraints.txt`` (torch pinned
    to constraints.txt: the only CPU wheel here; any other torch pulls a multi-GB CUDA build).
``python tools/lowest_env.py check``
    run with the lowest venv's python: exits 1 unless every direct dependency is installed at exactly
    its declared lower bound (torch at its pin). A bound that the resolver cannot honour (no wheel for
    this Python, a release excluded by another dependency) therefore fails here and must be raised.
"""
from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from sync_env import canon, read_pins  # noqa: E402

# Pinned rather than lowered: the CPU wheel (see module docstring).
PINNED = ("torch",)
# Test tools that the library tests import (taken with their ranges from the dev extra).
TEST_TOOLS = ("pytest", "scikit-learn", "scipy")


def _split(spec: str) -> tuple[str, str | None]:
    """``"numpy>=1.24.1"`` -> ("numpy", "1.24.1"); a spec without a ``>=`` lower bound -> (name, None)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)", spec)
    if not m:
        raise SystemExit(f"pyproject.toml: cannot read requirement {spec!r}")
    name, rest = m.groups()
    low = re.search(r">=\s*([A-Za-z0-9_.+\-]+)", rest)
    return canon(name), low.group(1) if low else None


def direct_specs(path: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """canonical name -> specifier, for the package's dependencies and the test tools."""
    project = tomllib.loads(path.read_text())["project"]
    specs = {_split(s)[0]: s for s in project["dependencies"]}
    dev = {_split(s)[0]: s for s in project["optional-dependencies"]["dev"]}
    for tool in TEST_TOOLS:
        if tool not in dev:
            raise SystemExit(f"pyproject.toml: test tool {tool!r} is not in the dev extra")
        specs[tool] = dev[tool]
    return specs


def write_requirements(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    specs = direct_specs()
    reqs = ["-e " + str(ROOT)] + [specs[t] for t in TEST_TOOLS]
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    pins = read_pins()
    (out / "constraints.txt").write_text("".join(f"{n}=={pins[n]}\n" for n in PINNED))
    print(f"wrote {out / 'requirements.txt'} and {out / 'constraints.txt'}")


def check_installed() -> list[str]:
    """One line per direct dependency that is not installed at its lower bound (or pin)."""
    from packaging.version import Version
    pins = read_pins()
    problems = []
    for name, spec in sorted(direct_specs().items()):
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed ({spec})")
            continue
        want = pins[name] if name in PINNED else _split(spec)[1]
        if want is None:
            problems.append(f"{name}: {spec!r} declares no lower bound")
        elif Version(Version(have).public) != Version(want):  # 3.7 == 3.7.0; a local tag (+cpu) ignored
            problems.append(f"{name}: declared {spec!r} but the lowest installable was {have}; "
                            f"raise the bound to >={have} (or find out why {want} was not taken)")
        print(f"  {name:18} {have:12} ({spec}{', pinned' if name in PINNED else ''})")
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["requirements"] and len(argv) == 2:
        write_requirements(Path(argv[1]))
        return 0
    if argv == ["check"]:
        print("direct dependencies as installed by the lowest-version run:")
        problems = check_installed()
        for p in problems:
            print("FALSE LOWER BOUND:", p)
        return 1 if problems else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
