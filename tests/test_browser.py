"""The student's seat: the student notebook run top to bottom in JupyterLab in a real (headless)
Chromium, and what the student then sees.

One module-scoped fixture starts JupyterLab on 127.0.0.1 (random port and token) on a temporary
copy of the lesson folder, opens the notebook in headless Chromium driven by Selenium through
Debian's ``chromedriver``, clicks **Run > Run All Cells** in the menu bar (what a student does) and
waits until every code cell has an execution count and the kernel is idle. The tests below then
read the rendered page. Screenshots go to ``out/browser/`` (git-ignored).

Skipped only when Chromium or chromedriver is missing, and never in CI (``CI=true``): there a
missing browser is a failure, since ``.ci/run`` installs both.

``RESIDUAL_BANDWIDTH_BROWSER_NOTEBOOK`` picks the notebook (default ``lessons``: the student
version; ``solutions`` runs the instructor version, e.g. while developing this test).

What is deliberately not the default JupyterLab setup (and why):
* notebook windowing mode ``none``: by default JupyterLab 4 lays out only the cells near the
  viewport, so sizes of far-away images could not be measured; every cell is rendered here;
* the "get notified about Jupyter news?" toast is switched off (it covers part of the screenshots);
* ``HF_HUB_OFFLINE=1``: ``MODEL = "auto"`` then always picks the embedded model (what an offline
  student gets); ``RESIDUAL_BANDWIDTH_STATIC`` is removed so the explorer is live.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
WHICH = os.environ.get("RESIDUAL_BANDWIDTH_BROWSER_NOTEBOOK", "lessons")
RUN_TIMEOUT = 900  # seconds for Run All: a generous CI margin (57 s on 2 cores before the lesson-science
#                    experiments of 2026-12-07; the source notebook then took 11.5 min under papermill at load 3-5)

if not (CHROMIUM and CHROMEDRIVER):
    _why = ("the real-browser test needs Debian's chromium and chromium-driver "
            f"(found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}); `apt-get install chromium "
            "chromium-driver`, as .ci/run does")
    if IN_CI:
        raise RuntimeError(f"CI=true but {_why}")
    pytest.skip(_why, allow_module_level=True)

from selenium import webdriver  # noqa: E402  (after the skip: only needed with a browser)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000"]
LAB_SETTINGS = {  # user settings for this server only (see the module docstring)
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
}


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 directly


def _lesson_dirs() -> list[Path]:
    return sorted(p.parent for p in (REPO / WHICH).glob("*/lesson.ipynb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exercise_titles(nb_path: Path) -> list[str]:
    """Titles of the markdown cells whose heading starts with "Exercise" (as authored)."""
    titles = []
    for cell in json.loads(nb_path.read_text())["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        first = next((ln.strip() for ln in "".join(cell["source"]).splitlines() if ln.strip()), "")
        title = first.lstrip("#").strip()
        if title.startswith("Exercise"):
            titles.append(title)
    return titles


class Lab:
    """A JupyterLab server on a temporary copy of one lesson folder."""

    def __init__(self, lesson_dir: Path, tmp: Path):
        self.tmp = tmp
        self.root = tmp / "root"
        self.rel = f"{WHICH}/{lesson_dir.name}/lesson.ipynb"
        shutil.copytree(lesson_dir, self.root / WHICH / lesson_dir.name)
        settings = tmp / "settings"
        for rel, value in LAB_SETTINGS.items():
            (settings / rel).parent.mkdir(parents=True, exist_ok=True)
            (settings / rel).write_text(json.dumps(value))
        self.port, self.token = _free_port(), secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if k != "RESIDUAL_BANDWIDTH_STATIC"}
        env.update(MPLBACKEND="Agg", HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(tmp / "config"),
                   JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
                   # the kernel imports this checkout's library (as the editable install does)
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "lib"), env.get("PYTHONPATH")])))
        self.log_path = tmp / "lab.log"
        self._log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1",
             "--port", str(self.port), f"--IdentityProvider.token={self.token}", "--allow-root",
             f"--ServerApp.root_dir={self.root}", f"--LabApp.user_settings_dir={settings}",
             f"--LabApp.workspaces_dir={tmp / 'workspaces'}"],
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with _NO_PROXY.open(f"{self.base}/api/status?token={self.token}", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer within {timeout} s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def url(self) -> str:
        return f"{self.base}/lab/tree/{self.rel}?token={self.token}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_file.close()


def _chrome(profile: Path) -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


# ---- page helpers (JavaScript run in the page) ---------------------------------------------------
JS_STATE = """
const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
if (!nb) return null;
const ind = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
const code = Array.from(nb.querySelectorAll('.jp-Cell.jp-CodeCell'));
return {status: ind ? ind.getAttribute('data-status') : null,
        prompts: code.map(c => (c.querySelector('.jp-InputArea-prompt') || {}).textContent || ''),
        errors: code.map(c => {
          const e = c.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
          return e ? e.textContent.trim().split('\\n').slice(-1)[0].slice(0, 300) : null; })};
