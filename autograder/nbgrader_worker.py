"""The nbgrader glue. The worker: a long-lived child process that runs the real nbgrader for the grader.

The grader (:mod:`autograder.pipeline`) starts one worker per ``--jobs`` slot and sends it requests
over a private pipe, one JSON line each; the worker answers on a second private pipe. Importing
nbgrader takes seconds, so reusing the worker saves that on every submission; isolation comes from
each submission having its *own* course folders and gradebook, and from the grader killing the
whole worker (and its kernels) when a submission exceeds its wall-clock or memory limit — a fresh
worker is started for the next one. The worker runs *outside* the sandbox and is the only writer
of the submission's gradebook copy and executed notebook; the kernel it starts runs inside it
(:mod:`autograder.isolate.kernel`, ZeroMQ over Unix sockets when the request carries an ``ipc`` folder), never
sees the pipes (kernels are started with ``close_fds``) and cannot see the worker's files or process,
so student code cannot forge an answer.

Requests (``op``):

* ``autograde``: ``nbgrader autograde`` of one student in one course folder, with the repository's
  ``nbgrader_config.py`` plus per-cell timeout, output cap, the guarded kernel and
  :class:`GuardedExecute` instead of nbgrader's ``Execute``.
* ``feedback``: ``nbgrader generate_feedback`` for that student, with :class:`HideHiddenTestOutput`,
  :class:`WithholdHiddenSource` and nbgrader's ``ClearHiddenTests`` so neither hidden test code nor
  its tracebacks reach students, and the page sanitized (:class:`SanitizeOutputs`,
  :class:`SafeHTMLExporter`): no script of the student's runs. With a ``summary``
  (:mod:`autograder.results.feedback_summary`) the page is the course's template
  (``autograder/templates/rb_feedback``): score, pass line, objectives and exercises on top, cells
  named by exercise.

Answers: ``{"ok": bool, "error": str, "log": str, "faults": [...]}`` (``faults``: cells that timed
out, lost the kernel or raised, see :class:`GuardedExecute`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

from nbconvert.exporters import HTMLExporter
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbconvert.preprocessors.sanitize import SanitizeHTML
from nbformat.notebooknode import NotebookNode
from traitlets import Bool, Dict, Integer
from traitlets.config import Config, PyFileConfigLoader

import nbgrader
from nbgrader.converters import Autograde, GenerateFeedback
from nbgrader.coursedir import CourseDirectory
from nbgrader.preprocessors import ClearHiddenTests, Execute, GetGrades, NbGraderPreprocessor
from nbgrader.preprocessors.execute import UnresponsiveKernelError
from nbclient.exceptions import DeadKernelError
from nbclient.util import ensure_async
from nbgrader.utils import capture_log

from autograder.ingest.notebook import HIDDEN_BEGIN, HIDDEN_END, OUTPUT_CAP_MARK
from autograder.check.scoring import is_hidden_part

ROOT = Path(__file__).resolve().parents[1]


class OutputLimitExceeded(RuntimeError):
    """A cell produced more output than the grader accepts (the submission is marked errored)."""


# what went wrong in which cell while executing the current request's notebook (reset per request)
FAULTS: list[dict] = []
FAULT_KINDS = ("timeout", "unresponsive", "died", "raised", "skipped")


class KernelUnresponsive(UnresponsiveKernelError):
    """A timed-out cell's kernel ignored the interrupt (GuardedExecute restarts it)."""


