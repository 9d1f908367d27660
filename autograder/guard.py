"""A tripwire for student code: refuse and record reads of the grader's secrets.

Installed (with :func:`install_from_env`) in the grading kernel and in the out-of-kernel re-check
process *before* any student code runs. It is a CPython audit hook (PEP 578), so student code cannot
remove it, and it refuses (``PermissionError``) and logs:

* opening, listing, copying or globbing anything under a *protected* path (the instructor sources in
  ``solutions/``, the repository's ``.git``, the ``autograder/`` package and every gradebook and
  other student's files under the run folder, the results folder), unless the path is under an
  *allowed* path (the submission's own working folder);
* opening a notebook (``*.ipynb``): during autograding the working folder holds the sanitised
  notebook, *with the hidden tests restored*;
* ``/proc/<pid>`` of any other process (the grader's memory, pipes and environment);
* shell commands (``subprocess``, ``os.system``, ``os.exec*``, ``os.posix_spawn``) whose text names
  a protected path or one of its folder names.

It is **not a sandbox**: native code (``ctypes``) and deliberate interpreter surgery can get past
an audit hook. That is why the grader also re-checks answers outside the kernel and scans the
source; see ``autograder/README.md`` ("What remains possible").

Blocked events are appended to the log file as JSON lines ``{"event", "target", "blocked"}``;
the grader turns them into ``flagged`` evidence.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading

ENV_VAR = "AUTOGRADER_GUARD"

_PROC_PID = re.compile(r"^/proc/(\d+)(/|$)")
_PATH_EVENTS = {"open": 0, "os.listdir": 0, "os.scandir": 0, "glob.glob": 0, "os.chdir": None,
                "shutil.copyfile": 0, "shutil.copytree": 0, "shutil.make_archive": None,
                "os.symlink": 0, "os.link": 0, "os.rename": 0, "sqlite3.connect": 0, "os.startfile": 0}
_COMMAND_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn",
                   "os.popen"}


def _norm(path: str) -> str:
    return os.path.normpath(os.path.realpath(path))


def _within(path: str, roots: tuple[str, ...]) -> str | None:
    for root in roots:
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return root
    return None


def make_hook(protect: list[str], allow: list[str], log_path: str | None,
              block_suffixes: tuple[str, ...] = (".ipynb",)):
    """Return an audit hook (not yet installed) for the given protected/allowed paths.

    ``allow`` wins over ``protect`` when it is the more specific (longer) prefix. The returned
    function only holds immutable values, so there is no module state for student code to edit.
    """
    protect_t = tuple(sorted({_norm(p) for p in protect}, key=len, reverse=True))
    allow_t = tuple(sorted({_norm(p) for p in allow}, key=len, reverse=True))
    words = tuple(sorted({os.path.basename(p) for p in protect_t if os.path.basename(p)}))
    suffixes = tuple(block_suffixes)
    own_pid = str(os.getpid())
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if log_path else None
    write = os.write
    local = threading.local()

    def record(event: str, target: str, blocked: bool) -> None:
        if log_fd is None:
            return
        try:
            write(log_fd, (json.dumps({"event": event, "target": target[:500], "blocked": blocked}) + "\n").encode())
        except Exception:  # the log is evidence, never a reason to crash the kernel
            pass

    def path_verdict(raw) -> str | None:
        """A reason to refuse access to ``raw`` (a path), or None."""
        if isinstance(raw, int) or raw is None:
            return None
        try:
            raw = os.fsdecode(raw)
        except TypeError:
            return None
        if not raw:
            return None
        path = _norm(raw)
        m = _PROC_PID.match(path)
        if m and m.group(1) != own_pid and not path.startswith(f"/proc/{own_pid}/task"):
            return f"another process's /proc entry {path}"
        prot = _within(path, protect_t)
        allowed = _within(path, allow_t)
        if prot and not (allowed and len(allowed) >= len(prot)):
            return f"protected path {path}"
        if path.endswith(suffixes) and os.path.exists(path):
            return f"notebook file {path}"
        return None

    def hook(event: str, args: tuple) -> None:
        if getattr(local, "busy", False):
            return
        if event not in _PATH_EVENTS and event not in _COMMAND_EVENTS:
            return
        local.busy = True
        try:
            if event in _COMMAND_EVENTS:
                text = " ".join(os.fsdecode(a) if isinstance(a, (str, bytes)) else
                                " ".join(os.fsdecode(x) for x in a if isinstance(x, (str, bytes)))
                                if isinstance(a, (list, tuple)) else "" for a in args[:3])
                hit = next((w for w in protect_t + words if w and w in text), None)
                if hit is None:
                    record(event, text, False)
                    return
                reason = f"a command naming {hit!r}: {text[:200]}"
                record(event, text, True)
                raise PermissionError(f"[autograder] not allowed while grading: {reason}")
            index = _PATH_EVENTS[event]
            targets = [args[index]] if index is not None and args else list(args[:1])
            if event in ("shutil.copyfile", "shutil.copytree", "os.rename", "os.symlink", "os.link"):
                targets = list(args[:2])
            for target in targets:
                reason = path_verdict(target)
                if reason:
                    record(event, str(target), True)
                    raise PermissionError(f"[autograder] not allowed while grading: {reason}")
        finally:
            local.busy = False

    return hook


def install(protect: list[str], allow: list[str], log_path: str | None) -> None:
    """Install the hook for this process (irrevocably)."""
    sys.addaudithook(make_hook(protect, allow, log_path))


def install_from_env() -> bool:
    """Install from the JSON in ``$AUTOGRADER_GUARD`` (keys protect, allow, log); False if unset."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return False
    cfg = json.loads(spec)
    install(cfg.get("protect", []), cfg.get("allow", []), cfg.get("log"))
    return True


def read_log(path, max_bytes: int = 64 * 1024**2) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per line: the guard's blocked/recorded events, or
    the re-check's results (missing file: none; lines that are not a JSON object: skipped; only the
    first ``max_bytes`` are read, the file is written by untrusted code)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(max_bytes)
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out
