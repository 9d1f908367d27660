"""The sandbox's system-call filter: a classic BPF program for ``bwrap --seccomp FD``.

Student code needs ordinary system calls only. The filter takes away kernel surface that an
unprivileged process could still reach inside bubblewrap and that no lesson needs:

* **new namespaces**: ``unshare``, ``setns``, and ``clone`` with ``CLONE_NEWUSER`` (a new user
  namespace gives the code root-like capabilities over fresh namespaces, the usual first step of a
  kernel exploit); ``clone3`` passes its flags in memory a filter cannot read, so it answers
  ``ENOSYS`` and the C library falls back to ``clone``;
* **debugging other processes**: ``ptrace``, ``process_vm_readv``/``process_vm_writev``, ``kcmp``;
* **kernel key rings** (``keyctl``, ``add_key``, ``request_key``), **eBPF** (``bpf``),
  **performance counters** (``perf_event_open``), ``userfaultfd`` and **io_uring**
  (``io_uring_setup``/``_enter``/``_register``).

Each answers ``EPERM`` (so a program sees an ordinary "operation not permitted"). A system call
made with a different architecture's numbering (32-bit ``int 0x80`` on x86-64, x32 numbers) kills
the process: its numbers would mean other calls. The program is assembled here with
:mod:`struct` (``struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}``, read against
``struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}``) for x86-64 and aarch64.
"""
from __future__ import annotations

import platform
import struct

# BPF instruction classes / fields
LD_W_ABS = 0x20          # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15             # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35             # BPF_JMP | BPF_JGE | BPF_K
JSET_K = 0x45            # BPF_JMP | BPF_JSET | BPF_K
RET_K = 0x06             # BPF_RET | BPF_K

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
EPERM, ENOSYS = 1, 38
CLONE_NEWUSER = 0x10000000

OFF_NR, OFF_ARCH = 0, 4
OFF_ARG0_LOW = 16        # args[0], low 32 bits (little-endian)

# per architecture: audit arch id and the system-call numbers
ARCHES = {
    "x86_64": dict(audit=0xC000003E, x32_bit=0x40000000, clone=56, clone3=435, deny=dict(
        unshare=272, setns=308, ptrace=101, process_vm_readv=310, process_vm_writev=311, kcmp=312,
        keyctl=250, add_key=248, request_key=249, bpf=321, perf_event_open=298, userfaultfd=323,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427)),
    "aarch64": dict(audit=0xC00000B7, x32_bit=None, clone=220, clone3=435, deny=dict(
        unshare=97, setns=268, ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272,
        keyctl=219, add_key=217, request_key=218, bpf=280, perf_event_open=241, userfaultfd=282,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427)),
}
DENIED = tuple(ARCHES["x86_64"]["deny"]) + ("clone(CLONE_NEWUSER)", "clone3 (ENOSYS)")


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes:
    """The filter for ``machine`` (default: this one) as raw ``sock_filter`` records."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise RuntimeError(f"no seccomp filter for architecture {machine!r} (known: {', '.join(ARCHES)})")
    a = ARCHES[machine]
    errno = lambda e: _ins(RET_K, RET_ERRNO | e)   # noqa: E731
    out = [_ins(LD_W_ABS, OFF_ARCH),
           _ins(JEQ_K, a["audit"], jt=1, jf=0),      # our arch: skip the kill
           _ins(RET_K, RET_KILL_PROCESS),
           _ins(LD_W_ABS, OFF_NR)]
    if a["x32_bit"]:
        out += [_ins(JGE_K, a["x32_bit"], jt=0, jf=1), _ins(RET_K, RET_KILL_PROCESS)]
    for nr in a["deny"].values():
        out += [_ins(JEQ_K, nr, jt=0, jf=1), errno(EPERM)]
    out += [_ins(JEQ_K, a["clone3"], jt=0, jf=1), errno(ENOSYS),
            _ins(JEQ_K, a["clone"], jt=0, jf=3),     # clone: look at its flags
            _ins(LD_W_ABS, OFF_ARG0_LOW),
            _ins(JSET_K, CLONE_NEWUSER, jt=0, jf=1), errno(EPERM),
            _ins(RET_K, RET_ALLOW)]
    return b"".join(out)
