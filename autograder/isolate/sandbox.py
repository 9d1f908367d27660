"""The operating-system sandbox every process that runs student code starts in (bubblewrap).

Two kinds of process run a student's code: the Jupyter kernel nbgrader executes the notebook in,
and the out-of-kernel re-check process (:mod:`autograder.check.recheck_runner`). Each starts through
:func:`command`, which wraps it in ``bwrap`` (Debian package ``bubblewrap``) with:

* its **own PID namespace** (``--unshare-pid``): it sees only its own processes, cannot signal the
  grader, other students or anything outside, and when the sandbox's first process ends, the kernel
  kills every process inside (a ``setsid`` double fork included); ``--die-with-parent`` ends it
  when the process that started it dies;
* **no network** (``--unshare-net``), its own System V IPC (``--unshare-ipc``) and a new terminal
  session (``--new-session``: no ``TIOCSTI`` into the grader's terminal);
* a **filesystem view holding only what the code needs**: read-only binds of ``/usr``, a few files
  of ``/etc`` (dynamic loader cache, time zone, users), the Python installation and the virtual
  environment, the ``residual_bandwidth`` library, and of this package only the modules the
  sandboxed processes run (``__init__``, ``kernel``, ``guard``, ``recheck_runner``); a fresh ``/proc`` and ``/dev``; a
  private ``/tmp`` (tmpfs, size-limited); and **one writable scratch folder** (the submission's
  own). ``solutions/``, ``.git``, gradebooks, results, other students' folders and the grader's
  work folders are not mounted, so they do not exist inside;
* an **unprivileged user**: when the grader runs as root, the code runs as a fresh numeric uid
  (``setpriv``; no capabilities, empty bounding set, ``no_new_privs``, so set-uid programs give
  nothing), which is what makes the process-count limit bind (the kernel never applies
  ``RLIMIT_NPROC`` to root: measured, 40 children under ``--nproc=20`` as root, fork refused at 20
  as another uid);
* a **system-call filter** (``--seccomp``, :mod:`autograder.isolate.seccomp`): no new user namespaces,
  ``ptrace``, ``keyctl``, ``bpf``, ``perf_event_open``, io_uring and a few more; bwrap reads it from
  a descriptor the ``/bin/sh`` in front of it opens on a root-only file, so no descriptor of the
  caller is needed (callers start the sandbox with ``close_fds``: none of theirs leaks inside);
* **limits** (``prlimit``, inherited by every child): address space (``RLIMIT_AS``), processes of
  the sandbox's uid (``RLIMIT_NPROC``), file size (``RLIMIT_FSIZE``), CPU seconds (``RLIMIT_CPU``),
  no core dumps. The grader also watches the resident memory of the whole tree and a wall clock.

:func:`probe` runs ``bwrap ... true`` with the same policy: the grader refuses to run student code
when it fails, unless the instructor passes ``--sandbox off`` (see autograder/README.md, section 6).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(__file__).resolve().parents[1]   # autograder/
# of this package, only what the kernel start-up imports is visible inside
PACKAGE_FILES = ("__init__.py", "isolate/__init__.py", "isolate/kernel.py", "isolate/guard.py", "check/__init__.py",
                 "check/recheck_runner.py")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "passwd", "group",
             "alternatives", "timezone")
UID_RANGE = (200_000, 260_000)   # fresh uid per sandbox (no such users exist on the host)
HOME = "/tmp/home"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox (applied with ``prlimit``; every child inherits them)."""
    memory_bytes: int = 4 * 1024**3          # RLIMIT_AS per process
    processes: int = 256                     # RLIMIT_NPROC: processes + threads of the sandbox's uid
    file_bytes: int = 512 * 1024**2          # RLIMIT_FSIZE: largest file it may write
    cpu_seconds: int = 1200                  # RLIMIT_CPU per process
    tmp_bytes: int = 512 * 1024**2           # size of the private /tmp (tmpfs is memory)

    def prlimit(self) -> list[str]:
        return ["/usr/bin/prlimit", f"--as={self.memory_bytes}", f"--nproc={self.processes}",
                f"--fsize={self.file_bytes}", f"--cpu={self.cpu_seconds}", "--core=0", "--"]


