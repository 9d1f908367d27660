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
* shell commands (``subprocess``, ``os.system``, ``os.exec*``, ``os.posix_spawn``) that name a
  protected path: every path-like word of the command (one containing ``/``) is resolved against
  the working folder and refused when it lies under a protected path (and not under an allowed
  one). Plain words are never matched, so ``!echo "my homework folder"`` or a string mentioning
  ``results`` or ``solutions`` is not evidence (folder *names* used to be matched as substrings,
  which flagged honest code).

It is **not a sandbox**: native code (``ctypes``) and deliberate interpreter surgery can get past
an audit hook. That is why the grader also re-checks answers outside the kernel and scans the
source; see ``autograder/README.md`` ("What remains possible").

Blocked events are written as JSON lines ``{"event", "target", "blocked"}`` to the log, which in the
sandbox is **a pipe whose read end the grader holds outside** (an inherited file descriptor, see
:class:`PipeReader`): what was written cannot be truncated, rewritten or read back by the student's
code (the pipe belongs to the grader's uid, so ``/proc/self/fd/N`` cannot be reopened). Student code
can at worst add lines, i.e. evidence against itself. The grader turns blocked events into
``flagged`` evidence.
"""
from __future__ import annotations

import json
import os
import re
import select
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


_WORD_SPLIT = re.compile(r"[\s;|&<>()`'\"=,]+")


def command_paths(text: str, cwd: str) -> list[str]:
    """The path-like words of a command line (those containing ``/``), resolved against ``cwd``."""
    out = []
    for word in _WORD_SPLIT.split(text):
        if "/" in word:
            out.append(_norm(os.path.join(cwd, os.path.expanduser(word))))
    return out


def make_hook(protect: list[str], allow: list[str], log_path: str | int | None,
              block_suffixes: tuple[str, ...] = (".ipynb",)):
    """Return an audit hook (not yet installed) for the given protected/allowed paths.

    ``allow`` wins over ``protect`` when it is the more specific (longer) prefix. ``log_path`` is a
    file name or an open file descriptor (a pipe to the grader). The returned function only holds
    immutable values, so there is no module state for student code to edit.
    """
    protect_t = tuple(sorted({_norm(p) for p in protect}, key=len, reverse=True))
    allow_t = tuple(sorted({_norm(p) for p in allow}, key=len, reverse=True))
    suffixes = tuple(block_suffixes)
    own_pid = str(os.getpid())
    if isinstance(log_path, int):
        log_fd = log_path
        os.set_inheritable(log_fd, False)   # not handed on to the student's child processes
    else:
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

    def protected(path: str) -> bool:
        prot = _within(path, protect_t)
        allowed = _within(path, allow_t)
        return bool(prot) and not (allowed and len(allowed) >= len(prot))

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
        if protected(path):
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
                try:
                    cwd = os.getcwd()
                except OSError:
                    cwd = "/"
                hit = next((p for p in command_paths(text, cwd) if protected(p)), None)
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


def install(protect: list[str], allow: list[str], log_path: str | int | None) -> None:
    """Install the hook for this process (irrevocably)."""
    sys.addaudithook(make_hook(protect, allow, log_path))


def install_from_env() -> bool:
    """Install from the JSON in ``$AUTOGRADER_GUARD`` (keys protect, allow, log: a path or an
    inherited file descriptor); False if unset."""
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
        with open(path, "rb") as f:
            return parse_lines(f.read(max_bytes))
    except OSError:
        return []


def parse_lines(data: bytes) -> list[dict]:
    """The JSON objects of JSON-lines ``data`` written by untrusted code (other lines skipped)."""
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


class PipeReader:
    """The grader's end of a channel from a sandboxed process: a thread that drains ``fd`` (a pipe
    or FIFO read end, which never leaves the grader) until every writer has closed it and
    :meth:`finish` was called. It keeps at most ``max_bytes`` (more is read and dropped, so a
    writer never blocks); the data are hostile and parsed by :meth:`records`.
    """

    def __init__(self, fd: int, max_bytes: int = 16 * 1024**2):
        self.fd, self.max_bytes = fd, max_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @classmethod
    def fifo(cls, path, max_bytes: int = 16 * 1024**2) -> "PipeReader":
        """Make a FIFO at ``path`` (a grader-side folder) and read it (writers open it by name)."""
        os.mkfifo(path, 0o600)
        return cls(os.open(path, os.O_RDONLY | os.O_NONBLOCK), max_bytes)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP)
        while True:
            events = poller.poll(200)
            data = b""
            if events:
                try:
                    data = os.read(self.fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    return
            if data:
                if self.size < self.max_bytes:
                    self.chunks.append(data[: self.max_bytes - self.size])
                    self.size += len(self.chunks[-1])
                if len(data) and self.size >= self.max_bytes:
                    self.truncated = True
                continue
            if self._stop.is_set():   # no writer left (EOF) or nothing to read, and the grader is done
                return
            if events:                # EOF while writers may still come (a FIFO before its writer): wait
                self._stop.wait(0.05)

    def finish(self, timeout: float = 10.0) -> bytes:
        """Stop once the channel is drained (the writers are gone); return what was read. Closes the
        descriptor exactly once (a second close could hit a number another thread reuses)."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            if not self._thread.is_alive() and self.fd is not None:
                os.close(self.fd)
                self.fd = None
        return b"".join(self.chunks)

    def records(self) -> list[dict]:
        return parse_lines(b"".join(self.chunks))
