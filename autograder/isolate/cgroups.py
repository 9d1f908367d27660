"""CPU, memory and process-count isolation per submission with Linux control groups.

The sandbox (:mod:`autograder.isolate.sandbox`) bounds what one process may do, but per-process limits do not
bound one submission's *share of the machine*: 60 ``setsid`` busy loops are 60 scheduler entities
(60 autogroups), and an honest student graded in parallel gets 1/61 of a core. A control group
turns a whole submission into one entity. Each submission gets a group with two leaves::

    <base>/autograder-<run>/<submission>/        cpu weight (equal share), cpu quota, memory, pids
                                        kernel/  the Jupyter kernel's sandbox (and its children)
                                        recheck/ the out-of-kernel re-check's sandbox

With the default weight every submission's group gets an equal share of the CPU under contention,
however many processes it starts (CFS shares time between *groups* first), and at most
``cpu_quota`` CPUs even on an idle machine; its memory (tmpfs pages included) and task count are
capped. When the submission is done, :meth:`Group.remove` kills everything still in it
(``cgroup.kill`` on v2; on v1 SIGKILL to every pid in ``cgroup.procs`` until none is left) and
removes the folders. A grader that was killed (SIGKILL, a lost Dask worker) cannot remove its
run's group; the next grader on the machine sweeps such groups (:func:`sweep_stale`).

Two layouts are supported, detected by :func:`detect`:

* **v2** (unified; most current hosts and Kubernetes nodes): ``cpu.weight``, ``cpu.max``,
  ``memory.max``, ``memory.swap.max``, ``pids.max`` in one tree under the grader's own cgroup.
  The ``cpu memory pids`` controllers must be enabled in ``cgroup.subtree_control``; a cgroup that
  holds processes cannot do that (the "no internal processes" rule), so when the grader sits in a
  non-root cgroup with controllers not yet delegated, it moves *itself* into a ``grader`` leaf first.
* **v1** (and the hybrid layout, e.g. ``/sys/fs/cgroup/{cpu,memory,pids}`` plus a controller-less
  ``/sys/fs/cgroup/unified``): ``cpu.shares`` (1024 = weight 100), ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``, ``memory.limit_in_bytes``, ``pids.max``, one group per hierarchy.

A process enters a leaf by writing its own pid to the leaf's ``cgroup.procs`` *before* it runs
student code: the kernel launcher does it before it ``exec``\\ s bwrap (:mod:`autograder.isolate.kernel`),
the re-check through :func:`enter` (a ``/bin/sh`` that writes ``$$`` and ``exec``\\ s). Every child
is born in the same group; nothing inside the sandbox can leave it (``/sys`` is not mounted there
and the code runs as an unprivileged uid).

Where no usable hierarchy exists (not root, read-only cgroupfs, no controllers) the grader
**degrades** by default: it grades with the sandbox's per-process limits only and says so in the
run output and in ``results.json``'s warnings (``--cgroups require`` fails closed instead;
``--cgroups off`` skips them).
"""
from __future__ import annotations

import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

MOUNT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "memory", "pids")
PERIOD_US = 100_000


@dataclass(frozen=True)
class Policy:
    """Limits of one submission's group (both leaves together) and of each leaf.

    CPU share under contention = ``cpu_weight`` / sum of the weights of the busy groups (v1:
    ``cpu.shares = 1024 * weight / 100``); ``cpu_quota`` CPUs at most (``cpu.max = quota*period period``).
    """
    cpu_weight: int = 100
    cpu_quota: float | None = 1.0
    memory_bytes: int = 10 * 1024**3          # the whole submission
    leaf_memory_bytes: int = 5 * 1024**3      # each of kernel / recheck
    pids: int = 1024

    def describe(self) -> str:
        quota = f"at most {self.cpu_quota:g} CPU" if self.cpu_quota else "no CPU quota"
        return (f"equal CPU share (weight {self.cpu_weight}), {quota}, memory {self.memory_bytes / 1024**3:.1f} GiB "
                f"({self.leaf_memory_bytes / 1024**3:.1f} GiB per process tree), {self.pids} tasks")


def policy_for(memory_bytes: int, tmp_bytes: int, processes: int, cpus: int, jobs: int) -> Policy:
    """The policy the pipeline applies: each leaf gets the sandbox's memory limit plus its tmpfs
    (``/tmp`` and ``/dev/shm`` pages are charged to the group), each submission ``cpus / jobs`` CPUs
    (at least 1) and room for the sandbox's process limit in both leaves."""
    leaf = memory_bytes + tmp_bytes + 64 * 1024**2
    return Policy(cpu_quota=max(1.0, cpus / max(1, jobs)), memory_bytes=2 * leaf, leaf_memory_bytes=leaf,
                  pids=2 * (processes + 64))


