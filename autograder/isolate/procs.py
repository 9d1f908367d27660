"""Child processes with wall-clock and memory limits, and killing whole process trees.

Student code runs in grandchildren (jupyter kernels, started by jupyter_client in their own
session) and in re-check subprocesses. A kernel that ignores SIGINT survives nbgrader's interrupt,
and killing nbgrader's process group would not reach it. So the grader kills *trees*: every
descendant found with psutil, each descendant's process group, plus the kernels that registered
themselves in a pid file (:mod:`autograder.isolate.kernel`), in case they were orphaned.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL = 0.2


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (those still alive)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int, extra: list[int] = ()) -> int:
    """Resident memory of ``pid``'s tree plus ``extra`` pids, in bytes."""
    total, seen = 0, set()
    procs = tree(pid)
    for e in extra:
        if _is_grading_kernel(e):
            procs += tree(e)
    for p in procs:
        if p.pid in seen:
            continue
        seen.add(p.pid)
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def read_pidfile(path) -> list[int]:
    """The pids listed in a kernel pid file (none if it does not exist)."""
    try:
        return [int(x) for x in Path(path).read_text().split() if x.strip().isdigit()]
    except OSError:
        return []


def _is_grading_kernel(pid: int) -> bool:
    """True if ``pid`` is still one of our kernels (a dead kernel's pid may belong to anyone by now)."""
    try:
        return "autograder.isolate.kernel" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def kill_tree(pid: int | None, extra: list[int] = ()) -> None:
    """SIGKILL ``pid``, its descendants, the ``extra`` kernel pids and their process groups.

    ``extra`` pids (from a kernel pid file) are only touched while they still run our kernel module;
    our own process group is never signalled.
    """
    own_pgid = os.getpgrp()
    procs = tree(pid) if pid else []
    for e in extra:
        if _is_grading_kernel(e):
            procs += tree(e)
    groups = set()
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except OSError:
            pass
    for g in groups - {own_pgid}:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


@dataclass
class Limited:
    """Outcome of :func:`run_limited`."""
    returncode: int | None
    killed: str | None      # why the grader killed it ("wall-clock", "memory"), or None
    seconds: float
    stderr_tail: str


def run_limited(cmd: list[str], *, timeout: float, memory_bytes: int, cwd=None, env=None,
                stdin_data: bytes | None = None, stderr_path: Path | None = None, pass_fds: tuple = ()) -> Limited:
    """Run ``cmd`` in a new session; kill its tree past ``timeout`` seconds or ``memory_bytes`` RSS.
    ``pass_fds``: descriptors the child inherits (the re-check's result and guard pipes)."""
    start = time.monotonic()
    err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin_data else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, pass_fds=pass_fds)
        if stdin_data:
            try:
                proc.stdin.write(stdin_data)
                proc.stdin.close()
            except OSError:
                pass
        killed = None
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                killed = "wall-clock"
            elif tree_rss(proc.pid) > memory_bytes:
                killed = "memory"
            if killed:
                kill_tree(proc.pid)
                proc.wait()
                break
            time.sleep(POLL)
    finally:
        if stderr_path:
            err.close()
    tail = ""
    if stderr_path and Path(stderr_path).exists():
        tail = Path(stderr_path).read_bytes()[-4000:].decode(errors="replace")
    return Limited(proc.returncode, killed, time.monotonic() - start, tail)


def limit_address_space(nbytes: int) -> str:
    """Cap this process's address space (the *soft* ``RLIMIT_AS``) at ``nbytes``; say what was set.

    For the grader's main process, which loads what the workers wrote: a runaway load ends in a
    ``MemoryError`` for that one submission instead of the machine swapping. Only the soft limit is
    lowered, so the sandboxes' own ``prlimit`` may still give a kernel its ``--memory-gb``.
    """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    value = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
    if soft == resource.RLIM_INFINITY or soft > value:
        resource.setrlimit(resource.RLIMIT_AS, (value, hard))
    return f"grader main process: address space (soft RLIMIT_AS) {resource.getrlimit(resource.RLIMIT_AS)[0] / 1024**3:.2f} GiB"


class WorkerDied(RuntimeError):
    """The worker process exited or was killed; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Worker:
    """One :mod:`autograder.nbgrader_worker` process and its request/answer pipes."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path, cwd: Path):
        req_r, self._req_w = os.pipe()
        self._ans_r, ans_w = os.pipe()
        self.log_path = log_path
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd + ["--in-fd", str(req_r), "--out-fd", str(ans_w)], pass_fds=(req_r, ans_w),
                                     env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        os.close(req_r)
        os.close(ans_w)
        self._buf = b""
        self.ready = False

    def alive(self) -> bool:
        """Whether the worker process is still running."""
        return self.proc.poll() is None

    def _read_line(self, deadline: float, memory_bytes: int, pidfile: Path | None) -> dict:
        while b"\n" not in self._buf:
            now = time.monotonic()
            extra = read_pidfile(pidfile) if pidfile else []
            if now > deadline:
                self.kill(extra)
                raise WorkerDied("wall-clock")
            if memory_bytes and tree_rss(self.proc.pid, extra) > memory_bytes:
                self.kill(extra)
                raise WorkerDied("memory")
            ready, _, _ = select.select([self._ans_r], [], [], min(POLL * 2, max(0.0, deadline - now)))
            if ready:
                chunk = os.read(self._ans_r, 1 << 16)
                if not chunk:
                    self.kill(extra)
                    raise WorkerDied(f"worker exited (code {self.proc.poll()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self, timeout: float = 300) -> None:
        """Wait for the worker's start-up line (nbgrader imported)."""
        if not self.ready:
            self._read_line(time.monotonic() + timeout, 0, None)
            self.ready = True

    def request(self, req: dict, *, timeout: float, memory_bytes: int, pidfile: Path | None = None) -> dict:
        """Send ``req``; wait for the answer, killing the worker past the limits (raises WorkerDied)."""
        self.wait_ready()
        try:
            os.write(self._req_w, (json.dumps(req) + "\n").encode())
        except OSError:
            self.kill()
            raise WorkerDied(f"worker exited (code {self.proc.poll()})") from None
        return self._read_line(time.monotonic() + timeout, memory_bytes, pidfile)

    def kill(self, extra: list[int] = ()) -> None:
        """Kill the worker, its kernels and ``extra`` kernel pids; close the pipes."""
        kill_tree(self.proc.pid, list(extra))
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.close()

    def close(self) -> None:
        """Close our ends of the pipes."""
        for fd in (self._req_w, self._ans_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._req_w = self._ans_r = -1

    def stop(self) -> None:
        """Ask the worker to exit (closing its request pipe) and reap it."""
        try:
            os.close(self._req_w)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        try:
            os.close(self._ans_r)
        except OSError:
            pass