@dataclass
class Box:
    """One sandbox: its writable scratch folder, where that folder appears inside, and its uid."""
    scratch: Path                   # host folder, the only writable place (besides /tmp)
    inside: str                     # path of the scratch folder inside the sandbox (also the cwd)
    limits: Limits = field(default_factory=Limits)
    extra_rw: list[tuple[str, str]] = field(default_factory=list)   # (host, inside) more writable binds
    uid: int | None = None          # None: a fresh one when the grader is root

    def __post_init__(self):
        if self.uid is None and os.geteuid() == 0:
            self.uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])


def bwrap_path() -> str | None:
    """The ``bwrap`` executable, or None."""
    return shutil.which("bwrap")


def library_dirs() -> list[str]:
    """Read-only folders Python needs: its installation, the venv, the residual_bandwidth library."""
    dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    spec = importlib.util.find_spec("residual_bandwidth")
    if spec and spec.submodule_search_locations:
        pkg = Path(list(spec.submodule_search_locations)[0]).resolve()
        dirs.add(str(pkg))   # the package folder only, never the repository around it
    exe = Path(sys.executable)
    for p in (exe, exe.resolve()):
        dirs.add(os.path.realpath(p.parent.parent))
    # a folder that contains the repository would expose solutions/ and .git: refuse it
    root = str(ROOT)
    bad = [d for d in dirs if root == d or root.startswith(d.rstrip("/") + "/")]
    if bad:
        raise RuntimeError(f"the Python installation {bad} contains the course repository {root}; the sandbox "
                           "cannot mount it without exposing solutions/ and .git (use a venv outside the repository)")
    return sorted(d for d in dirs if not d.startswith("/usr/") and d != "/usr")


def cache_dirs() -> list[str]:
    """Caches mounted read-only so the sandbox does not rebuild them: the embedded model's weights
    (``residual_bandwidth.models.cache_root``: ``$RESIDUAL_BANDWIDTH_CACHE`` or the user cache dir)."""
    out = [os.environ.get("RESIDUAL_BANDWIDTH_CACHE", "")]
    try:
        from platformdirs import user_cache_dir
        out.append(user_cache_dir("residual-bandwidth"))
    except ImportError:
        pass
    return sorted({os.path.realpath(d) for d in out if d and os.path.isdir(d)})


def _python_path() -> str:
    spec = importlib.util.find_spec("residual_bandwidth")
    parts = [str(ROOT)]
    if spec and spec.submodule_search_locations:
        parts.insert(0, str(Path(list(spec.submodule_search_locations)[0]).resolve().parent))
    return os.pathsep.join(parts)


_FILTER: dict[str, str] = {}
SECCOMP_FD = 3


def seccomp_file() -> str:
    """The filter program in a file only root (the grader) can write, made once per process."""
    from autograder.isolate import seccomp
    prog = seccomp.program()
    key = hashlib.sha256(prog).hexdigest()[:16]
    if key not in _FILTER:
        d = tempfile.mkdtemp(prefix="autograder-seccomp-")   # 0700, fresh name
        path = os.path.join(d, f"filter-{key}.bpf")
        with open(path, "wb") as f:
            f.write(prog)
        _FILTER[key] = path
    return _FILTER[key]


