"""Interactive bandwidth explorer: type a prompt, pick a layer, a threshold, and whether to leave
massive-activation positions out; the figure (with its alt text) and the table update.

The work is done by one pure function, :func:`explorer_update`, which a test (or a script) can call
directly; the widget callback calls exactly that function, so what you see in the widget is what
``ResidualBandwidthAnalyzer(...).analyze_layers(capture_residuals(...))`` computes.

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
"""
from __future__ import annotations

import html
import os
from types import SimpleNamespace

import numpy as np

from ..analyzer import ResidualBandwidthAnalyzer
from ..capture import KINDS, capture_residuals
from ..validation import BandwidthInputError, check_fraction, check_positive, check_prompts
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


def capture_prompt(loaded, prompt: str, kind: str = "resid_post"):
    """Capture one prompt's residual stream of ``kind`` at every layer (what the explorer analyses)."""
    prompt = _check_prompt(prompt)
    if kind not in KINDS:
        raise BandwidthInputError(f"kind: expected one of {KINDS}, got {kind!r}")
    return capture_residuals(loaded.model, loaded.tokenizer, [prompt], kinds=(kind,), progress=False)


def analyse_capture(capture, threshold: float = 0.95, exclude_massive: bool = True,
                    massive_ratio: float = 4.0, kind: str = "resid_post"):
    """The explorer's analysis: ``ResidualBandwidthAnalyzer(...).analyze_layers(capture, kind)``."""
    analyzer = ResidualBandwidthAnalyzer(threshold, massive_ratio=massive_ratio,
                                         exclude_massive=bool(exclude_massive))
    return analyzer.analyze_layers(capture, kind=kind)


def explorer_update(loaded, prompt: str, layer: int, threshold: float = 0.95,
                    exclude_massive: bool = True, massive_ratio: float = 4.0,
                    kind: str = "resid_post", capture=None, report=None
                    ) -> tuple[AccessibleFigure, list[dict]]:
    """The explorer's work for one setting: returns ``(figure, table)``.

    Equivalent to::

        cap = capture_residuals(model, tokenizer, [prompt])
        report = ResidualBandwidthAnalyzer(threshold, massive_ratio=massive_ratio,
                                           exclude_massive=exclude_massive).analyze_layers(cap, kind)

    followed by :func:`~residual_bandwidth.viz.plot_layer_explorer` for ``layer``. The table has one
    row per layer (``r{p}`` with and without massive positions, participation ratio, stable and
    entropy rank, both utilizations) and marks the selected layer. Pass ``capture`` (from
    :func:`capture_prompt`) to skip the forward pass when only the layer or threshold changed, and
    ``report`` (from :func:`analyse_capture` of that capture with the same settings) to skip the
    analysis when only the layer changed. Invalid arguments raise :class:`BandwidthInputError`.
    """
    prompt = _check_prompt(prompt)
    threshold = check_fraction(threshold, "threshold")
    massive_ratio = check_positive(massive_ratio, "massive_ratio")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise BandwidthInputError(f"layer: expected an integer, got {layer!r}")
    layer = int(layer)
    if capture is None:
        capture = capture_prompt(loaded, prompt, kind)
    if layer not in capture.layers:
        raise BandwidthInputError(f"layer: {layer} is out of range; the model has layers "
                                  f"{capture.layers[0]}..{capture.layers[-1]}")
    if report is None:
        report = analyse_capture(capture, threshold, exclude_massive, massive_ratio, kind)
    elif (report.variance_threshold != threshold or report.kind != kind
          or report.n_rows != capture.n_rows or (not exclude_massive and report.excluded_rows)):
        raise BandwidthInputError("report: it was computed with other settings or another capture; "
                                  "leave report=None to analyse again")
    fig = plot_layer_explorer(report, capture, layer, prompt=0, massive_ratio=massive_ratio)
    return fig, fig.table


