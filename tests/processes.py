"""The processes still running on this machine that a test's predicate picks (leftovers of a grading run)."""
from __future__ import annotations

from typing import Callable

import psutil


def left_over(pick: Callable[[int, str], bool]) -> list[str]:
    """``"<pid> uid <uid>: <command line>"`` for every process where ``pick(real uid, command line)``."""
    left = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            uid = p.info["uids"].real if p.info["uids"] else -1
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if pick(uid, cmd):
            left.append(f"{p.info['pid']} uid {uid}: {cmd[:150]}")
    return left
