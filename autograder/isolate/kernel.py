"""The grading kernel: an ordinary IPython kernel, started inside the sandbox and behind the guard.

nbgrader runs every submission in this kernel (kernelspec ``rb-autograder``, written per run by
:func:`write_kernelspec`). ``python -m autograder.isolate.kernel -f CONNECTION_FILE`` runs twice:

**Outside** (the nbgrader worker's kernel manager starts it; ``$AUTOGRADER_SANDBOX`` is set): the
*launcher*. It gives the submission's private scratch folder and socket folder to a fresh sandbox
uid, copies the connection file into the socket folder, records its pid in
``$AUTOGRADER_KERNEL_PIDFILE``, moves itself into the submission's cgroup leaf (when the grader made
one, :mod:`autograder.isolate.cgroups`), keeps none of the worker's file descriptors (its log included:
output goes to the submission's ``kernel-output.txt``) and replaces itself (``exec``) with ``bwrap`` running the same module
inside the sandbox (:mod:`autograder.isolate.sandbox`). The worker talks to the kernel over ZeroMQ's ``ipc``
transport: Unix sockets in the socket folder, which is bound at the same path inside — a kernel in
its own network namespace cannot be reached over TCP. Interrupts are sent as ``interrupt_request``
messages (``interrupt_mode: message``): a signal to the ``bwrap`` process would not reach the kernel.
Killing the ``bwrap`` process (jupyter_client does when it shuts the kernel down) ends every process
in the sandbox.

**Inside** (or directly, with ``--sandbox off``): before ipykernel starts it

1. with ``--sandbox off`` only, appends its pid to ``$AUTOGRADER_KERNEL_PIDFILE`` so the grader can
   kill it and its process group;
2. caps the size of files it may write and disables core dumps (the sandbox also does);
3. installs the audit-hook guard (:mod:`autograder.isolate.guard`) from ``$AUTOGRADER_GUARD``.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from pathlib import Path

KERNEL_NAME = "rb-autograder"
MAX_FILE_BYTES = 512 * 1024 * 1024
SANDBOX_ENV = "AUTOGRADER_SANDBOX"      # JSON: scratch, ipc, limits (set by the worker per submission)
PASSED_IN = ("AUTOGRADER_GUARD", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def write_kernelspec(jupyter_dir: Path, python: str = sys.executable, sandboxed: bool = True) -> Path:
    """Write ``<jupyter_dir>/kernels/rb-autograder/kernel.json``; put ``jupyter_dir`` on JUPYTER_PATH."""
    spec_dir = Path(jupyter_dir) / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [python, "-m", "autograder.isolate.kernel", "-f", "{connection_file}"],
            "display_name": "Python 3 (autograder)", "language": "python",
            "interrupt_mode": "message" if sandboxed else "signal",
            "metadata": {"debugger": False}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return spec_dir


def _launch_sandboxed(cfg: dict, argv: list[str]) -> None:
    """Outside: exec bwrap running this module inside the submission's sandbox (never returns)."""
    from autograder.isolate import sandbox
    conn = Path(argv[argv.index("-f") + 1])
    ipc = Path(cfg["ipc"])
    # one uid per submission (cfg["uid"]): a kernel restarted after a crash can use the files of the first
    box = sandbox.Box(Path(cfg["scratch"]), os.getcwd(), sandbox.Limits(**cfg["limits"]), [(str(ipc), str(ipc))],
                      uid=cfg.get("uid") if os.geteuid() == 0 else None)
    sandbox.prepare_scratch(box)
    inner_conn = ipc / "kernel.json"
    shutil.copyfile(conn, inner_conn)
    os.chmod(inner_conn, 0o600)
    if box.uid is not None:
        os.chown(inner_conn, box.uid, box.uid)
    pidfile = os.environ.get("AUTOGRADER_KERNEL_PIDFILE")
    if pidfile:   # this pid becomes bwrap's: killing it ends the sandbox
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
    if cfg.get("cgroup"):   # the submission's cgroup leaf, before anything of the student's runs
        from autograder.isolate import cgroups
        cgroups.join(cfg["cgroup"])
    _own_descriptors(Path(cfg["scratch"]).with_name("kernel-output.txt"))   # closes every fd >= 3
    if cfg.get("guard_fifo") and os.environ.get("AUTOGRADER_GUARD"):
        # the guard's log: a FIFO in the grader's folder (not visible inside), opened here, outside;
        # the sandbox inherits only the write end (evidence the student's code cannot truncate). It is
        # moved to GUARD_FD, clear of descriptor 3, which sandbox.command uses for the seccomp program.
        fd = os.open(cfg["guard_fifo"], os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        if fd != GUARD_FD:
            os.dup2(fd, GUARD_FD)
            os.close(fd)
        os.set_inheritable(GUARD_FD, True)
        os.environ["AUTOGRADER_GUARD"] = json.dumps({**json.loads(os.environ["AUTOGRADER_GUARD"]), "log": GUARD_FD})
    env = {k: os.environ[k] for k in PASSED_IN if k in os.environ}
    cmd = sandbox.command([sys.executable, "-m", "autograder.isolate.kernel", "-f", str(inner_conn)], box, env)
    os.execv(cmd[0], cmd)


GUARD_FD = 9   # the kernel guard log's write end inside the sandbox (see _launch_sandboxed)


def _own_descriptors(output: Path) -> None:
    """Give the sandbox nothing of the worker's: stdin from /dev/null, stdout/stderr to ``output`` (a
    file of this submission, outside the sandbox; the worker's log would otherwise be the kernel's
    stderr), every other inherited descriptor closed."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for fd, src in ((0, null), (1, out), (2, out)):
        os.dup2(src, fd)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))


def _prepare(sandboxed: bool) -> None:
    pidfile = os.environ.get("AUTOGRADER_KERNEL_PIDFILE")
    if pidfile and not sandboxed:
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
    for limit, value in ((resource.RLIMIT_FSIZE, MAX_FILE_BYTES), (resource.RLIMIT_CORE, 0)):
        try:
            soft, hard = resource.getrlimit(limit)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass
    from autograder.isolate import guard
    guard.install_from_env()
    # leave nothing of the grader importable from sys.modules for student code to fiddle with
    for name in [m for m in sys.modules if m == "autograder" or m.startswith("autograder.")]:
        del sys.modules[name]


def main() -> None:
    """Outside the sandbox: start it (launcher). Inside (or unsandboxed): prepare, then run ipykernel."""
    cfg = os.environ.get(SANDBOX_ENV)
    inside = os.environ.get("AUTOGRADER_SANDBOXED") == "1"
    if cfg and not inside:
        _launch_sandboxed(json.loads(cfg), sys.argv)
    _prepare(inside)
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
