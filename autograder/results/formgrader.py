"""``python -m autograder formgrader --out results/``: nbgrader's formgrader on a graded results folder.

In nbgrader 0.9 formgrader is a Jupyter server extension (there is no ``nbgrader formgrader``
command), and it takes its course directory from ``nbgrader_config.py``, not from the server's
command line. This starts JupyterLab in the repository with ``AUTOGRADER_RESULTS=<out>``, which the
repository's ``nbgrader_config.py`` turns into ``CourseDirectory.db_url = sqlite:///<out>/gradebook.db``
and the autograded/feedback folders of ``<out>``: formgrader ("Nbgrader → Formgrader" in JupyterLab,
or ``/formgrader``) then shows the graded store. Manual scores set there are written to
``<out>/gradebook.db``.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def command(out: Path, port: int = 8888, ip: str = "127.0.0.1", token: str | None = None,
            browser: bool = False) -> tuple[list[str], dict]:
    """(argv, environment) of the JupyterLab server with formgrader on ``out``."""
    out = Path(out).resolve()
    if not (out / "gradebook.db").is_file():
        raise FileNotFoundError(f"{out / 'gradebook.db'} does not exist: grade into {out} first "
                                "(make grade RESULTS=...)")
    argv = [str(BIN / "jupyter"), "lab", f"--ServerApp.root_dir={ROOT}", f"--ServerApp.ip={ip}",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0"]
    if token is not None:
        argv.append(f"--IdentityProvider.token={token}")
    if not browser:
        argv.append("--no-browser")
    if os.geteuid() == 0:
        argv.append("--allow-root")
    env = {**os.environ, "AUTOGRADER_RESULTS": str(out),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return argv, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autograder formgrader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results"), help="the results folder (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8888)
    ap.add_argument("--ip", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    ap.add_argument("--token", default=None, help="access token (default: a fresh random one, printed)")
    ap.add_argument("--browser", action="store_true", help="open a browser")
    args = ap.parse_args(argv)
    token = args.token or secrets.token_hex(16)
    try:
        cmd, env = command(args.out, args.port, args.ip, token, args.browser)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"formgrader on {Path(args.out).resolve() / 'gradebook.db'}: "
          f"http://{args.ip}:{args.port}/formgrader?token={token}", file=sys.stderr, flush=True)
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, env)
    return 0   # not reached


if __name__ == "__main__":
    sys.exit(main())
