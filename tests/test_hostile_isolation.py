"""Harm to others, graded through the real pipeline (issue 20 items 5, 7, 8, 11).

Crafted submissions next to an honest control in one batch (``--jobs 2``):

* ``a_cpu_hog`` starts 60 ``setsid`` busy loops while ``b_honest`` is graded in parallel: the honest
  one keeps its exact grade (per-submission cgroups, :mod:`autograder.isolate.cgroups`) and nothing of the
  attacker survives;
* ``c_flood_updates`` (a loop of ``display(..., display_id=True)`` + ``update`` with 1 MB payloads)
  and ``d_flood_shared_id`` (300 outputs sharing one display id, then 1 MB updates nbclient copies
  into each) are stopped by the output budget and the grader's main process stays small;
* ``e_xss_and_leak`` puts ``<script>``, ``<img onerror>`` in markdown and ``display(HTML(...))``
  into its notebook and prints ``In`` after the hidden tests: its feedback page runs no script in
  headless Chromium, shows no hidden test line, and its autograded notebook is not trusted.

Plus the sandbox's system-call filter and descriptor hygiene (:mod:`autograder.isolate.seccomp`).
"""
from __future__ import annotations

import html as htmlmod
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.isolate import cgroups, sandbox, seccomp  # noqa: E402
from autograder.ingest.notebook import HIDDEN_BEGIN, HIDDEN_END, load_spec  # noqa: E402
from autograder.check.threshold_suite import insert_after_setup, solved  # noqa: E402
from processes import left_over  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
needs_bwrap = pytest.mark.skipif(not sandbox.probe(Path("/tmp"))[0], reason="bubblewrap does not work here")
HIERARCHY = cgroups.detect()
needs_cgroups = pytest.mark.skipif(not HIERARCHY.usable, reason=f"no usable cgroups: {HIERARCHY.reason}")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


# ---- the system-call filter -------------------------------------------------------------------------
def test_filter_program_is_well_formed():
    for arch in seccomp.ARCHES:
        prog = seccomp.program(arch)
        assert len(prog) % 8 == 0 and len(prog) // 8 < 4096
        # first: load the arch, kill on a foreign one
        code, jt, jf, k = __import__("struct").unpack("=HBBI", prog[8:16])
        assert (code, k) == (seccomp.JEQ_K, seccomp.ARCHES[arch]["audit"])
    with pytest.raises(RuntimeError, match="no seccomp filter"):
        seccomp.program("mips")


SURFACE = r"""
import ctypes, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def call(name, *args):
    r = libc.syscall(*args)
    out[name] = "EPERM" if r == -1 and ctypes.get_errno() == 1 else f"{r}/{ctypes.get_errno()}"
nr = NUMBERS
call("keyctl", nr["keyctl"], 0, 0, 0, 0)
call("bpf", nr["bpf"], 0, 0, 0)
call("perf_event_open", nr["perf_event_open"], 0, 0, -1, -1, 0)
call("setns", nr["setns"], 0, 0)
call("ptrace", nr["ptrace"], 0, 0, 0, 0)          # PTRACE_TRACEME
r = subprocess.run(["/usr/bin/unshare", "-U", "true"], capture_output=True, text=True)
out["unshare -U"] = r.returncode
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
out["fds"] = fds
import numpy, torch                                # honest work still runs
t = threading.Thread(target=lambda: out.setdefault("thread", float(torch.ones(3).sum())))
t.start(); t.join()
out["child"] = subprocess.run(["/usr/bin/true"]).returncode
print(json.dumps(out))
"""


@needs_bwrap
def test_sandbox_denies_namespaces_ptrace_and_kernel_surface(tmp_path):
    import platform
    numbers = seccomp.ARCHES[platform.machine()]["deny"]
    box = sandbox.Box(tmp_path / "scratch", "/tmp/work")
    sandbox.prepare_scratch(box)
    log = open(tmp_path / "caller.log", "w")    # a descriptor of the caller's that must not leak inside
    code = SURFACE.replace("NUMBERS", repr(numbers))
    r = subprocess.run(sandbox.command([sys.executable, "-c", code], box), capture_output=True, text=True,
                       timeout=120)
    log.close()
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("keyctl", "bpf", "perf_event_open", "setns", "ptrace"):
        assert out[name] == "EPERM", (name, out)
    assert out["unshare -U"] != 0, out
    assert out["thread"] == 3.0 and out["child"] == 0, out
    assert not [v for v in out["fds"].values() if "caller.log" in v or "filter" in v], out["fds"]
    assert set(out["fds"]) <= {"0", "1", "2", "3"}, out["fds"]   # 3: listdir's own


