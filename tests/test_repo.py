"""Repository contracts: one place for pins, derived environment files, the README's two commands."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import sync_env  # noqa: E402


def test_environment_files_are_generated_from_the_pins():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "sync_env.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert (ROOT / "environment.yml").read_text() == (ROOT / "binder" / "environment.yml").read_text()


def test_pins_satisfy_pyproject_ranges():
    pins = sync_env.read_pins()
    for spec in sync_env.direct_requirements():
        req = Requirement(spec)
        version = pins[sync_env.canon(req.name)]
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} violates {spec}"


def test_torch_pin_is_the_local_cpu_wheel():
    assert sync_env.read_pins()["torch"] == "2.13.0"


def test_every_pin_is_exact():
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), line


def test_readme_documents_the_two_commands_and_ci_calls_one():
    readme = (ROOT / "README.md").read_text()
    assert "make lesson" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^lesson:", make, re.M) and re.search(r"^test:", make, re.M)