def _write(path: Path, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _own_path(controller: str | None) -> str:
    """This process's cgroup path in the v2 tree (``controller=None``) or a v1 hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        num, ctrls, path = line.split(":", 2)
        if controller is None and num == "0" and ctrls == "":
            return path
        if controller is not None and controller in ctrls.split(","):
            return path
    raise OSError(f"this process is in no {controller or 'v2'} cgroup")


@dataclass
class Hierarchy:
    """Where the grader makes its groups: ``kind`` is ``v2``, ``v1`` or ``none`` (then ``reason``)."""
    kind: str
    bases: dict[str, Path] = field(default_factory=dict)   # v2: {"": base}; v1: {controller: base}
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.kind in ("v2", "v1")

    def run_group(self, name: str, policy: Policy) -> "RunGroup":
        return RunGroup(self, name, policy)

    def sweep_stale(self, min_age_s: float = 600.0) -> list[Path]:
        """Remove the run groups of graders that died without cleaning up; returns what was removed.

        A run group ``autograder-[dask-]<date>-<time>-<pid>-<hex>`` is stale when its grader's pid
        is gone, no process is left anywhere in it, and it is older than ``min_age_s`` (so a group of
        a grader in another pid namespace, which looks dead from here, is kept while it may be in use).
        """
        removed = []
        for base in self.bases.values():
            for d in base.glob("autograder-*"):
                parts = d.name.split("-")
                if not d.is_dir() or len(parts) < 5 or not parts[-2].isdigit():
                    continue
                try:
                    os.kill(int(parts[-2]), 0)
                    continue                       # its grader is alive
                except ProcessLookupError:
                    pass
                except (PermissionError, OverflowError):
                    continue
                try:
                    if time.time() - d.stat().st_mtime < min_age_s or any(_procs(p) for p in [d, *d.rglob("*")]
                                                                           if p.is_dir()):
                        continue
                    for p in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                        _rmdir(p)
                    _rmdir(d)
                    removed.append(d)
                except OSError:
                    continue                       # in use after all, or not ours to remove
        return removed


def detect(mount: Path = MOUNT) -> Hierarchy:
    """The usable cgroup hierarchy for per-submission groups, or ``kind="none"`` with the reason."""
    if os.geteuid() != 0:
        return Hierarchy("none", reason="the grader does not run as root, so it cannot create cgroups")
    try:
        if (mount / "cgroup.controllers").exists():   # pure v2
            return _detect_v2(mount)
        return _detect_v1(mount)
    except OSError as e:
        return Hierarchy("none", reason=f"{type(e).__name__}: {e}")


def _detect_v2(mount: Path) -> Hierarchy:
    base = mount / _own_path(None).lstrip("/")
    have = set((base / "cgroup.controllers").read_text().split())
    missing = [c for c in CONTROLLERS if c not in have]
    if missing:
        return Hierarchy("none", reason=f"cgroup v2 at {base} has no {'/'.join(missing)} controller "
                                        "(delegate them to the grader's cgroup)")
    enabled = set((base / "cgroup.subtree_control").read_text().split())
    if not set(CONTROLLERS) <= enabled:
        try:
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        except OSError:
            # the no-internal-processes rule: move the grader itself into a leaf, then enable
            leaf = base / "grader"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", os.getpid())
            try:
                _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
            except OSError as e:
                return Hierarchy("none", reason=f"cgroup v2: cannot enable cpu/memory/pids below {base} ({e}); other "
                                                "processes share the grader's cgroup: start the grader in its own "
                                                "(e.g. a container or a delegated systemd scope)")
    return Hierarchy("v2", {"": base})


def _detect_v1(mount: Path) -> Hierarchy:
    bases = {}
    for c in CONTROLLERS:
        root = mount / c
        if not (root / "cgroup.procs").exists():
            return Hierarchy("none", reason=f"no cgroup v1 {c} hierarchy at {root} and no cgroup v2 tree at {mount}")
        base = root / _own_path(c).lstrip("/")
        if not os.access(base, os.W_OK):
            return Hierarchy("none", reason=f"cgroup v1 {c}: {base} is not writable")
        bases[c] = base
    return Hierarchy("v1", bases)


class RunGroup:
    """The run's group ``autograder-<name>`` in every hierarchy; parent of the submissions' groups."""

    def __init__(self, h: Hierarchy, name: str, policy: Policy):
        self.h, self.policy = h, policy
        self.dirs = {k: b / f"autograder-{name}" for k, b in h.bases.items()}
        for d in self.dirs.values():
            d.mkdir()
        if h.kind == "v2":
            _write(self.dirs[""] / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))

    def describe(self) -> str:
        where = ", ".join(str(d) for d in self.dirs.values())
        return f"cgroup {self.h.kind} per submission ({where}): {self.policy.describe()}"

    def submission(self, name: str) -> "Group":
        return Group(self, name)

    def remove(self) -> None:
        """Remove the run's group (kills whatever a submission's group still holds)."""
        for d in self.dirs.values():
            for sub in [p for p in d.iterdir() if p.is_dir()] if d.exists() else []:
                _kill_and_remove(sub, self.h.kind)
            _rmdir(d)


class Group:
    """One submission's group with the leaves ``kernel`` and ``recheck``."""

    LEAVES = ("kernel", "recheck")

    def __init__(self, run: RunGroup, name: str):
        self.kind, p = run.h.kind, run.policy
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80] or "_"
        self.dirs = {k: d / f"s-{safe}-{os.urandom(3).hex()}" for k, d in run.dirs.items()}
        for k, d in self.dirs.items():
            d.mkdir()
            for leaf in self.LEAVES:
                (d / leaf).mkdir()
        if self.kind == "v2":
            d = self.dirs[""]
            _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
            _write(d / "cpu.weight", p.cpu_weight)
            _write(d / "cpu.max", f"{int(p.cpu_quota * PERIOD_US)} {PERIOD_US}" if p.cpu_quota else f"max {PERIOD_US}")
            _write(d / "memory.max", p.memory_bytes)
            _write(d / "pids.max", p.pids)
            for leaf in self.LEAVES:
                _write(d / leaf / "memory.max", p.leaf_memory_bytes)
                if (d / leaf / "memory.swap.max").exists():
                    _write(d / leaf / "memory.swap.max", 0)
        else:
            cpu, mem, pids = self.dirs["cpu"], self.dirs["memory"], self.dirs["pids"]
            _write(cpu / "cpu.shares", max(2, round(1024 * p.cpu_weight / 100)))
            _write(cpu / "cpu.cfs_period_us", PERIOD_US)
            _write(cpu / "cpu.cfs_quota_us", int(p.cpu_quota * PERIOD_US) if p.cpu_quota else -1)
            _write(mem / "memory.limit_in_bytes", p.memory_bytes)
            for leaf in self.LEAVES:
                _write(mem / leaf / "memory.limit_in_bytes", p.leaf_memory_bytes)
            _write(pids / "pids.max", p.pids)

    def procs_files(self, leaf: str) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to, to enter ``leaf``."""
        return [str(d / leaf / "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        """Every process still in the group."""
        return set().union(*(_procs(d / leaf) for d in self.dirs.values() for leaf in self.LEAVES))

    def remove(self) -> None:
        """Kill every process in the group, then remove its folders (idempotent)."""
        for d in self.dirs.values():
            _kill_and_remove(d, self.kind)


def _procs(d: Path) -> set[int]:
    try:
        return {int(x) for x in (d / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def _rmdir(d: Path) -> None:
    try:
        d.rmdir()
    except FileNotFoundError:
        pass


def _kill_and_remove(d: Path, kind: str, timeout: float = 10.0) -> None:
    """SIGKILL everything in ``d`` and its child groups, wait until they are gone, remove them."""
    if not d.exists():
        return
    kids = [p for p in d.iterdir() if p.is_dir()]
    if kind == "v2" and (d / "cgroup.kill").exists():
        _write(d / "cgroup.kill", 1)   # atomic: the kernel kills the whole subtree, forks included
    deadline = time.monotonic() + timeout
    while True:
        left = set().union(_procs(d), *(_procs(k) for k in kids))
        if not left:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {sorted(left)[:10]} survived SIGKILL in cgroup {d}")
        for pid in left:   # v1 (or v2 without cgroup.kill): kill until none is left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    deadline = time.monotonic() + timeout
    for p in [*kids, d]:
        while True:   # a group can stay busy for a moment after its last task exited
            try:
                _rmdir(p)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def enter(argv: list[str], procs_files: list[str]) -> list[str]:
    """``argv`` started through ``/bin/sh``, which first moves itself into the group (writes ``$$``
    to each ``cgroup.procs``) and then ``exec``\\ s ``argv``: no student code runs outside it. If a
    write fails, the shell exits with 125 and ``argv`` never runs (fail closed)."""
    if not procs_files:
        return list(argv)
    writes = " && ".join(f"echo $$ > {shlex.quote(f)}" for f in procs_files)
    return ["/bin/sh", "-c", f'{writes} || exit 125; exec "$@"', "cgroup-enter", *argv]


def join(procs_files: list[str]) -> None:
    """Move the calling process into the group (before it execs what runs student code)."""
    for f in procs_files:
        _write(Path(f), os.getpid())


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1