def _error_output(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


def _tag(cell) -> dict:
    """The grader's label of a cell (set by the pipeline: the student's own cell number, item, role)."""
    tag = (cell or {}).get("metadata", {}).get("autograder")
    return tag if isinstance(tag, dict) else {}


class GuardedExecute(Execute):
    """nbgrader's Execute with an output cap, and a timeout or crash that costs only its exercise.

    * nbclient keeps every output message in memory, so a cell that prints in a loop can exhaust the
      grader's memory long before the per-cell timeout. When a cell's messages (display updates,
      clears and widget messages included, see :meth:`process_message`) pass ``max_output_bytes``,
      or the notebook's pass ``max_total_output_bytes``, execution stops with
      :class:`OutputLimitExceeded`; nbgrader treats the submission as failed and the grader reports
      it as errored.
    * Locked helper cells get a longer limit than student and test cells (``helper_timeout``).
    * A cell that runs past the limit is interrupted (nbclient); the kernel must then answer a
      ``kernel_info`` request within ``interrupt_grace`` seconds. A kernel that ignores the interrupt
      (SIGINT ignored) or dies (``os._exit``, a crash) is **restarted**, and the cells that had run
      before (except test cells) are run again silently to rebuild its state; the notebook then goes on.
      At most ``max_restarts`` restarts; after that the remaining cells are not run.
    * Once a cell of an exercise timed out or lost the kernel, the exercise's remaining cells are not
      run (their outputs say why, so nbgrader scores them 0): an infinite loop costs the limit once.

    Cells are labelled by the pipeline (``metadata.autograder``: ``cell`` = the student's own cell
    number, ``item``, ``role``); every such event is appended to :data:`FAULTS` for the grader.
    """

    max_output_bytes = Integer(8 * 1024 * 1024, help="maximum bytes of output per cell").tag(config=True)
    max_total_output_bytes = Integer(32 * 1024 * 1024, help="maximum bytes of output of the whole notebook").tag(config=True)
    interrupt_grace = Integer(10, help="seconds a kernel has to respond after an interrupt").tag(config=True)
    helper_timeout = Integer(180, help="time limit of locked helper cells (imports on a busy machine)").tag(config=True)
    max_restarts = Integer(3, help="kernel restarts per notebook after a crash or an ignored interrupt").tag(config=True)

    def _get_timeout(self, cell):
        """Locked, ungraded helper cells (the setup cell importing torch) get ``helper_timeout``:
        they are instructor code, and a cold import on a loaded machine can take longer than a
        test cell ever should."""
        timeout = super()._get_timeout(cell)
        meta = (cell or {}).get("metadata", {}).get("nbgrader", {}) if cell is not None else {}
        if timeout and meta.get("locked") and not meta.get("grade") and not meta.get("solution"):
            return max(timeout, self.helper_timeout)
        return timeout

    async def _async_handle_timeout(self, timeout, cell=None):
        reply = await super()._async_handle_timeout(timeout, cell)
        if self.interrupt_on_timeout and self.kc is not None:
            try:
                await ensure_async(self.kc.kernel_info(reply=True, timeout=self.interrupt_grace))
            except (TimeoutError, RuntimeError) as e:
                gid = (cell or {}).get("metadata", {}).get("nbgrader", {}).get("grade_id", "")
                raise KernelUnresponsive(
                    f"a cell{' (' + gid + ')' if gid else ''} ran past the {timeout} s limit and the kernel ignored "
                    f"the interrupt for {self.interrupt_grace} s") from e
        return reply

    def reset_execution_trackers(self):
        """Start every notebook with an empty output budget (the preprocessor may be reused)."""
        super().reset_execution_trackers()
        self._autograder_sizes, self._autograder_total = {}, 0

    def process_message(self, msg, cell, cell_index):  # noqa: D401 (nbclient hook)
        """Count every message of a cell against the caps before nbclient stores it.

        nbclient's ``output()`` sees only new outputs: ``update_display_data`` (which replaces an
        output in place, by ``_update_display_id``), ``clear_output`` and comm messages (widget state,
        kept in memory) bypass it. So the budget is charged here, for every message but ``status``:
        its content as JSON plus its binary buffers plus a fixed 64-byte overhead (a flood of tiny
        ``clear_output`` messages costs something too), times the number of outputs a display id
        update is copied into. A clear never gives budget back.
        """
        if msg.get("msg_type") != "status":
            content = msg.get("content") or {}
            size = 64 + len(json.dumps(content, default=str))
            size += sum(len(b) for b in msg.get("buffers", None) or [])
            display_id = (content.get("transient") or {}).get("display_id")
            if display_id:   # nbclient copies it into every output shown with that id
                size *= 1 + sum(len(v) for v in self._display_id_map.get(display_id, {}).values())
            sizes = self.__dict__.setdefault("_autograder_sizes", {})
            sizes[cell_index] = sizes.get(cell_index, 0) + size
            self._autograder_total = total = self.__dict__.get("_autograder_total", 0) + size
            if sizes[cell_index] > self.max_output_bytes:
                raise OutputLimitExceeded(
                    f"{OUTPUT_CAP_MARK}: cell {cell_index} produced more than {self.max_output_bytes / 1e6:.0f} MB of "
                    "output (printed text, displays and their updates, widget messages)")
            if total > self.max_total_output_bytes:
                raise OutputLimitExceeded(
                    f"{OUTPUT_CAP_MARK}: the notebook produced more than {self.max_total_output_bytes / 1e6:.0f} MB "
                    "of output in all (printed text, displays and their updates, widget messages)")
        return super().process_message(msg, cell, cell_index)

    # ---- per-cell fault handling ----------------------------------------------------------------
    def preprocess(self, nb, resources=None, km=None):
        self._ran: list[int] = []              # cells that ran to the end (replayed after a restart)
        self._failed: dict[str, str] = {}      # item -> why its remaining cells are not run
        self._restarts = 0
        self._gave_up = ""
        return super().preprocess(nb, resources, km)

    def _fault(self, cell, index: int, kind: str, seconds: float, ename: str = "", evalue: str = "") -> None:
        tag = _tag(cell)
        FAULTS.append({"index": index, "cell": tag.get("cell"), "item": tag.get("item"), "role": tag.get("role"),
                       "kind": kind, "ename": str(ename)[:80], "evalue": str(evalue)[:300],
                       "seconds": round(seconds, 1)})

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code" or not cell.source.strip():
            return super().preprocess_cell(cell, resources, index)
        item = _tag(cell).get("item")
        why = self._gave_up or (self._failed.get(item) if item else "")
        if why:
            cell.outputs = [_error_output("NotRun", f"not run: {why}")]
            cell.execution_count = None
            self._fault(cell, index, "skipped", 0.0, "NotRun", why)
            return cell, resources
        t0 = time.monotonic()
        try:
            cell, resources = super().preprocess_cell(cell, resources, index)
        except (DeadKernelError, KernelUnresponsive) as e:
            died = isinstance(e, DeadKernelError)
            limit = self._get_timeout(cell)
            msg = ("the Python kernel died while running this cell (os._exit, a crash in a library, or out of memory)"
                   if died else f"this cell ran past the {limit} s time limit and ignored the interrupt")
            cell.outputs = [_error_output("KernelDied" if died else "CellTimeoutError",
                                          msg + "; the grader restarted the kernel and went on with the next exercise")]
            self._fault(cell, index, "died" if died else "unresponsive", time.monotonic() - t0)
            if item:
                self._failed[item] = ("an earlier cell of this exercise stopped the kernel" if died else
                                      "an earlier cell of this exercise ran past the time limit")
            self._restart_and_replay(resources)
            return cell, resources
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if any(o.get("ename") in ("CellTimeoutError", "KeyboardInterrupt") for o in errors):
            self._fault(cell, index, "timeout", time.monotonic() - t0, "CellTimeoutError",
                        f"ran past the {self._get_timeout(cell)} s time limit")
            if item:
                self._failed[item] = "an earlier cell of this exercise ran past the time limit"
            return cell, resources
        if errors and _tag(cell).get("role") in ("answer", "added"):
            self._fault(cell, index, "raised", time.monotonic() - t0, errors[0].get("ename", ""),
                        errors[0].get("evalue", ""))
        self._ran.append(index)
        return cell, resources

    def _restart_and_replay(self, resources) -> None:
        """A fresh kernel with the state of the cells that ran before (test cells excepted)."""
        while True:
            if self._restarts >= self.max_restarts:
                self._gave_up = f"the kernel was lost {self._restarts + 1} times; the grader stopped running this notebook"
                return
            self._restarts += 1
            self.log.warning("restarting the kernel (%d of at most %d)", self._restarts, self.max_restarts)
            self._cleanup_kernel()
            self.km = self.create_kernel_manager()
            self.start_new_kernel()
            self.start_new_kernel_client()
            sizes = self.__dict__.setdefault("_autograder_sizes", {})
            try:
                for i in list(self._ran):
                    cell = self.nb.cells[i]
                    if _tag(cell).get("role") == "test":
                        continue
                    before = sizes.pop(i, 0)
                    try:   # on a copy: the notebook keeps the first run's outputs (nbclient stores the copy)
                        self.execute_cell(copy.deepcopy(cell), i, store_history=False)
                    except (DeadKernelError, KernelUnresponsive):
                        self._ran.remove(i)   # not again
                        raise
                    finally:
                        sizes[i] = before
                        self.nb.cells[i] = cell
                return
            except (DeadKernelError, KernelUnresponsive):
                continue

    def output(self, outs, msg, display_id, cell_index):  # noqa: D401 (nbclient hook)
        sizes = self.__dict__.setdefault("_autograder_sizes", {})
        content = msg.get("content", {})
        size = len(content.get("text", "") or "")
        for value in (content.get("data") or {}).values():
            size += len(value) if isinstance(value, str) else len(json.dumps(value))
        size += sum(len(line) for line in content.get("traceback", []) or [])
        sizes[cell_index] = sizes.get(cell_index, 0) + size
        if sizes[cell_index] > self.max_output_bytes:
            raise OutputLimitExceeded(
                f"{OUTPUT_CAP_MARK}: cell {cell_index} printed more than "
                f"{self.max_output_bytes / 1e6:.0f} MB of output")
        return super().output(outs, msg, display_id, cell_index)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class HideHiddenTestOutput(NbGraderPreprocessor):
    """In feedback, keep hidden test code and what reveals it out of the outputs, and label them right.

    ``ClearHiddenTests`` removes the hidden test *code*, but a failing test's traceback still quotes
    its lines (and print output can reveal its inputs). Run this before ``ClearHiddenTests`` (it
    needs the hidden region of each cell):

    * a **hidden** test cell (``<item>__hidden``) keeps only its errors' name and message, marked
      "hidden test: details withheld";
    * a **visible** test cell (which also holds a hidden part) keeps its outputs — the visible tests'
      messages are the student's feedback — except tracebacks that quote a line of the hidden
      part: those become the error's name and message, marked as coming from the hidden part.
    """

    max_message = Integer(300, help="longest error message kept").tag(config=True)

    def _short(self, out, note: str) -> NotebookNode:
        ename = str(out.get("ename", "Error"))[:80]
        value = str(out.get("evalue", ""))[: self.max_message]
        return NotebookNode(output_type="error", ename=ename, evalue=value, traceback=[f"{ename}: {value} ({note})"])

    def preprocess_cell(self, cell: NotebookNode, resources, index):
        if cell.cell_type != "code" or HIDDEN_BEGIN not in cell.source:
            return cell, resources
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "") or ""
        if is_hidden_part(gid):
            cell.outputs = [self._short(o, "hidden test: details withheld") for o in cell.get("outputs", [])
                            if o.get("output_type") == "error"]
            return cell, resources
        region = cell.source.split(HIDDEN_BEGIN, 1)[1].split(HIDDEN_END, 1)[0]
        secret = [line.strip() for line in region.splitlines() if len(line.strip()) >= 8]
        kept = []
        for out in cell.get("outputs", []):
            text = ANSI.sub("", "\n".join(out.get("traceback", []) or []) + str(out.get("text", "")))
            if out.get("output_type") == "error" and any(line in text for line in secret):
                kept.append(self._short(out, "raised in the part of this test your notebook does not show; "
                                             "details withheld"))
            elif not any(line in text for line in secret):
                kept.append(out)
        cell.outputs = kept
        return cell, resources


