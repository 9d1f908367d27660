"""The grading kernel: an ordinary IPython kernel started behind the grader's guard.

nbgrader runs every submission in this kernel (kernelspec ``rb-autograder``, written per run by
:func:`write_kernelspec`). Before ipykernel starts it

1. appends its pid to ``$AUTOGRADER_KERNEL_PIDFILE``, so the grader can kill it (and its process
   group) when a submission exceeds its wall-clock limit — jupyter_client starts kernels in a new
   session, so killing nbgrader's own process group would leave a kernel that ignores SIGINT running;
2. caps the size of files it may write and disables core dumps;
3. installs the audit-hook guard (:mod:`autograder.guard`) from ``$AUTOGRADER_GUARD``.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

KERNEL_NAME = "rb-autograder"
MAX_FILE_BYTES = 512 * 1024 * 1024


def write_kernelspec(jupyter_dir: Path, python: str = sys.executable) -> Path:
    """Write ``<jupyter_dir>/kernels/rb-autograder/kernel.json``; put ``jupyter_dir`` on JUPYTER_PATH."""
    spec_dir = Path(jupyter_dir) / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [python, "-m", "autograder.kernel", "-f", "{connection_file}"],
            "display_name": "Python 3 (autograder)", "language": "python",
            "metadata": {"debugger": False}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return spec_dir


def _prepare() -> None:
    pidfile = os.environ.get("AUTOGRADER_KERNEL_PIDFILE")
    if pidfile:
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
    for limit, value in ((resource.RLIMIT_FSIZE, MAX_FILE_BYTES), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass
    from autograder import guard
    guard.install_from_env()
    # leave nothing of the grader importable from sys.modules for student code to fiddle with
    for name in [m for m in sys.modules if m == "autograder" or m.startswith("autograder.")]:
        del sys.modules[name]


def main() -> None:
    """Prepare this process (pid file, limits, guard), then start ipykernel."""
    _prepare()
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