@needs_bwrap
def test_without_the_filter_the_same_probe_gets_through(tmp_path):
    """The probe can fail: bwrap without ``--seccomp`` lets ``unshare -U`` and keyctl through."""
    box = sandbox.Box(tmp_path / "scratch", "/tmp/work")
    sandbox.prepare_scratch(box)
    cmd = sandbox.command([sys.executable, "-c", "import subprocess, sys; "
                           "sys.exit(subprocess.run(['/usr/bin/unshare', '-U', 'true']).returncode)"], box)
    i = cmd.index("--seccomp")
    bare = cmd[4:i] + cmd[i + 2:]          # drop the sh that opens the filter and --seccomp FD
    assert subprocess.run(bare, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode != 0


# ---- cgroups ------------------------------------------------------------------------------------------
def test_no_cgroup_hierarchy_is_reported_with_the_reason(tmp_path):
    h = cgroups.detect(tmp_path)          # an empty folder: neither v2 nor v1
    assert h.kind == "none" and not h.usable and h.reason


@needs_cgroups
def test_submission_group_applies_limits_and_kills_everything(tmp_path):
    policy = cgroups.Policy(cpu_weight=100, cpu_quota=1.0, memory_bytes=3 * 1024**3,
                            leaf_memory_bytes=1024**3, pids=300)
    run = HIERARCHY.run_group(f"test-{os.getpid()}", policy)
    try:
        g = run.submission("ann")
        if g.kind == "v1":
            assert (g.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "100000"
            assert (g.dirs["cpu"] / "cpu.shares").read_text().strip() == "1024"
            assert int((g.dirs["memory"] / "memory.limit_in_bytes").read_text()) == 3 * 1024**3
            assert (g.dirs["pids"] / "pids.max").read_text().strip() == "300"
        else:
            assert (g.dirs[""] / "cpu.max").read_text().split() == ["100000", "100000"]
            assert int((g.dirs[""] / "memory.max").read_text()) == 3 * 1024**3
        script = ("for i in 1 2 3 4 5; do setsid sh -c 'while :; do :; done' ATTACK-CG & done; sleep 300")
        p = subprocess.Popen(cgroups.enter(["/bin/sh", "-c", script], g.procs_files("kernel")))
        deadline = time.monotonic() + 10
        while len(g.pids()) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        inside = g.pids()
        assert p.pid in inside and len(inside) >= 7, inside
        g.remove()
        p.wait(10)
        assert not [q for q in inside if psutil.pid_exists(q) and psutil.Process(q).status() != "zombie"]
        assert not any(d.exists() for d in g.dirs.values())
    finally:
        run.remove()
    assert not any(d.exists() for d in run.dirs.values())


def _honest_cpu_share(with_groups: bool, seconds: float = 3.0) -> float:
    """CPU seconds per second one busy loop gets while 60 ``setsid`` busy loops run, each side in its
    own submission group (``with_groups``) or, as without cgroups, each loop its own session."""
    tag = f"{os.getpid()}-{int(with_groups)}"
    run = HIERARCHY.run_group(f"fair-{tag}", cgroups.Policy(cpu_quota=1.0)) if with_groups else None
    attacker, honest = (run.submission("attacker"), run.submission("honest")) if run else (None, None)
    hog = subprocess.Popen(cgroups.enter(["/bin/sh", "-c", "for i in $(seq 60); do setsid sh -c 'while :; do :; done' "
                                          f"ATTACK-CPU-{tag} & done; wait"], attacker.procs_files("kernel") if run else []))
    try:
        time.sleep(1.0)
        loop = subprocess.Popen(cgroups.enter(["/usr/bin/setsid", "/bin/sh", "-c", "while :; do :; done"],
                                              honest.procs_files("kernel") if run else []))
        time.sleep(0.2)
        p = psutil.Process(loop.pid)
        c0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
        time.sleep(seconds)
        share = (sum(p.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
        loop.kill()
        loop.wait()
        return share
    finally:
        if run:
            run.remove()
        else:
            for q in psutil.process_iter(["cmdline"]):
                if f"ATTACK-CPU-{tag}" in " ".join(q.info["cmdline"] or []):
                    q.kill()
        hog.kill()
        hog.wait()


@needs_cgroups
def test_sixty_busy_loops_cannot_starve_another_submissions_group():
    """The mechanism, measured: without groups one loop gets ~1/61 of the CPUs; with them its group's share.
    (Measured on 2 busy shared cores: 0.03 vs 0.10 CPU; on a quiet machine the second is ~1 CPU.)"""
    without, with_ = _honest_cpu_share(False), _honest_cpu_share(True)
    assert with_ >= 2 * without, (with_, without)


def _v2_tree() -> Path | None:
    """A writable cgroup v2 folder: the unified tree (pure v2) or its controller-less hybrid mount."""
    for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (mount / "cgroup.controllers").exists() and os.geteuid() == 0:
            base = mount / cgroups._own_path(None).lstrip("/")
            return base if os.access(base, os.W_OK) else None
    return None


@pytest.mark.skipif(_v2_tree() is None, reason="no writable cgroup v2 tree")
def test_v2_cgroup_kill_takes_the_whole_subtree():
    """The v2 clean-up path (``cgroup.kill``), on whatever v2 tree this machine has."""
    d = _v2_tree() / f"autograder-test-{os.getpid()}"
    (d / "kernel").mkdir(parents=True)
    p = subprocess.Popen(cgroups.enter(["/bin/sh", "-c", "setsid sh -c 'while :; do :; done' ATTACK-CG & sleep 300"],
                                       [str(d / "kernel" / "cgroup.procs")]))
    deadline = time.monotonic() + 10
    while len(cgroups._procs(d / "kernel")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    inside = cgroups._procs(d / "kernel")
    assert p.pid in inside and len(inside) >= 3, inside
    cgroups._kill_and_remove(d, "v2")
    p.wait(10)
    assert not d.exists()
    assert not [q for q in inside if psutil.pid_exists(q) and psutil.Process(q).status() != "zombie"]


@needs_cgroups
def test_a_failed_cgroup_entry_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    r = subprocess.run(cgroups.enter(["/usr/bin/touch", str(marker)], [str(tmp_path / "no" / "cgroup.procs")]),
                       capture_output=True)
    assert r.returncode == 125 and not marker.exists()


# ---- the feedback page's cleaner -----------------------------------------------------------------------
def test_sweep_removes_only_empty_old_groups_of_dead_graders(tmp_path):
    dead = 4_000_000                                   # above any pid_max: no such process
    def group(name, age_s, procs=""):
        d = tmp_path / "cpu" / name
        (d / "s-x" / "kernel").mkdir(parents=True)
        if procs:                                      # cgroupfs files vanish with their folder; plain ones do not
            (d / "s-x" / "kernel" / "cgroup.procs").write_text(procs)
        for p in (d / "s-x" / "kernel", d / "s-x", d):
            os.utime(p, (time.time() - age_s,) * 2)
        return d
    stale = group(f"autograder-20260101-000000-{dead}-abcdef", 3600)
    stale_dask = group(f"autograder-dask-20260101-000000-{dead}-abcdef", 3600)
    alive = group(f"autograder-20260101-000000-{os.getpid()}-abcdef", 3600)
    young = group(f"autograder-20260101-000000-{dead}-fedcba", 5)
    busy = group(f"autograder-20260101-000000-{dead}-123456", 3600, procs=f"{os.getpid()}\n")
    other = group("autograder-notours", 3600)
    h = cgroups.Hierarchy("v1", {"cpu": tmp_path / "cpu"})
    assert sorted(h.sweep_stale()) == sorted([stale, stale_dask])
    assert not stale.exists() and not stale_dask.exists()
    assert alive.exists() and young.exists() and busy.exists() and other.exists()


def test_the_cleaner_strips_script_and_handlers_and_keeps_lesson_markup():
    from autograder.nbgrader_worker import SanitizeOutputs, sanitizer
    dirty = ("<h2 id='n'>notes</h2><script>document.title = 1</script><img src='x' onerror='alert(1)' alt='a'>"
             "<a href='javascript:alert(1)'>j</a><a href='https://example.org'>ok</a><svg onload='alert(1)'></svg>"
             "<details><summary>s</summary><p>t</p></details><table><thead><tr><th scope='col'>h</th></tr></thead>"
             "</table><div style='color:red' onclick='x'>d</div><iframe src='x'></iframe>")
    clean = sanitizer().sanitize_html_tags(dirty)
    assert not re.search(r"<(script|svg|iframe)|\son[a-z]+=|javascript:|style=", clean), clean
    for kept in ('<h2 id="n">notes</h2>', 'alt="a"', 'href="https://example.org"', "<details><summary>s</summary>",
                 '<th scope="col">h</th>'):
        assert kept in clean, (kept, clean)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/html": dirty, "text/plain": "p",
                                                                 "application/javascript": "alert(1)"})]
    nb.cells = [cell]
    nb, _ = SanitizeOutputs()(nb, {})
    assert nb.cells[0].outputs[0].data == {"text/html": clean, "text/plain": "p"}


# ---- the batch ----------------------------------------------------------------------------------------
CPU_HOG = """import os
for _ in range(60):
    if os.fork() == 0:
        os.setsid()
        os.execv('/bin/sh', ['/bin/sh', '-c', 'while :; do :; done', 'ATTACK-CPU'])
"""
# then the attacker's kernel (and its re-check) idle, responsive, while the loops burn: 12 cells of 10 s,
# each under the 15 s cell limit, so the attack lasts about as long as its grading may
HOG_WAIT = "import time\ntime.sleep(10)"


def cpu_hog(nb):
    for k in range(12):
        nb = insert_after_setup(nb, SPEC, HOG_WAIT, f"attack-cpu-wait-{k}")
    return insert_after_setup(nb, SPEC, CPU_HOG, "attack-cpu")
FLOOD_UPDATES = """from IPython.display import display
payload = 'x' * 1_000_000
for i in range(300):
    h = display({'text/plain': 'start'}, raw=True, display_id=True)
    h.update({'text/plain': payload + str(i)}, raw=True)
"""
FLOOD_SHARED_ID = """from IPython.display import display, update_display
for i in range(300):
    display({'text/plain': '.'}, raw=True, display_id='flood')
for i in range(50):
    update_display({'text/plain': 'y' * 1_000_000 + str(i)}, raw=True, display_id='flood')
"""
XSS_MD = ("## notes\n\n<script>document.title = 'XSS-md-script'; window.__xss = 'md-script';</script>\n\n"
          "<img src=\"x\" onerror=\"document.title = 'XSS-md-img'; window.__xss = 'md-img'\">\n")
XSS_CODE = """from IPython.display import HTML, display
display(HTML("<script>document.title = 'XSS-html-script'; window.__xss = 'html-script';</script>"
             "<img src='x' onerror=\\"document.title = 'XSS-html-img'; window.__xss = 'html-img'\\">"))
"""
LEAK = "print(In)\nprint(_ih)\nprint(Out)\n"
FDS = """import json, os
fds = {}
for fd in os.listdir('/proc/self/fd'):
    try:
        fds[fd] = os.readlink(f'/proc/self/fd/{fd}')
    except OSError:
        pass
print('FDS ' + json.dumps(fds))
"""


def hidden_lines() -> set[str]:
    """Lines of the hidden test blocks that appear nowhere else in the source notebook."""
    hidden, shown = set(), set()
    for cell in SPEC.source.cells:
        src = cell.source
        while HIDDEN_BEGIN in src:
            before, rest = src.split(HIDDEN_BEGIN, 1)
            block, _, src = rest.partition(HIDDEN_END)
            shown.update(l.strip() for l in before.splitlines())
            hidden.update(l.strip() for l in block.splitlines() if len(l.strip()) >= 12)
        shown.update(l.strip() for l in src.splitlines())
    return hidden - shown


def _write(subs: Path, name: str, nb) -> None:
    d = subs / name / SPEC.lesson_id
    d.mkdir(parents=True)
    nbformat.write(nb, str(d / SPEC.notebook_name))


def run_groups() -> set[Path]:
    return {p for p in Path("/sys/fs/cgroup").glob("**/autograder-*") if p.is_dir()} if HIERARCHY.usable else set()


def attacker_processes() -> list[str]:
    # sandboxes of this checkout (other checkouts on the machine may be grading too) and the hog's loops
    return left_over(lambda uid, cmd: (sandbox.UID_RANGE[0] <= uid < sandbox.UID_RANGE[1] and str(ROOT) in cmd)
                     or "ATTACK-CPU" in cmd)


def grade_batch(subs: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, int]:
    """Grade with the CLI; return the result and the main process's peak resident memory (sampled)."""
    cmd = [sys.executable, "-m", "autograder", "grade", str(subs), "--lesson", SPEC.lesson_id, "--out", str(out),
           "--quiet", "--jobs", "2", "--cell-timeout", "15", "--timeout", "150", "--probe-seed", "7",
           "--memory-gb", "2", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MPLBACKEND": "Agg"})
    peak = [0]

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, stderr = proc.communicate(timeout=1500)
    t.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), peak[0]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    if not sandbox.probe(Path("/tmp"))[0]:
        pytest.skip("bubblewrap does not work here")
    base = tmp_path_factory.mktemp("hostile")
    subs, out = base / "subs", base / "out"
    groups_before = run_groups()
    honest = solved(SPEC)
    _write(subs, "a_cpu_hog", cpu_hog(honest))
    _write(subs, "b_honest", honest)
    _write(subs, "c_flood_updates", insert_after_setup(honest, SPEC, FLOOD_UPDATES, "attack-flood"))
    _write(subs, "d_flood_shared_id", insert_after_setup(honest, SPEC, FLOOD_SHARED_ID, "attack-flood-id"))
    xss = insert_after_setup(honest, SPEC, XSS_CODE, "attack-xss-code")
    md = nbformat.v4.new_markdown_cell(XSS_MD)
    md.id = "attack-xss-md"
    xss.cells.insert(3, md)
    leak = nbformat.v4.new_code_cell(LEAK)
    leak.id = "attack-leak"
    xss.cells.append(leak)
    fds = nbformat.v4.new_code_cell(FDS)
    fds.id = "probe-fds"
    xss.cells.append(fds)
    _write(subs, "e_xss_and_leak", xss)
    r, peak = grade_batch(subs, out)
    assert (out / "results.json").exists(), r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    time.sleep(0.5)
    return dict(base=base, out=out, r=r, peak=peak, by={s["student"]: s for s in res["students"]}, res=res,
                left=attacker_processes(), groups_left=sorted(run_groups() - groups_before))


def test_the_run_says_what_isolation_was_applied(batch):
    err = batch["r"].stderr
    line = " ".join(l for l in err.splitlines() if l.startswith("isolation:"))
    assert "grader main process: address space (soft RLIMIT_AS) 3.25 GiB" in line, err[-2000:]
    if HIERARCHY.usable:
        assert f"cgroup {HIERARCHY.kind} per submission" in line and "at most 1 CPU" in line, err[-2000:]
    else:
        assert "no per-submission cgroup" in line
        assert any("no per-submission cgroup" in w for w in batch["res"]["warnings"])


@needs_cgroups
def test_cpu_starvation_leaves_the_honest_grade_exact(batch):
    honest = batch["by"]["b_honest"]
    assert honest["status"] == "graded", honest
    assert honest["score"] == SPEC.total_points and honest["pass"] is True, honest
    assert all(i["recheck"] in ("pass", "no-probe") for i in honest["items"]), honest["items"]


def test_nothing_of_the_attacker_survives(batch):
    assert not batch["left"], batch["left"]
    assert not batch["groups_left"], batch["groups_left"]   # this batch's groups (other graders may hold theirs)


@pytest.mark.parametrize("name", ["c_flood_updates", "d_flood_shared_id"])
def test_display_updates_count_toward_the_output_cap(batch, name):
    s = batch["by"][name]
    assert s["status"] == "errored" and "output too large" in s["reason"], s
    assert not (batch["out"] / "autograded" / name).exists()


def test_the_grader_main_process_stays_small(batch):
    assert 0 < batch["peak"] < 1.5 * 1024**3, f"grader main process peaked at {batch['peak'] / 1e6:.0f} MB"


def _feedback(batch, name: str) -> Path:
    page = batch["out"] / "feedback" / name / SPEC.lesson_id / (Path(SPEC.notebook_name).stem + ".html")
    assert page.exists(), batch["by"][name]
    return page


def test_feedback_has_no_hidden_test_source_even_when_the_notebook_prints_In(batch):
    lines = hidden_lines()
    assert lines
    graded = (batch["out"] / "autograded" / "e_xss_and_leak" / SPEC.lesson_id / SPEC.notebook_name).read_text()
    assert any(json.dumps(l)[1:-1] in graded for l in lines), "the leak cell did not print the hidden tests"
    text = htmlmod.unescape(re.sub(r"<[^>]+>", "", _feedback(batch, "e_xss_and_leak").read_text()))
    shown = [l for l in lines if l in text]
    assert not shown, shown[:5]
    assert "output withheld: it quotes hidden test code" in text


def test_feedback_html_is_sanitized_and_has_a_csp(batch):
    page = _feedback(batch, "e_xss_and_leak").read_text()
    assert "Content-Security-Policy" in page and "script-src 'none'" in page
    scripts = re.findall(r"<script[^>]*>.*?</script>", page, re.S)
    assert not [s for s in scripts if "XSS-" in s], scripts
    assert not re.search(r"<[a-z]+[^>]*\son[a-z]+\s*=", page, re.I), re.findall(r"<[a-z]+[^>]*\son[a-z]+\s*=[^>]*>", page)[:3]
    assert re.search(r"<h2[^>]*>notes", page)   # the markdown itself is still rendered
    honest = _feedback(batch, "b_honest").read_text()
    assert "<details" in honest and "<summary" in honest    # the lesson's own markup survives the cleaning


@pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium for axe-core")
def test_sanitized_feedback_pages_pass_axe_core(batch):
    from autograder.a11y import check_a11y as a11y
    from test_autograder_a11y import ensure_axe
    ensure_axe()
    pages = [a11y.Page(f"feedback/{n}", _feedback(batch, n)) for n in ("b_honest", "e_xss_and_leak")]
    report = a11y.check(pages, a11y.find_chromium(), [])
    bad = [f"{f.page}: {f.rule} ({f.impact}) at {f.target}: {f.summary[:160]}" for f in report.findings]
    assert not bad, "\n".join(bad[:20])


def test_the_kernel_holds_no_descriptor_of_the_worker(batch):
    nb = nbformat.read(str(batch["out"] / "autograded" / "e_xss_and_leak" / SPEC.lesson_id / SPEC.notebook_name), 4)
    cell = next(c for c in nb.cells if c.get("id") == "probe-fds")
    text = "".join(o.get("text", "") for o in cell.outputs)
    fds = json.loads(text.split("FDS ", 1)[1])
    assert fds["0"] == "/dev/null", fds
    assert not [v for v in fds.values() if "worker-" in v or ".log" in v or "filter-" in v], fds


def test_autograded_notebook_is_not_trusted(batch):
    from nbformat.sign import NotebookNotary
    nb = nbformat.read(str(batch["out"] / "autograded" / "e_xss_and_leak" / SPEC.lesson_id / SPEC.notebook_name), 4)
    assert not NotebookNotary().check_signature(nb)


def _chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--allow-file-access-from-files",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_no_script_runs_in_the_feedback_page_in_chromium(batch, tmp_path):
    page = _feedback(batch, "e_xss_and_leak")
    control = tmp_path / "control.html"     # the same payloads unsanitized: the check must be able to fail
    control.write_text(f"<html><head><title>control</title></head><body>{XSS_MD}"
                       "<script>document.title = 'XSS-html-script'; window.__xss = 'html-script';</script></body></html>")
    driver = _chrome(tmp_path / "profile")
    try:
        driver.get(control.as_uri())
        time.sleep(1)
        assert driver.title.startswith("XSS-") and driver.execute_script("return window.__xss || null")
        driver.get(page.as_uri())
        time.sleep(2)
        assert not driver.title.startswith("XSS-"), driver.title
        assert driver.execute_script("return window.__xss || null") is None
    finally:
        driver.quit()
