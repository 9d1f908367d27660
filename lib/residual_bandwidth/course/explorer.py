"""Interactive bandwidth explorer: type a prompt, pick a layer, a threshold, and whether to leave
massive-activation positions out; the figure (with its alt text) and the table update.

The work is done by one pure function, :func:`explorer_update`, which a test (or a script) can call
directly; the widget callback calls exactly that function, so what you see in the widget is what
``ResidualRun(model, tokenizer, [prompt]).report(...)`` computes. Opened on a run
(``explore(run)``), the explorer reads the run's capture for the run's prompts (no forward pass)
and runs the model only for a prompt you type.

Widget or static? (:func:`widget_frontend_available`, in this order)

1. ``interactive=True`` / ``False`` passed to :func:`explore` wins;
2. the environment variable ``RESIDUAL_BANDWIDTH_STATIC=1`` forces the static view (set it for
   papermill / ``nbconvert --execute`` runs, e.g. in ``make lesson``);
3. otherwise widgets are used when ``ipywidgets`` imports *and* the code runs inside a Jupyter
   kernel (``get_ipython().kernel`` exists). Plain Python and terminal IPython get the static view:
   ``print(explorer)`` shows the alt text and the table, ``explorer.figure.save("x.png")`` the image.

A kernel driven by papermill or nbconvert looks exactly like an interactive one from the inside, so
rule 3 cannot tell them apart. That is why the explorer's display bundle carries, next to the widget
view, a static HTML copy (the figure with its ``alt`` attribute, caption and table) and a text copy:
nbconvert skips a widget view whose state was not saved and renders the next format, the static
copy; JupyterLab, VS Code and Colab render the live widget.

Last input wins. The view is always computed from the *current* values of all controls (never from
the one value a callback was told about), and every control change takes a new generation number;
a render whose generation is no longer the newest when it finishes is dropped, so a slow render of
an older setting never overwrites a newer one (renders run one at a time). The image is scaled to
its container (``max-width: 100%; height: auto``).

ipywidgets versions: the explorer builds, updates and displays its widgets with ipywidgets 7.7
(what Colab ships) and 8.x (tests/test_explorer.py passes with both). Which kernel-side version a
front end can draw is the front end's business: JupyterLab 4 with jupyterlab_widgets 3 draws 8.x
widgets but not 7.x ones (measured: "Module @jupyter-widgets/base, version ^1.2.0 is not
registered"); Colab's own front end draws the 7.x it ships.
"""
from __future__ import annotations

import atexit
import html
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace

from ..run import ResidualRun
from ..validation import BandwidthInputError, check_fraction, check_int, check_positive, check_prompts
from ..viz import AccessibleFigure, plot_layer_explorer

DEFAULT_PROMPT = ("The transformer architecture revolutionized natural language processing by "
                  "introducing attention mechanisms.")
STATIC_ENV = "RESIDUAL_BANDWIDTH_STATIC"


