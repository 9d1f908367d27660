"""Shared helpers of the benchmark scripts: machine description, memory readings, JSON output, text.

Nothing here is timed. The scripts import it as ``from common import ...`` (they run as
``python bench/<script>.py``, which puts ``bench/`` on ``sys.path``).
"""
from __future__ import annotations

import inspect
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers depend on: CPU, cores, memory, versions, load average, git commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    mem = None
    try:
        import psutil
        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    import numpy
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": mem, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "commit": commit,
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def describe_machine(m: dict) -> str:
    return (f"{m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch {m['torch']} "
            f"({m['torch_threads']} threads), numpy {m['numpy']}; commit {m['commit']}; "
            f"load average {m['load_average']}")


def rss_mib() -> float:
    """Resident set size of this process now, in MiB."""
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux: ``5 > /proc/self/clear_refs``).

    Returns False where that is not possible; :func:`peak_rss_mib` is then the lifetime peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Highest resident set size since the last :func:`reset_peak_rss` (``VmHWM``), in MiB.

    Falls back to ``getrusage``'s lifetime maximum where /proc is not available.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_of(fn, repeat: int = 3) -> float:
    """Fastest of ``repeat`` wall-clock timings of ``fn()`` in seconds (the least disturbed run)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str))
        print(f"\nwrote {path}")


# ---- an offline text corpus -------------------------------------------------------------------
# Real English prose that every machine with Python has: the documentation strings of standard-library
# modules and of their public functions and classes. Deterministic for a given Python version.
STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect",
    "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)


def stdlib_docs() -> list[str]:
    """Documentation strings (at least 200 characters) of the modules above and their public members."""
    import importlib
    out = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            if inspect.ismodule(obj) and obj is not mod:
                continue
            doc = inspect.getdoc(obj) if (obj is mod or inspect.isclass(obj) or inspect.isroutine(obj)) else None
            if doc and len(doc) >= 200 and doc not in out:
                out.append(doc)
    return out


def token_windows(tokenizer, n_tokens: int, window: int = 256) -> torch.Tensor:
    """``[n_windows, window]`` token ids cut from the concatenated stdlib documentation.

    Enough windows to hold at least ``n_tokens`` tokens; the corpus is repeated if it is shorter
    (about 0.5M tokens with Python 3.11), which repeats activations, not just text, so callers
    that need unique positions should ask for fewer.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in stdlib_docs():
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= n_tokens + window:
            break
    if not ids:
        raise RuntimeError("no standard-library documentation found to use as text")
    need = -(-n_tokens // window) * window
    while len(ids) < need:
        ids += ids
    return torch.tensor(ids[:need]).view(-1, window)