class WithholdHiddenSource(NbGraderPreprocessor):
    """In feedback, withhold every output that quotes a line of hidden test code.

    The hidden tests run in the student's kernel, so a later cell can print them (``In``, ``_ih``,
    ``Out``, ``_i12``, ``inspect``...). Any output (stream, display, result, error) that contains a
    line of a hidden test block (stripped, at least ``min_chars`` long, and not also a line of visible
    source) is replaced by a note. Run
    before ``ClearHiddenTests``, which removes the hidden code it needs to recognise.
    """

    min_chars = Integer(12, help="shortest hidden-test line that is looked for").tag(config=True)
    note = "[autograder] output withheld: it quotes hidden test code\n"

    def preprocess(self, nb, resources):
        hidden, shown = set(), set()
        for cell in nb.cells:
            src = cell.source
            while HIDDEN_BEGIN in src:   # lines of the hidden blocks; everything else is visible anyway
                before, rest = src.split(HIDDEN_BEGIN, 1)
                block, _, src = rest.partition(HIDDEN_END)
                shown.update(l.strip() for l in before.splitlines())
                hidden.update(l.strip() for l in block.splitlines() if len(l.strip()) >= self.min_chars)
            shown.update(l.strip() for l in src.splitlines())
        self._hidden = hidden - shown
        return super().preprocess(nb, resources)

    def _text(self, out) -> str:
        parts = [str(out.get("text", "")), str(out.get("evalue", "")), *map(str, out.get("traceback", []) or [])]
        parts += [v if isinstance(v, str) else json.dumps(v) for v in (out.get("data") or {}).values()]
        return "\n".join(parts)

    def preprocess_cell(self, cell: NotebookNode, resources, index):
        if cell.cell_type != "code" or not self._hidden:
            return cell, resources
        outs = []
        for out in cell.get("outputs", []):
            text = self._text(out)
            if any(line in text for line in self._hidden):
                out = NotebookNode(output_type="stream", name="stdout", text=self.note)
            outs.append(out)
        cell.outputs = outs
        return cell, resources