class BandwidthExplorer:
    """The explorer's state, its widgets (built only when shown interactively) and its static view.

    ``update(...)`` is the widget callback: it calls :func:`explorer_update` with the current
    settings (re-using the capture while the prompt is unchanged) and refreshes ``figure``,
    ``table`` and, when live, the widget's image and table. An invalid setting (e.g. a one-token
    prompt with massive positions excluded) keeps the last good view and shows the message.
    """

    def __init__(self, loaded, prompt: str = DEFAULT_PROMPT, layer: int | None = None,
                 threshold: float = 0.95, exclude_massive: bool = True, massive_ratio: float = 4.0,
                 kind: str = "resid_post", interactive: bool | None = None, capture=None):
        self.loaded = loaded
        self.kind = kind
        self.massive_ratio = check_positive(massive_ratio, "massive_ratio")
        self.interactive = widget_frontend_available(interactive)
        self._captures: dict[str, object] = {}
        self._reports: dict[tuple, object] = {}  # (prompt, threshold, exclude_massive) -> report
        self.settings = {"prompt": _check_prompt(prompt), "layer": layer,
                         "threshold": check_fraction(threshold, "threshold"),
                         "exclude_massive": bool(exclude_massive)}
        if capture is not None:  # a capture of this prompt you already have (skips one forward pass)
            self._captures[self.settings["prompt"]] = capture
        cap = self._capture(self.settings["prompt"])
        if layer is None:
            self.settings["layer"] = cap.layers[len(cap.layers) // 2]
        self.figure: AccessibleFigure | None = None
        self.table: list[dict] = []
        self.error: str | None = None
        self.widgets: dict | None = None
        self.update(raise_errors=True)
        if self.interactive:
            self._build_widgets()

    # ---- the work ------------------------------------------------------------------------------
    def _capture(self, prompt: str):
        if prompt not in self._captures:
            if len(self._captures) >= 8:  # a small cache: typing many prompts must not grow memory
                self._captures.pop(next(iter(self._captures)))
            self._captures[prompt] = capture_prompt(self.loaded, prompt, self.kind)
        return self._captures[prompt]

    @property
    def layers(self) -> list[int]:
        return self._capture(self.settings["prompt"]).layers

    def update(self, raise_errors: bool = False, **changes) -> tuple[AccessibleFigure, list[dict]]:
        """Apply ``changes`` (prompt, layer, threshold, exclude_massive) and recompute."""
        unknown = set(changes) - set(self.settings)
        if unknown:
            raise BandwidthInputError(f"unknown setting(s) {sorted(unknown)}; have {sorted(self.settings)}")
        new = {**self.settings, **changes}
        try:
            cap = self._capture(_check_prompt(new["prompt"]))
            key = (new["prompt"], new["threshold"], bool(new["exclude_massive"]))
            if key not in self._reports:  # moving only the layer slider re-uses the analysis
                if len(self._reports) >= 16:
                    self._reports.pop(next(iter(self._reports)))
                self._reports[key] = analyse_capture(cap, check_fraction(new["threshold"], "threshold"),
                                                     new["exclude_massive"], self.massive_ratio, self.kind)
            fig, table = explorer_update(self.loaded, new["prompt"], new["layer"], new["threshold"],
                                         new["exclude_massive"], self.massive_ratio, self.kind,
                                         capture=cap, report=self._reports[key])
        except BandwidthInputError as e:
            if raise_errors:
                raise
            self.error = str(e)
            self._render()
            return self.figure, self.table
        if self.figure is not None:
            self.figure.close()
        self.settings, self.figure, self.table, self.error = new, fig, table, None
        self._render()
        return fig, table

    # ---- widgets -------------------------------------------------------------------------------
    def _build_widgets(self) -> None:
        import ipywidgets as W
        style = {"description_width": "initial"}
        layers = self.layers
        w = {
            "prompt": W.Text(value=self.settings["prompt"], description="Prompt (Enter to analyse):",
                             continuous_update=False, style=style, layout=W.Layout(width="95%")),
            "analyse": W.Button(description="Analyse", tooltip="capture and analyse the prompt",
                                button_style=""),
            "layer": W.IntSlider(value=self.settings["layer"], min=layers[0], max=layers[-1], step=1,
                                 description="Layer:", continuous_update=False, style=style),
            "threshold": W.FloatSlider(value=self.settings["threshold"], min=0.5, max=1.0, step=0.01,
                                       description="Variance threshold p:", readout_format=".2f",
                                       continuous_update=False, style=style),
            "exclude_massive": W.Checkbox(value=self.settings["exclude_massive"],
                                          description="Exclude massive-activation positions",
                                          indent=False, style=style),
            "status": W.HTML(value=""),
            "view": W.HTML(value=""),
        }
        for key in ("prompt", "layer", "threshold", "exclude_massive"):
            w[key].observe(lambda change, key=key: self.update(**{key: change["new"]}), names="value")
        w["analyse"].on_click(lambda _btn: self.update(prompt=w["prompt"].value))
        w["box"] = W.VBox([W.HBox([w["prompt"], w["analyse"]]),
                           W.HBox([w["layer"], w["threshold"], w["exclude_massive"]]),
                           w["status"], w["view"]])
        self.widgets = w
        self._render()

    def _render(self) -> None:
        if not self.widgets:
            return
        status = (f'<p role="alert"><b>Not updated:</b> {html.escape(self.error)}</p>' if self.error
                  else f"<p>{html.escape(self._summary())}</p>")
        self.widgets["status"].value = status
        if self.figure is not None:
            self.widgets["view"].value = self.figure._repr_html_()

    def _summary(self) -> str:
        s = self.settings
        return (f"layer {s['layer']}, p = {s['threshold']:.2f}, massive positions "
                f"{'excluded' if s['exclude_massive'] else 'kept'}")

    # ---- display -------------------------------------------------------------------------------
    def static_html(self) -> str:
        """The current figure (alt attribute + caption) and table as HTML, for non-widget viewers."""
        err = f"<p><b>Not updated:</b> {html.escape(self.error)}</p>" if self.error else ""
        return err + (self.figure._repr_html_() if self.figure is not None else "")

    def __str__(self) -> str:
        head = f"Bandwidth explorer ({self._summary()})"
        if self.error:
            head += f"\nNot updated: {self.error}"
        if self.figure is None:
            return head
        return f"{head}\n{self.figure.alt_text}\n\n{self.figure.table_text()}"

    __repr__ = __str__

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": str(self), "text/html": self.static_html()}
        if self.interactive and self.widgets:
            view = self.widgets["box"]._repr_mimebundle_()
            key = "application/vnd.jupyter.widget-view+json"
            if key in view:
                bundle[key] = view[key]
        return bundle


def explore(model_or_loaded="embedded", tokenizer=None, prompt: str = DEFAULT_PROMPT,
            layer: int | None = None, threshold: float = 0.95, exclude_massive: bool = True,
            massive_ratio: float = 4.0, kind: str = "resid_post",
            interactive: bool | None = None, capture=None) -> BandwidthExplorer:
    """Open the explorer on a model. Show the returned object (last expression of a notebook cell).

    ``model_or_loaded``: a ``LoadedModel`` (``load_model("embedded")``), a model name, or a Hugging
    Face model together with ``tokenizer``. ``interactive``: ``None`` = detect (module docstring),
    ``True`` = widgets, ``False`` = static figure + table. In plain Python (no IPython at all) the
    static view is also printed, since nothing else would show it. ``capture``: an existing
    :func:`capture_prompt` result for ``prompt`` (saves the first forward pass).
    """
    ex = BandwidthExplorer(as_loaded(model_or_loaded, tokenizer), prompt=prompt, layer=layer,
                           threshold=threshold, exclude_massive=exclude_massive,
                           massive_ratio=massive_ratio, kind=kind, interactive=interactive,
                           capture=capture)
    if not ex.interactive and not _in_ipython():
        print(ex)
    return ex


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None