"""


def _menu(driver, menu: str, item: str) -> bool:
    """Click ``menu`` in the menu bar, then ``item`` in the menu that opens (by visible text).
    Returns False (menu closed again) when the item is disabled, e.g. no notebook is active yet."""
    bar = [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
           if e.text.strip() == menu]
    assert bar, f"no {menu!r} menu in the menu bar"
    bar[0].click()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        items = [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item")
                 if e.text.strip().startswith(item)
                 and e.find_element(By.CSS_SELECTOR, ".lm-Menu-itemLabel").text.strip() == item]
        if items:
            if "lm-mod-disabled" in (items[0].get_attribute("class") or ""):
                driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
                return False
            items[0].click()
            return True
        time.sleep(0.2)
    raise AssertionError(f"no {item!r} item in the {menu!r} menu")


def _wait(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _scroll_to(driver, element, block: str = "start") -> None:
    driver.execute_script(f"arguments[0].scrollIntoView({{block: '{block}'}});", element)
    time.sleep(0.4)


class Session:
    """What the tests read: the driver after Run All, the Lab server, and timings."""

    def __init__(self, driver, lab: Lab, nb_path: Path, timings: dict, state: dict):
        self.driver, self.lab, self.nb_path = driver, lab, nb_path
        self.timings, self.state = timings, state

    def shot(self, name: str) -> Path:
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture(scope="module")
def lab_session():
    lessons = _lesson_dirs()
    assert lessons, f"no {WHICH}/*/lesson.ipynb in {REPO}"
    timings = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rb-browser-") as tmp:
        tmp = Path(tmp)
        lab = Lab(lessons[0], tmp)
        driver = None
        try:
            timings["lab_start_s"] = time.monotonic() - t0
            driver = _chrome(tmp / "chrome-profile")
            driver.get(lab.url())
            _wait(lambda: driver.execute_script(JS_STATE), 60, "the notebook to open")
            _wait(lambda: _kernel_ready(driver), 90, "the kernel to start")
            timings["open_s"] = time.monotonic() - t0
            # the set-up cells open collapsed (jupyter.source_hidden); a collapsed cell shows no prompt, so
            # show every cell's code first, as a student may (View > Expand All Code), to read the counts
            driver.find_element(By.CSS_SELECTOR, '.lm-TabBar-tab[data-type="document-title"]').click()
            timings["expanded"] = _menu(driver, "View", "Expand All Code")
            t_run = time.monotonic()
            for attempt in range(1, 4):  # a first click was sometimes ignored under heavy load
                # make the notebook the active document: click its tab in the main area
                driver.find_element(By.CSS_SELECTOR, '.lm-TabBar-tab[data-type="document-title"]').click()
                enabled = _menu(driver, "Run", "Run All Cells")
                timings.setdefault("run_all_attempts", []).append("clicked" if enabled else "disabled")
                if enabled and _execution_started(driver, 20):
                    break
            state, problem = _wait_run_all(driver)
            timings["run_all_s"] = time.monotonic() - t_run
            time.sleep(1.0)  # let the last outputs (widgets, images) lay out
            session = Session(driver, lab, lab.root / lab.rel, timings, state)
            session.run_all_problem = problem  # reported by test_every_code_cell_executed
            yield session
        except BaseException:
            if driver is not None:
                OUT.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(OUT / "failure.png"))
            raise
        finally:
            timings["total_s"] = time.monotonic() - t0
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "timings.json").write_text(json.dumps(timings, indent=1))
            if driver is not None:
                driver.quit()
            lab.stop()


def _dialog(driver):
    found = driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog")
    return found[0] if found else None


def _kernel_ready(driver) -> bool:
    """The notebook's kernel is started and idle. JupyterLab sometimes asks which kernel to start
    (the "Select Kernel" dialog, when the kernel list arrives after the notebook opened); a student
    then clicks Select, the preselected kernel of the notebook's metadata, and so do we."""
    dialog = _dialog(driver)
    if dialog is not None:
        if "Select Kernel" in dialog.text:
            dialog.find_element(By.CSS_SELECTOR, ".jp-Dialog-button.jp-mod-accept").click()
            time.sleep(0.5)
            return False
        raise AssertionError(f"unexpected dialog: {dialog.text!r}")
    state = driver.execute_script(JS_STATE) or {}
    name = driver.execute_script(
        "const k = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-KernelName');"
        "return k ? k.textContent : null;")
    return state.get("status") == "idle" and bool(name) and "No Kernel" not in name