# ---- safe rendering of the feedback page --------------------------------------------------------------
# What the student wrote (markdown, HTML and markdown outputs) is cleaned with bleach (through
# nbconvert's SanitizeHTML) against this list: unknown tags are stripped (their text stays), so are
# every event handler, style, script, iframe, form, SVG and JavaScript output. nbconvert's own
# ``sanitize_html`` escapes headings, paragraphs, <th>, <figure>, <details> into visible text, and
# nbgrader's feedback template skips it for markdown cells, so the grader does its own.
SAFE_TAGS = ["a", "abbr", "b", "blockquote", "br", "caption", "code", "col", "colgroup", "dd", "del", "details",
             "div", "dl", "dt", "em", "figcaption", "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img",
             "ins", "kbd", "li", "ol", "p", "pre", "q", "s", "samp", "small", "span", "strong", "sub", "summary",
             "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "u", "ul", "var"]
_COMMON = {"class", "id", "title", "lang", "dir", "role", "aria-label", "aria-describedby", "aria-hidden"}
_PER_TAG = {"a": {"href"}, "img": {"src", "alt", "width", "height"}, "td": {"colspan", "rowspan", "headers"},
            "th": {"colspan", "rowspan", "scope", "headers"}, "ol": {"start"}, "details": {"open"}}


def _safe_attribute(tag: str, name: str, value: str) -> bool:
    if name in _COMMON:
        return True
    if name not in _PER_TAG.get(tag, ()):
        return False
    if name in ("href", "src"):   # bleach also refuses javascript:/data: schemes here
        return value.strip().lower().startswith(("http://", "https://", "mailto:", "#")) or "://" not in value
    return True


def sanitizer() -> SanitizeHTML:
    """The one HTML cleaner of the feedback page (strip unknown tags, keep their text)."""
    return SanitizeHTML(tags=SAFE_TAGS, attributes=_safe_attribute, strip=True, strip_comments=True)


class SanitizeOutputs(SanitizeHTML):
    """Clean code cells' HTML/markdown outputs and drop other active types (JavaScript, SVG, widgets).
    Markdown *cells* are cleaned after rendering, by :class:`SafeHTMLExporter`."""

    enabled = Bool(True).tag(config=True)   # nbconvert preprocessors are off unless enabled

    def preprocess_cell(self, cell, resources, cell_index):
        if cell.cell_type == "code":
            clean = sanitizer()
            cell.outputs = clean.sanitize_code_outputs(cell.outputs)
        elif cell.cell_type == "raw":
            cell.source = sanitizer().sanitize_html_tags(cell.source)
        return cell, resources


class SafeHTMLExporter(HTMLExporter):
    """nbconvert's HTML exporter whose markdown filter cleans the rendered HTML (used for feedback)."""

    def markdown2html(self, context, source):
        return sanitizer().sanitize_html_tags(super().markdown2html(context, source))

    markdown2html.jinja_pass_arg = HTMLExporter.markdown2html.jinja_pass_arg   # a context filter, like the original


class AddSummary(NbGraderPreprocessor):
    """Put the grader's summary (:mod:`autograder.results.feedback_summary`) into the template's resources."""

    summary = Dict(help="the feedback page's summary").tag(config=True)

    def preprocess(self, nb, resources):
        resources["autograder"] = self.summary
        return nb, resources


def build_config(req: dict) -> Config:
    """The repository's nbgrader_config.py with this request's folders and limits on top."""
    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    c = Config()
    c.CourseDirectory.root = str(ROOT)
    c.CourseDirectory.submitted_directory = req["submitted"]
    c.CourseDirectory.autograded_directory = req["autograded"]
    c.CourseDirectory.feedback_directory = req["feedback"]
    c.CourseDirectory.release_directory = req["release"]
    c.CourseDirectory.db_url = "sqlite:///" + req["db"]
    c.Execute.timeout = int(req["cell_timeout"])
    c.Execute.interrupt_on_timeout = True
    c.Execute.kernel_name = req["kernel_name"]
    c.Execute.extra_arguments = ["--HistoryManager.hist_file=:memory:"]
    c.Execute.shutdown_kernel = "immediate"
    if req.get("ipc"):   # a sandboxed kernel: Unix sockets in a folder bound into the sandbox (no TCP)
        c.KernelManager.transport = "ipc"
        c.KernelManager.ip = str(Path(req["ipc"]) / "k")
    c.GuardedExecute.max_output_bytes = int(req["max_output_bytes"])
    c.GuardedExecute.max_total_output_bytes = int(req.get("max_total_output_bytes", 4 * req["max_output_bytes"]))
    c.GuardedExecute.interrupt_grace = int(req.get("interrupt_grace", 10))
    c.OverwriteCells.add_missing_cells = True
    c.Autograde.pre_convert_hook = None   # nbgrader_config.py refuses plain `nbgrader autograde`, not the grader
    c.Autograde.autograde_preprocessors = [
        GuardedExecute if p is Execute else p for p in Autograde.class_traits()["autograde_preprocessors"].default()]
    c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTestOutput, WithholdHiddenSource, ClearHiddenTests,
                                        SanitizeOutputs, CSSHTMLHeaderPreprocessor]
    c.GenerateFeedback.exporter_class = SafeHTMLExporter   # student markdown is untrusted: no script, no handlers
    if req.get("summary"):   # the course's page: summary on top, cells named by exercise
        c.GenerateFeedback.preprocessors = [*c.GenerateFeedback.preprocessors, AddSummary]
        c.AddSummary.summary = req["summary"]
        c.HTMLExporter.template_name = "rb_feedback"
        c.HTMLExporter.template_file = "rb_feedback.html.j2"   # extends nbgrader's feedback/index.html.j2
        c.HTMLExporter.extra_template_basedirs = [
            str(Path(nbgrader.__file__).parent / "server_extensions" / "formgrader" / "templates"),
            str(ROOT / "autograder" / "templates")]
    c.ClearHiddenTests.enforce_metadata = False
    cfg.merge(c)
    return cfg