def widget_frontend_available(interactive: bool | None = None) -> bool:
    """Whether to show live widgets (see the module docstring for the three rules)."""
    if interactive is not None:
        return bool(interactive)
    if os.environ.get(STATIC_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def as_loaded(model_or_loaded, tokenizer=None):
    """Accept a ``LoadedModel``, a model name (``"embedded"``, ``"gpt2"``, a folder), an object with
    ``.model`` and ``.tokenizer``, or a model plus ``tokenizer``."""
    if isinstance(model_or_loaded, str):
        from .models import load_model
        return load_model(model_or_loaded)
    if tokenizer is None and hasattr(model_or_loaded, "model") and hasattr(model_or_loaded, "tokenizer"):
        return model_or_loaded
    if tokenizer is None:
        raise BandwidthInputError("tokenizer: pass the model's tokenizer, or a LoadedModel from load_model()")
    return SimpleNamespace(model=model_or_loaded, tokenizer=tokenizer, name=type(model_or_loaded).__name__)


def _check_prompt(prompt) -> str:
    """One non-empty prompt string."""
    if not isinstance(prompt, str):
        raise BandwidthInputError(f"prompt: expected one non-empty string, got {type(prompt).__name__}")
    return check_prompts([prompt])[0]


def prompt_run(loaded, prompt: str, kind: str = "resid_post", massive_ratio: float = 4.0) -> ResidualRun:
    """The run the explorer analyses for one prompt: ``kind`` at every layer, nothing run until read."""
    return ResidualRun(loaded.model, loaded.tokenizer, [_check_prompt(prompt)], kinds=[kind], erasure=False,
                       massive_ratio=massive_ratio)


def explorer_update(loaded, prompt: str, layer: int, threshold: float = 0.95,
                    exclude_massive: bool = True, massive_ratio: float = 4.0,
                    kind: str = "resid_post", run: ResidualRun | None = None
                    ) -> tuple[AccessibleFigure, list[dict]]:
    """The explorer's work for one setting: returns ``(figure, table)``.

    Equivalent to::

        run = ResidualRun(model, tokenizer, [prompt], kinds=[kind], massive_ratio=massive_ratio)
        report = run.report(threshold, kind, exclude_massive)

    followed by :func:`~residual_bandwidth.viz.plot_layer_explorer` for ``layer``. The table has one
    row per layer (``r{p}`` with and without massive positions, participation ratio, stable and
    entropy rank, both utilizations) and marks the selected layer. Pass ``run`` (a run of
    ``[prompt]``, e.g. :func:`prompt_run` or ``ResidualRun.of_prompts``) to re-use its capture and its
    kept reports. Invalid arguments raise :class:`BandwidthInputError`.
    """
    prompt = _check_prompt(prompt)
    threshold = check_fraction(threshold, "threshold")
    massive_ratio = check_positive(massive_ratio, "massive_ratio")
    layer = check_int(layer, "layer")
    if run is None:
        run = prompt_run(loaded, prompt, kind, massive_ratio)
    elif run.prompts != [prompt] or run.massive_ratio != massive_ratio:
        raise BandwidthInputError("run: it is a run of other prompts or another massive ratio; "
                                  "leave run=None to run the prompt")
    capture = run.capture
    if layer not in capture.layers:
        raise BandwidthInputError(f"layer: {layer} is out of range; the model has layers "
                                  f"{capture.layers[0]}..{capture.layers[-1]}")
    report = run.report(threshold, kind, bool(exclude_massive))
    fig = plot_layer_explorer(report, capture, layer, prompt=0, massive_ratio=massive_ratio)
    return fig, fig.table


@dataclass(frozen=True)
class ExplorerView:
    """One setting, rendered: the HTML the widget shows (image with alt attribute, caption, table)
    and the text a terminal prints (alt text and table)."""
    html: str
    text: str
    table: list

    @classmethod
    def of(cls, fig: AccessibleFigure) -> "ExplorerView":
        return cls(fit_to_container(fig._repr_html_()), f"{fig.alt_text}\n\n{fig.table_text()}", fig.table)


def _view_key(settings: dict) -> tuple:
    return (settings["prompt"], round(float(settings["threshold"]), 4), bool(settings["exclude_massive"]),
            int(settings["layer"]))


class BandwidthExplorer:
    """The explorer's state, its widgets (built only when shown interactively) and its static view.

    ``update(...)`` is the widget callback: it calls :func:`explorer_update` with the current
    settings (re-using the prompt's run, so its capture and reports, while the prompt is unchanged;
    ``run``: a :class:`ResidualRun` whose prompts need no forward pass) and refreshes ``figure``,
    ``table`` and, when live, the widget's image and table. An invalid setting (e.g. a one-token
    prompt with massive positions excluded) keeps the last good view and shows the message.

    Speed. Drawing one view costs about 0.4 s (matplotlib's layout and drawing; the analysis of one
    prompt takes 0.04 s), too slow for a slider. So every rendered view is kept (:class:`ExplorerView`,
    at most ``MAX_VIEWS``), and with ``prerender`` (the default when live) a background thread renders
    the views a student is likely to ask for next (:meth:`neighbours`: every other layer, nearest
    first, then the other massive choice and the thresholds one slider step away). A change to a
    rendered view only swaps the widget's HTML. The thread draws only after ``QUIET_SECONDS`` without
    input, so it does not compete with a student's quick steps. ``wait_prerendered()`` waits for it.
    """

    MAX_VIEWS = 96
    QUIET_SECONDS = 0.3

    def __init__(self, loaded, prompt: str = DEFAULT_PROMPT, layer: int | None = None,
                 threshold: float = 0.95, exclude_massive: bool = True, massive_ratio: float = 4.0,
                 kind: str = "resid_post", interactive: bool | None = None, run: ResidualRun | None = None,
                 prerender: bool | None = None):
        self.loaded = loaded
        self.kind = kind
        self.massive_ratio = check_positive(massive_ratio, "massive_ratio")
        self.interactive = widget_frontend_available(interactive)
        self.prerender = self.interactive if prerender is None else bool(prerender)
        self._source = run   # its prompts are read from its capture
        self._runs: dict[str, ResidualRun] = {}   # prompt -> its run (capture and kept reports)
        self._views: OrderedDict[tuple, ExplorerView | None] = OrderedDict()  # None: cannot be drawn
        self._cache_lock = threading.RLock()  # the two caches above, shared with the background thread
        self.settings = {"prompt": _check_prompt(prompt), "layer": layer,
                         "threshold": check_fraction(threshold, "threshold"),
                         "exclude_massive": bool(exclude_massive)}
        if layer is None:
            self.settings["layer"] = self.layers[len(self.layers) // 2]
        self._figure: AccessibleFigure | None = None
        self.view: ExplorerView | None = None
        self.table: list[dict] = []
        self.error: str | None = None
        self.widgets: dict | None = None
        self._generation = 0
        self._generation_lock = threading.Lock()
        self._work_lock = threading.Lock()
        self._quiet = threading.local()  # set while the explorer itself moves the controls
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._last_input = 0.0
        _OPEN.add(self)
        self.update(raise_errors=True)
        if self.interactive:
            self._build_widgets()

    # ---- the work ------------------------------------------------------------------------------
    def _run(self, prompt: str) -> ResidualRun:
        with self._cache_lock:
            if prompt not in self._runs:
                if len(self._runs) >= 8:  # a small cache: typing many prompts must not grow memory
                    self._runs.pop(next(iter(self._runs)))
                source = self._source
                reuse = (source is not None and prompt in (source.prompts or ()) and self.kind in source.kinds
                         and source.massive_ratio == self.massive_ratio)
                self._runs[prompt] = (source.of_prompts([prompt]) if reuse
                                      else prompt_run(self.loaded, prompt, self.kind, self.massive_ratio))
            self._runs[prompt].capture   # the forward pass (if any) runs here, under the lock
            return self._runs[prompt]

    @property
    def layers(self) -> list[int]:
        return self._run(self.settings["prompt"]).capture.layers

    @property
    def figure(self) -> AccessibleFigure | None:
        """The current view as an :class:`AccessibleFigure` (drawn again if it came from the cache)."""
        if self._figure is None and self.view is not None:
            self._figure = self._compute(self.settings)[0]
        return self._figure

    def update(self, raise_errors: bool = False, **changes) -> tuple[AccessibleFigure, list[dict]]:
        """Apply ``changes`` (prompt, layer, threshold, exclude_massive) and recompute.

        When the widgets are shown, the controls are moved to the new settings too (the view and the
        controls always agree), and unchanged settings are read from the controls."""
        unknown = set(changes) - set(self.settings)
        if unknown:
            raise BandwidthInputError(f"unknown setting(s) {sorted(unknown)}; have {sorted(self.settings)}")
        self._apply(self._next_generation(), changes, raise_errors)
        return self.figure, self.table

    def _next_generation(self) -> int:
        self._last_input = time.monotonic()
        with self._generation_lock:
            self._generation += 1
            return self._generation

    def _stale(self, generation: int) -> bool:
        return generation != self._generation

    def _compute(self, new: dict) -> tuple[AccessibleFigure, list[dict]]:
        run = self._run(_check_prompt(new["prompt"]))
        with self._cache_lock:   # the run keeps the analysis: moving only the layer slider re-uses it
            run.report(check_fraction(new["threshold"], "threshold"), self.kind, bool(new["exclude_massive"]))
        return explorer_update(self.loaded, new["prompt"], new["layer"], new["threshold"],
                               new["exclude_massive"], self.massive_ratio, self.kind, run=run)

    def _cached_view(self, key: tuple) -> ExplorerView | None:
        with self._cache_lock:
            view = self._views.get(key)
            if view is not None:
                self._views.move_to_end(key)
            return view

    def _keep_view(self, key: tuple, view: ExplorerView | None) -> None:
        with self._cache_lock:
            self._views[key] = view
            self._views.move_to_end(key)
            while len(self._views) > self.MAX_VIEWS:
                self._views.popitem(last=False)

    def _apply(self, generation: int, changes: dict, raise_errors: bool = False) -> None:
        """Render the settings ``controls + changes`` unless a newer input has arrived.

        One render at a time (``_work_lock``); a render that was overtaken by a newer input while it
        waited or computed is dropped: the newer input's own call renders the newer state."""
        with self._work_lock:
            if self._stale(generation):
                return
            new = {**self._control_values(), **changes}
            view, fig = self._cached_view(_view_key(new)), None
            if view is None:
                try:
                    fig = self._compute(new)[0]
                except BandwidthInputError as e:
                    if raise_errors:
                        raise
                    if not self._stale(generation):
                        self.error = str(e)
                        self._render()
                    return
                view = ExplorerView.of(fig)
                self._keep_view(_view_key(new), view)
            if self._stale(generation):  # a newer input arrived while this one was computed
                if fig is not None:
                    fig.close()
                return
            if self._figure is not None:
                self._figure.close()
            self.settings, self._figure, self.view, self.table, self.error = new, fig, view, view.table, None
            self._set_controls(new)
            self._render()
        self._start_prerender()

    # ---- rendering ahead -----------------------------------------------------------------------
    def neighbours(self, settings: dict | None = None) -> list[dict]:
        """The settings a student is likely to ask for next, most likely first: the layers next to
        this one, the other massive choice, the thresholds one slider step (0.01) away, then every
        other layer, nearest first (at most ``MAX_VIEWS // 2`` in all)."""
        s = dict(self.settings if settings is None else settings)
        layers = sorted(self.layers, key=lambda L: (abs(L - s["layer"]), L))[1:]
        steps = [{**s, "threshold": round(s["threshold"] + d, 2)} for d in (0.01, -0.01)
                 if 0.0 < round(s["threshold"] + d, 2) <= 1.0]
        near = [{**s, "layer": L} for L in layers[:2]] + [{**s, "exclude_massive": not s["exclude_massive"]}]
        return (near + steps + [{**s, "layer": L} for L in layers[2:]])[: self.MAX_VIEWS // 2]

    def _start_prerender(self) -> None:
        if not self.prerender or self._closed:
            return
        with self._worker_lock:
            if self._worker is None:
                self._idle.clear()
                self._worker = threading.Thread(target=self._prerender_loop, name="explorer-prerender",
                                                daemon=True)
                self._worker.start()

    def _prerender_loop(self) -> None:
        """Render the next missing neighbour of the setting on screen until none is missing."""
        while True:
            while (wait := self._last_input + self.QUIET_SECONDS - time.monotonic()) > 0:
                time.sleep(wait)  # the student is still moving the controls
            with self._worker_lock:
                with self._cache_lock:
                    todo = [] if self._closed else [n for n in self.neighbours()
                                                    if _view_key(n) not in self._views]
                if not todo:
                    self._worker = None
                    self._idle.set()
                    return
            try:
                fig = self._compute(todo[0])[0]
                view = ExplorerView.of(fig)
                fig.close()
            except Exception:  # noqa: BLE001 - a setting that cannot be drawn is shown as an error when asked for
                view = None
            self._keep_view(_view_key(todo[0]), view)

    def wait_prerendered(self, timeout: float | None = None) -> bool:
        """Wait until the background thread has rendered every neighbour; False on timeout."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop rendering ahead (the current render finishes) and release the figure. Called for every
        open explorer when Python exits: a thread still drawing then would abort the interpreter."""
        self._closed = True
        self._idle.wait(timeout)
        if self._figure is not None:
            self._figure.close()
            self._figure = None


    # ---- widgets -------------------------------------------------------------------------------
    def _build_widgets(self) -> None:
        import ipywidgets as W
        style = {"description_width": "initial"}
        layers = self.layers
        w = {
            "prompt": W.Text(value=self.settings["prompt"], description="Prompt (Enter to analyse):",
                             continuous_update=False, style=style,
                             layout=W.Layout(flex="1 1 30em", width="auto")),
            "analyse": W.Button(description="Analyse", tooltip="capture and analyse the prompt",
                                button_style=""),
            "layer": W.IntSlider(value=self.settings["layer"], min=layers[0], max=layers[-1], step=1,
                                 description="Layer:", continuous_update=False, style=style),
            "threshold": W.FloatSlider(value=self.settings["threshold"], min=0.5, max=1.0, step=0.01,
                                       description="Variance threshold p:", readout_format=".2f",
                                       continuous_update=False, style=style),
            "exclude_massive": W.Checkbox(value=self.settings["exclude_massive"],
                                          description="Exclude massive rows",
                                          indent=False, style=style),
            "status": W.HTML(value=""),
            "view": W.HTML(value=""),
        }
        for key in ("prompt", "layer", "threshold", "exclude_massive"):
            w[key].observe(self._on_control_change, names="value")
        w["analyse"].on_click(self._on_control_change)
        w["box"] = W.VBox([W.HBox([w["prompt"], w["analyse"]], layout=W.Layout(flex_flow="row wrap")),
                           W.HBox([w["layer"], w["threshold"], w["exclude_massive"]],
                                  layout=W.Layout(flex_flow="row wrap")),
                           w["status"], w["view"]])
        for key in ("box", "status", "view"):  # stable names for the real-browser test
            w[key].add_class("rb-explorer" if key == "box" else f"rb-explorer-{key}")
        self.widgets = w
        self._render()

    def _on_control_change(self, _change=None) -> None:
        """Every control's callback: render what the controls show now (last input wins)."""
        if getattr(self._quiet, "on", False):
            return
        self._apply(self._next_generation(), {})

    def _control_values(self) -> dict:
        """The settings the controls show (the current settings when there are no widgets)."""
        if not self.widgets:
            return dict(self.settings)
        w = self.widgets
        return {"prompt": w["prompt"].value, "layer": int(w["layer"].value),
                "threshold": round(float(w["threshold"].value), 4),  # a slider step of 0.01 may arrive as 0.9599999
                "exclude_massive": bool(w["exclude_massive"].value)}

    def _set_controls(self, settings: dict) -> None:
        """Move the controls to ``settings`` without triggering their callbacks."""
        if not self.widgets:
            return
        self._quiet.on = True
        try:
            for key, value in settings.items():
                control = self.widgets[key]
                if key == "threshold":  # a valid p outside the slider's range widens the range
                    control.min, control.max = min(control.min, value), max(control.max, value)
                if control.value != value:
                    control.value = value
        finally:
            self._quiet.on = False

    def _render(self) -> None:
        if not self.widgets:
            return
        status = (f'<p role="alert"><b>Not updated:</b> {html.escape(self.error)}</p>' if self.error
                  else f"<p>{html.escape(self._summary())}</p>")
        if self.view is not None:  # the image first: once the caption changes, the image has
            self.widgets["view"].value = self.view.html
        self.widgets["status"].value = status

    def _summary(self) -> str:
        s = self.settings
        return (f"layer {s['layer']}, p = {s['threshold']:.2f}, massive positions "
                f"{'excluded' if s['exclude_massive'] else 'kept'}")

    # ---- display -------------------------------------------------------------------------------
    def static_html(self) -> str:
        """The current figure (alt attribute + caption) and table as HTML, for non-widget viewers."""
        err = f"<p><b>Not updated:</b> {html.escape(self.error)}</p>" if self.error else ""
        return err + (self.view.html if self.view is not None else "")

    def __str__(self) -> str:
        head = f"Bandwidth explorer ({self._summary()})"
        if self.error:
            head += f"\nNot updated: {self.error}"
        if self.view is None:
            return head
        return f"{head}\n{self.view.text}"

    __repr__ = __str__

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": str(self), "text/html": self.static_html()}
        if self.interactive and self.widgets:
            bundle.update(widget_view_bundle(self.widgets["box"]))
        return bundle


_OPEN: "weakref.WeakSet[BandwidthExplorer]" = weakref.WeakSet()


@atexit.register
def _close_open_explorers() -> None:
    for explorer in list(_OPEN):
        explorer.close()


WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
_FIT_IMAGE = "max-width: 100%; height: auto;"


def widget_view_bundle(widget) -> dict:
    """The display data that shows ``widget`` live, for ipywidgets 8 and 7.

    ipywidgets 8 widgets have ``_repr_mimebundle_``; ipywidgets 7 (what Colab ships) only
    ``_ipython_display_``, which publishes the same view spec (widget protocol 2.0) built here."""
    if hasattr(widget, "_repr_mimebundle_"):
        view = widget._repr_mimebundle_() or {}
        return {WIDGET_VIEW_MIME: view[WIDGET_VIEW_MIME]} if WIDGET_VIEW_MIME in view else {}
    model_id = getattr(widget, "model_id", None)
    if model_id is None:
        return {}
    return {WIDGET_VIEW_MIME: {"version_major": 2, "version_minor": 0, "model_id": model_id}}


def fit_to_container(figure_html: str) -> str:
    """Scale every ``<img>`` to its container (``max-width: 100%; height: auto``) and let tables
    scroll sideways instead of widening the output (an ipywidgets HTML view does not inherit the
    notebook's own image rule, so the explorer's image overflowed its widget)."""
    figure_html = re.sub(r"<img(?![^>]*\bstyle=)", f'<img style="{_FIT_IMAGE}"', figure_html)
    return re.sub(r"(<table\b.*?</table>)", r'<div style="overflow-x: auto; max-width: 100%;">\1</div>',
                  figure_html, flags=re.S)


def explore(model_or_loaded="embedded", tokenizer=None, **settings) -> BandwidthExplorer:
    """Open the explorer on a model or a run. Show the returned object (last expression of a cell).

    ``model_or_loaded``: a :class:`ResidualRun` (its prompts are read from its capture; the first is
    shown unless ``prompt`` is given), a ``LoadedModel`` (``load_model("embedded")``), a model name,
    or a Hugging Face model together with ``tokenizer``. ``settings``: those of
    :class:`BandwidthExplorer` (``prompt``, ``layer``, ``threshold``, ``exclude_massive``,
    ``massive_ratio``, ``kind``, ``interactive``, ``prerender``). ``interactive``: ``None`` = detect
    (module docstring), ``True`` = widgets, ``False`` = static figure + table. In plain Python (no
    IPython at all) the static view is also printed, since nothing else would show it.
    """
    if isinstance(model_or_loaded, ResidualRun):
        run = model_or_loaded
        if run.prompts is None:
            raise BandwidthInputError("run: a run without prompts has nothing to explore")
        settings = {"prompt": run.prompts[0], "massive_ratio": run.massive_ratio, "run": run, **settings}
        model_or_loaded, tokenizer = run.model, run.tokenizer
    ex = BandwidthExplorer(as_loaded(model_or_loaded, tokenizer), **settings)
    if not ex.interactive and not _in_ipython():
        print(ex)
    return ex


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None