def _execution_started(driver, timeout: float) -> bool:
    """Some code cell is running or has run (``[*]:`` or ``[n]:``) within ``timeout`` seconds."""
    try:
        _wait(lambda: any(re.fullmatch(r"\[(\*|\d+)\]:", p.strip())
                          for p in (driver.execute_script(JS_STATE) or {}).get("prompts", [])),
              timeout, "execution to start")
        return True
    except AssertionError:
        return False


def _wait_run_all(driver) -> tuple[dict, str | None]:
    """Wait until every code cell has an execution count and the kernel is idle (twice in a row).
    Returns the page state and ``None``, or, when Run All stopped (kernel idle, nothing running,
    cells left unexecuted: Run All stops at the first cell that raises) or timed out, a message
    naming the cell. The other tests still read the page (rendering does not need Run All)."""
    end = time.monotonic() + RUN_TIMEOUT
    done_once = idle_stuck = 0
    state = {}
    while time.monotonic() < end:
        state = driver.execute_script(JS_STATE) or {}
        prompts = [p.strip() for p in state.get("prompts", [])]
        executed = [bool(re.fullmatch(r"\[\d+\]:", p)) for p in prompts]
        idle = state.get("status") == "idle"
        if prompts and all(executed) and idle:
            done_once += 1
            if done_once >= 2:
                return state, None
        else:
            done_once = 0
        if idle and prompts and not all(executed) and "[*]:" not in prompts:
            idle_stuck += 1
            if idle_stuck >= 10:
                dialog = _dialog(driver)
                if dialog is not None:
                    return state, f"a dialog blocks Run All: {dialog.text!r}"
                first = executed.index(False)
                errors = {i + 1: e for i, e in enumerate(state.get("errors", [])) if e}
                return state, (f"Run All stopped: code cell {first + 1} of {len(prompts)} never ran "
                               f"(prompt {prompts[first]!r}); code cells with an error output "
                               f"(number: last line): {errors}")
        else:
            idle_stuck = 0
        time.sleep(1.0)
    return state, f"Run All did not finish in {RUN_TIMEOUT} s: prompts {state.get('prompts')}"