def run(req: dict) -> dict:
    """Run one request; never raises (failures are answers)."""
    cfg = build_config(req)
    coursedir = CourseDirectory(config=cfg)
    coursedir.assignment_id = req["lesson"]
    coursedir.student_id = req["student"]
    if req["op"] == "autograde":
        os.environ.update(req.get("env", {}))
        app = Autograde(coursedir=coursedir, config=cfg)
        app.force = True
        app.create_student = True
    elif req["op"] == "feedback":
        app = GenerateFeedback(coursedir=coursedir, config=cfg)
        app.force = True
    else:
        return {"ok": False, "error": f"unknown op {req['op']!r}", "log": ""}
    FAULTS.clear()
    result = capture_log(app)
    return {"ok": bool(result.get("success")), "error": result.get("error", ""),
            "log": result.get("log", "")[-20000:], "faults": list(FAULTS)[:200]}


def main(argv: list[str] | None = None) -> int:
    """Serve requests from the grader until its request pipe closes."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--in-fd", type=int, required=True)
    ap.add_argument("--out-fd", type=int, required=True)
    args = ap.parse_args(argv)
    requests = os.fdopen(args.in_fd, "r", encoding="utf-8")
    answers = os.fdopen(args.out_fd, "w", encoding="utf-8")
    answers.write(json.dumps({"ok": True, "ready": True}) + "\n")
    answers.flush()
    for line in requests:
        if not line.strip():
            continue
        try:
            answer = run(json.loads(line))
        except Exception:  # a bug here must not look like a hang
            answer = {"ok": False, "error": traceback.format_exc(), "log": ""}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