def command(argv: list[str], box: Box, env: dict[str, str] | None = None) -> list[str]:
    """``argv`` wrapped in bwrap with the policy in the module docstring.

    The result starts with ``/bin/sh -c 'exec "$@" 3<FILTER'``: the shell opens the seccomp program
    on descriptor 3 and becomes bwrap (``--seccomp 3``), which reads and closes it.

    ``env`` is the whole environment inside (the outside one is cleared); PATH, HOME, PYTHONPATH,
    MPLCONFIGDIR and the thread counts are set here.
    """
    bwrap = bwrap_path()
    if not bwrap:
        raise RuntimeError("bwrap (bubblewrap) is not installed")
    a = ["/bin/sh", "-c", f'exec "$@" {SECCOMP_FD}<"$0"', seccomp_file(),
         bwrap, "--seccomp", str(SECCOMP_FD), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
         "--new-session", "--hostname", "sandbox",
         "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib64", "lib32"):
        if os.path.islink(f"/{link}"):
            a += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        elif os.path.isdir(f"/{link}"):
            a += ["--ro-bind", f"/{link}", f"/{link}"]
    for name in ETC_FILES:
        a += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    a += ["--proc", "/proc", "--dev", "/dev",
          "--size", str(box.limits.tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp",
          "--size", str(64 * 1024**2), "--perms", "1777", "--tmpfs", "/dev/shm"]
    made: set[str] = {"/", "/usr", "/tmp", "/proc", "/dev", "/etc"}

    def parents(dest: str) -> list[str]:
        """bwrap makes missing parent folders with mode 0700 (unreadable to the sandbox's uid): make them 0755."""
        out = []
        for p in reversed(Path(dest).parents):
            if str(p) not in made:
                made.add(str(p))
                out += ["--perms", "0755", "--dir", str(p)]
        return out

    caches = cache_dirs()
    for d in library_dirs() + caches:
        a += parents(d) + ["--ro-bind", d, d]
    a += parents(str(PACKAGE / "x")) + ["--perms", "0755", "--dir", str(PACKAGE)]
    for name in PACKAGE_FILES:
        a += parents(str(PACKAGE / name)) + ["--ro-bind", str(PACKAGE / name), str(PACKAGE / name)]
    for host, inside in [(str(box.scratch), box.inside), *box.extra_rw]:
        a += parents(inside) + ["--bind", host, inside]
    a += ["--chdir", box.inside, "--clearenv"]
    inner = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "HOME": HOME, "USER": "student",
             "LOGNAME": "student", "TMPDIR": "/tmp", "MPLCONFIGDIR": "/tmp/matplotlib", "MPLBACKEND": "Agg",
             "PYTHONPATH": _python_path(), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1", "LANG": "C.UTF-8", "AUTOGRADER_SANDBOXED": "1",
             # no front end draws widgets here: the explorer's static view, and no background drawing
             "RESIDUAL_BANDWIDTH_STATIC": "1"}
    for k in ("RESIDUAL_BANDWIDTH_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(k):
            inner[k] = os.environ[k]
    if caches:
        inner["RESIDUAL_BANDWIDTH_CACHE"] = caches[0]
    inner.update(env or {})
    for k, v in inner.items():
        a += ["--setenv", k, str(v)]
    a += ["--"] + box.limits.prlimit()
    if box.uid is not None:
        a += ["/usr/bin/setpriv", f"--reuid={box.uid}", f"--regid={box.uid}", "--clear-groups",
              "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    return a + list(argv)


def prepare_scratch(box: Box) -> None:
    """Create the scratch folder, owned by the sandbox's uid (the only writable folder inside)."""
    box.scratch.mkdir(parents=True, exist_ok=True)
    if box.uid is not None:
        os.chown(box.scratch, box.uid, box.uid)
    for host, _ in box.extra_rw:
        if box.uid is not None:
            os.chown(host, box.uid, box.uid)


def probe(scratch_parent: Path) -> tuple[bool, str]:
    """Run ``true`` (and Python) in a sandbox with the grader's policy: (works, what failed)."""
    if not bwrap_path():
        return False, "bwrap (Debian package bubblewrap) is not installed"
    scratch = Path(scratch_parent) / f"sandbox-probe-{secrets.token_hex(4)}"
    box = Box(scratch, "/tmp/probe")
    try:
        prepare_scratch(box)
        for argv in (["/usr/bin/true"], [sys.executable, "-c", "import os; open('x', 'w').write('ok')"]):
            try:
                r = subprocess.run(command(argv, box), capture_output=True, text=True, timeout=60)
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
                return False, f"{' '.join(argv[:2])}: {e}"
            if r.returncode != 0:
                return False, f"`bwrap ... {' '.join(argv[:2])}` exited {r.returncode}: {r.stderr.strip()[-500:]}"
        if (scratch / "x").read_text() != "ok":
            return False, "the sandbox could not write its scratch folder"
        return True, ""
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


NOT_GUARANTEED = """\
--sandbox off: student code runs WITHOUT the operating-system sandbox. Not guaranteed in this mode:
  * student code can read every file the grader can (solutions/, .git, gradebooks, results, other
    students' submissions) through a child process, native code or interpreter tricks; the in-kernel
    guard (an audit hook) only catches the plain Python ways;
  * processes a submission starts can escape the process-tree kill (setsid + double fork), outlive
    the grader and rewrite results or the gradebook afterwards;
  * student code can signal the grader (e.g. kill it, losing the whole batch) and use the network;
  * there is no limit on process count or CPU time (memory and wall clock are still watched).
Use it only where bubblewrap cannot run (no user namespaces, e.g. macOS), and re-grade on a Linux
machine with the sandbox before releasing grades that matter."""