# ---- the tests -----------------------------------------------------------------------------------
def test_every_code_cell_executed(lab_session):
    s = lab_session
    _scroll_to(s.driver, s.driver.find_element(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"))
    s.shot("01-notebook-top")
    assert s.run_all_problem is None, s.run_all_problem
    prompts = [p.strip() for p in s.state["prompts"]]
    n_code = sum(c["cell_type"] == "code" for c in json.loads(s.nb_path.read_text())["cells"])
    assert len(prompts) == n_code
    assert all(re.fullmatch(r"\[\d+\]:", p) for p in prompts), prompts
    counts = [int(p[1:-2]) for p in prompts]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # run in order, once each


JS_HEADINGS = """
return Array.from(document.querySelectorAll('.jp-Notebook .jp-MarkdownOutput')).flatMap(md =>
  Array.from(md.querySelectorAll('h1,h2,h3,h4,h5,h6')).map(h => [h.tagName.toLowerCase(),
    h.textContent.replace(/\\u00b6/g, '').replace(/\\s+/g, ' ').trim()]));
"""


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("**", "").replace("`", "")).strip()


def test_exercise_titles_are_headings_and_in_the_table_of_contents(lab_session):
    s = lab_session
    titles = _exercise_titles(s.nb_path)
    assert len(titles) >= 6, titles  # three checkpoints and three summative questions
    # a screenshot of the first exercise's header, however it rendered (before asserting)
    cell = s.driver.execute_script("""
        return Array.from(document.querySelectorAll('.jp-Notebook .jp-MarkdownCell')).find(c =>
          c.textContent.replace(/\\s+/g, ' ').includes(arguments[0])) || null;""", _norm(titles[0]))
    assert cell is not None, f"no markdown cell shows {titles[0]!r}"
    _scroll_to(s.driver, cell)
    s.shot("02-exercise-header")
    headings = s.driver.execute_script(JS_HEADINGS)
    rendered = {text: tag for tag, text in headings}
    missing = [t for t in titles if rendered.get(_norm(t)) not in ("h2", "h3")]
    assert not missing, f"exercise titles not rendered as h2/h3 headings: {missing}"
    # JupyterLab's table of contents (left sidebar) lists them
    tab = s.driver.find_elements(By.CSS_SELECTOR, '.lm-TabBar-tab[data-id="table-of-contents"]')
    assert tab, "no Table of Contents tab in the left sidebar"
    tab[0].click()
    toc = _wait(lambda: [_norm(e.text) for e in s.driver.find_elements(
        By.CSS_SELECTOR, ".jp-TableOfContents-content .jp-tocItem-content")], 10, "the table of contents")
    not_listed = [t for t in titles if _norm(t) not in toc]
    tab[0].click()  # close the panel again
    assert not not_listed, f"exercises missing from the table of contents: {not_listed}"


def test_hints_are_collapsed(lab_session):
    details = lab_session.driver.execute_script("""
        return Array.from(document.querySelectorAll('.jp-Notebook details')).map(d =>
          [d.hasAttribute('open'), (d.querySelector('summary') || {}).textContent || '']);""")
    hints = [(is_open, summary) for is_open, summary in details if "hint" in summary.lower()]
    assert hints, "no <details> hint rendered in any markdown cell"
    assert not [summary for is_open, summary in details if is_open], details
    # every <summary> belongs to a <details> (a stray one means the HTML was not rendered as HTML)
    stray = lab_session.driver.execute_script(
        "return document.querySelectorAll('.jp-Notebook summary:not(details > summary)').length")
    assert stray == 0


JS_IMAGES = """
return Array.from(document.querySelectorAll('.jp-Notebook img')).map(img => {
  const box = img.closest('.widget-html, .jp-OutputArea-output, .jp-RenderedMarkdown, .jp-RenderedHTMLCommon');
  const cell = img.closest('.jp-Cell');
  const r = img.getBoundingClientRect(), b = box.getBoundingClientRect(), c = cell.getBoundingClientRect();
  return {alt: img.getAttribute('alt'), src: (img.getAttribute('src') || '').slice(0, 40),
          width: r.width, right: r.right, box: box.className, box_width: b.width, box_right: b.right,
          cell_right: c.right, output: !!img.closest('.jp-OutputArea'), natural: img.naturalWidth};
});
"""


def test_images_fit_and_have_alt_text(lab_session):
    images = lab_session.driver.execute_script(JS_IMAGES)
    figures = [im for im in images if im["output"]]
    assert len(figures) >= 5, f"expected the lesson's figures in the outputs, found {len(figures)}"
    too_wide = [im for im in images
                if im["width"] > im["box_width"] + 1 or im["right"] > min(im["box_right"], im["cell_right"]) + 1]
    assert not too_wide, f"images wider than their container: {too_wide}"
    no_alt = [im for im in images if not (im["alt"] or "").strip()]
    assert not no_alt, f"images without alt text: {no_alt}"
    assert all(im["natural"] > 0 for im in figures), "a figure image did not load"


JS_EXPLORER = """
const ex = document.querySelector('.jp-Notebook .rb-explorer');
if (!ex) return null;
const status = ex.querySelector('.rb-explorer-status');
const img = ex.querySelector('.rb-explorer-view img');
const cap = ex.querySelector('.rb-explorer-view figcaption');
const area = ex.closest('.jp-OutputArea-output');
return {status: status ? status.textContent.trim() : null, alt: img ? img.getAttribute('alt') : null,
        caption: cap ? cap.textContent.trim() : null,
        sliders: ex.querySelectorAll('.widget-slider, .widget-hslider').length,
        overflow: [ex.scrollWidth - ex.clientWidth, area.scrollWidth - area.clientWidth]};
"""


def _explorer_control(driver, label: str, css: str):
    """The focusable element of the explorer's control whose label is ``label``."""
    for box in driver.find_elements(By.CSS_SELECTOR, ".rb-explorer .widget-inline-hbox, .rb-explorer .widget-checkbox"):
        if label in box.text:
            found = box.find_elements(By.CSS_SELECTOR, css)
            if found:
                return found[0]
    raise AssertionError(f"no explorer control labelled {label!r} ({css})")


JS_LATENCY_PROBE = """
const st = document.querySelector('.jp-Notebook .rb-explorer .rb-explorer-status');
window.__rbLatency = {keys: [], changes: []};
document.addEventListener('keydown', () => window.__rbLatency.keys.push(performance.now()), true);
new MutationObserver(() => window.__rbLatency.changes.push([performance.now(), st.textContent]))
  .observe(st, {subtree: true, childList: true, characterData: true});
"""
EXPLORER_LATENCY_BOUND_S = 1.0   # generous for a loaded CI machine; the 200 ms target is in bench/explorer.py


def _explorer_latency(d, handle, start: int, n: int = 20) -> None:
    """Issue 23: from a key press on the layer slider to the explorer's status line naming the new
    layer (the image, alt text and caption are replaced just before it), timed inside the page
    (``performance.now()`` of the keydown and of the status line's mutation), ``n`` steps, each
    waited for. Written to out/browser/explorer_latency.json; the p95 must stay under the bound."""
    top = int(float(handle.get_attribute("aria-valuemax") or 29))
    half = n // 2
    steps = [1] * half + [-1] * half if start + half <= top else [-1] * half + [1] * half
    d.execute_script(JS_LATENCY_PROBE)
    layer, latencies = start, []
    for step in steps:
        layer += step
        handle.send_keys(Keys.ARROW_RIGHT if step > 0 else Keys.ARROW_LEFT)
        _wait(lambda: any(f"layer {layer}," in t for _, t in d.execute_script("return window.__rbLatency.changes")),
              60, f"the explorer to show layer {layer}", poll=0.02)
        probe = d.execute_script("return window.__rbLatency")
        pressed = probe["keys"][-1]
        shown = min(t for t, text in probe["changes"] if f"layer {layer}," in text and t >= pressed)
        latencies.append((shown - pressed) / 1000)
        d.execute_script("window.__rbLatency.changes = []")
        time.sleep(0.2)
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "explorer_latency.json").write_text(json.dumps(
        {"steps": len(latencies), "p95_s": p95, "median_s": ordered[len(ordered) // 2], "seconds": latencies},
        indent=1))
    assert p95 <= EXPLORER_LATENCY_BOUND_S, (
        f"the explorer took {p95:.2f} s (p95 of {len(latencies)} layer steps) from a key press to the new view: "
        f"{[round(x, 3) for x in latencies]}")


def test_explorer_is_live_and_follows_keyboard_input(lab_session):
    s = lab_session
    d = s.driver
    before = _wait(lambda: d.execute_script(JS_EXPLORER), 5 if s.run_all_problem else 30,
                   "the explorer's live widget")
    assert before["sliders"] >= 2, before  # layer and threshold sliders
    assert max(before["overflow"]) <= 1, f"the explorer scrolls sideways: {before['overflow']}"
    layer = int(re.search(r"layer (\d+),", before["status"]).group(1))
    _scroll_to(d, d.find_element(By.CSS_SELECTOR, ".rb-explorer"), "center")
    s.shot("03-explorer-before")
    # keyboard: focus the layer slider's handle and press the right arrow
    handle = _explorer_control(d, "Layer:", ".noUi-handle, .ui-slider-handle, input[type=range]")
    handle.click()
    handle.send_keys(Keys.ARROW_RIGHT)
    after = _wait(lambda: (lambda st: st if st and f"layer {layer + 1}," in st["status"] else None)(
        d.execute_script(JS_EXPLORER)), 60, f"the caption to say layer {layer + 1}")
    # the image is updated before the status line, so once that moved the image has too: its alt text
    # names the figure (layer included) and its caption, read once, describes it
    assert after["alt"] != before["alt"] and f"Layer {layer + 1}:" in after["alt"], after["alt"]
    assert f"layer {layer + 1}." in after["caption"], after["caption"]
    time.sleep(0.5)
    s.shot("04-explorer-after-slider")
    _explorer_latency(d, handle, layer + 1)
    # keyboard: the checkbox toggles with the space bar
    box = _explorer_control(d, "Exclude massive", "input[type=checkbox]")
    box.send_keys(Keys.SPACE)
    _wait(lambda: "massive positions kept" in (d.execute_script(JS_EXPLORER) or {}).get("status", ""),
          60, "the caption to say massive positions are kept")
    # keyboard: type a new prompt and press Enter
    text = _explorer_control(d, "Prompt", "input[type=text]")
    text.send_keys(Keys.CONTROL, "a")
    text.send_keys("Paris is the capital of France, and Rome is the capital of Italy." + Keys.ENTER)
    last_caption = d.execute_script(JS_EXPLORER)["caption"]
    _wait(lambda: (d.execute_script(JS_EXPLORER) or {}).get("caption") not in (None, last_caption), 90,
          "the figure to show the new prompt")
    final = d.execute_script(JS_EXPLORER)
    assert f"layer {layer + 1}," in final["status"] and "kept" in final["status"]
    assert f"Layer {layer + 1}:" in final["alt"] and f"layer {layer + 1}." in final["caption"], final
    _wait(lambda: _kernel_ready(d), 60, "the kernel to finish the explorer's updates")
    s.shot("05-explorer-after-keyboard")


def test_end_of_notebook_and_no_console_errors(lab_session):
    s = lab_session
    cells = s.driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")
    _wait(lambda: _kernel_ready(s.driver), 60, "the kernel to be idle")
    _scroll_to(s.driver, cells[-1], "end")
    s.shot("06-notebook-end")
    origin = s.lab.base
    errors = []
    for entry in s.driver.get_log("browser"):
        if entry["level"] not in ("SEVERE",):
            continue
        # allowed: remote images (the Colab/Binder badges) that cannot load on an offline machine;
        # anything from JupyterLab itself (same origin) or any script error still fails
        url = entry["message"].split(" ", 1)[0]
        if entry["source"] == "network" and url.startswith("https://") and not url.startswith(origin):
            continue
        errors.append(entry)
    assert not errors, f"browser console errors: {errors}"
