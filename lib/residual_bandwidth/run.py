"""One model run over a set of prompts, and every analysis read from it.

In the spirit of TransformerLens's ``ActivationCache``: a :class:`ResidualRun` checks its layers once,
runs the model over its prompts once (the residual capture and the write-vs-read projections are
listeners of the same pass, :func:`~residual_bandwidth.capture.run_listeners`), extracts each
layer's weights once, and keeps each analysis the first time it is asked for::

    run = ResidualRun(model, tokenizer, prompts)
    run.capture              # ResidualCapture: resid_pre ... mlp_out of every layer
    run.report()             # BandwidthReport, with and without massive rows
    run.bottlenecks()        # crowded (layer, position) cells
    run.memory()             # eraser heads and neurons, write-vs-read erasure, energy-loss directions
    run.composition("K")     # K-composition scores between the heads of the run's layers
    run.compression([12], [64, 576])   # the run's prompts are the calibration prompts
    run.weights_of([3, 4])   # LayerWeights from the one extraction

Nothing here computes a metric: each method calls the module that owns the idea. Nothing is run
until it is read: a run of weights alone (``prompts=None``) never touches the model's forward pass.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .analyzer import BandwidthReport, ResidualBandwidthAnalyzer
from .bottlenecks import BottleneckReport, find_bottlenecks
from .capture import KINDS, ResidualCapture, ResidualRecorder, architecture_of, check_layers, run_listeners
from .composition import CompositionScores, composition_scores
from .compression import CompressionCurve, compression_curve
from .memory import ErasureMeter, ErasureReport, MemoryReport, memory_management
from .outliers import DEFAULT_MASSIVE_RATIO
from .validation import BandwidthInputError, check_int, check_positive, check_prompts
from .weights import LayerWeights, layer_weights


class ResidualRun:
    """``model`` run over ``prompts`` at ``layers`` (default all), read lazily (module docstring).

    ``kinds``: the hook points stored in :attr:`capture` (default all five); ``erasure``: measure
    the write-vs-read projections in the same pass as the capture (needed by :meth:`memory`; the
    pass then uses eager attention). ``massive_ratio`` is the massive-row rule of every analysis.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, prompts: Sequence[str] | None = None,
                 layers=None, kinds: Sequence[str] = KINDS, erasure: bool = True,
                 massive_ratio: float = DEFAULT_MASSIVE_RATIO, batch_size: int = 8, progress: bool = False):
        architecture_of(model)
        self.model, self.tokenizer, self.layers = model, tokenizer, check_layers(model, layers)
        self.prompts = None if prompts is None else check_prompts(prompts)
        if self.prompts is not None and tokenizer is None:
            raise BandwidthInputError("tokenizer: needed together with prompts")
        self.kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise BandwidthInputError(f"kinds: expected a non-empty list from {KINDS}, got {kinds!r}")
        self.massive_ratio = check_positive(massive_ratio, "massive_ratio")
        self.batch_size = check_int(batch_size, "batch_size", low=1)
        self.with_erasure, self.progress = bool(erasure), bool(progress)
        self._capture, self._erasure = None, None   # ResidualCapture, ErasureReport: set by the one pass
        self._weights: dict[int, LayerWeights] = {}
        self._analyses: dict[tuple, object] = {}

    def __repr__(self) -> str:
        n = "no prompts" if self.prompts is None else f"{len(self.prompts)} prompts"
        done = [name for name, v in (("capture", self._capture), ("erasure", self._erasure)) if v is not None]
        return (f"ResidualRun({type(self.model).__name__}, {n}, {len(self.layers)} layers, "
                f"run: {', '.join(done) or 'nothing yet'}, {len(self._analyses)} analyses kept)")

    # -- what the forward pass and the weights give, each made once ---------------------------
    def _forward(self, capture: bool, erasure: bool) -> None:
        if self.prompts is None:
            raise BandwidthInputError("prompts: this run has none, so nothing was captured (weights only)")
        listeners = []
        if capture:
            listeners.append(ResidualRecorder(self.model, self.tokenizer, self.kinds, self.layers))
        if erasure:
            listeners.append(ErasureMeter(self.model, self.layers, massive_ratio=self.massive_ratio,
                                          weights=self.weights_of(self.layers), attention=True))
        run_listeners(self.model, self.tokenizer, self.prompts, listeners, self.batch_size,
                      progress=self.progress, desc="residual stream" + (" + write-vs-read" if erasure else ""))
        if capture:
            self._capture = listeners[0].capture(self.prompts)
        if erasure:
            self._erasure = listeners[-1].report()

    @property
    def capture(self) -> ResidualCapture:
        """The stored hook points of every prompt (one pass, shared with :attr:`erasure`)."""
        if self._capture is None:
            self._forward(True, self.with_erasure and self._erasure is None)
        return self._capture

    @property
    def erasure(self) -> ErasureReport:
        """Write-vs-read projections and current-token attention of every layer (same pass)."""
        if self._erasure is None:
            self._forward(self._capture is None, True)
        return self._erasure

    @property
    def weights(self) -> list[LayerWeights]:
        """The run's layers' :class:`LayerWeights`, in the order of :attr:`layers`."""
        return self.weights_of(self.layers)

    def weights_of(self, layers) -> list[LayerWeights]:
        """``LayerWeights`` of ``layers`` (any of the model's), each extracted once per run."""
        layers = check_layers(self.model, layers)
        for L in layers:
            if L not in self._weights:
                self._weights[L] = layer_weights(self.model, L)
        return [self._weights[L] for L in layers]

    def of_prompts(self, prompts: Sequence[str]) -> "ResidualRun":
        """A run of some of this run's prompts that reads this run's capture rows and weights instead
        of running the model again (e.g. the explorer's view of one prompt)."""
        missing = [p for p in check_prompts(prompts) if self.prompts is None or p not in self.prompts]
        if missing:
            raise BandwidthInputError(f"prompts: {len(missing)} are not among this run's, e.g. {missing[0]!r}")
        sub = ResidualRun(self.model, self.tokenizer, prompts, self.layers, self.kinds, erasure=False,
                          massive_ratio=self.massive_ratio, batch_size=self.batch_size)
        sub._capture, sub._weights = self.capture.of_prompts([self.prompts.index(p) for p in sub.prompts]), self._weights
        return sub

    def _kept(self, key: tuple, make):
        if key not in self._analyses:
            self._analyses[key] = make()
        return self._analyses[key]

    # -- the analyses, each kept per argument set -------------------------------------------
    def report(self, variance_threshold: float = 0.95, kind: str = "resid_post",
               exclude_massive: bool = True) -> BandwidthReport:
        """:meth:`ResidualBandwidthAnalyzer.analyze_layers` of :attr:`capture`."""
        return self._kept(("report", variance_threshold, kind, exclude_massive), lambda: ResidualBandwidthAnalyzer(
            variance_threshold, massive_ratio=self.massive_ratio, exclude_massive=exclude_massive
        ).analyze_layers(self.capture, kind=kind))

    def bottlenecks(self, kind: str = "resid_post", **options) -> BottleneckReport:
        """:func:`~residual_bandwidth.bottlenecks.find_bottlenecks` of :attr:`capture`."""
        return self._kept(("bottlenecks", kind, repr(sorted(options.items()))), lambda: find_bottlenecks(
            self.capture, kind=kind, massive_ratio=self.massive_ratio, **options))

    def memory(self, top_per_kind: int = 5) -> MemoryReport:
        """:func:`~residual_bandwidth.memory.memory_management` of this run."""
        return self._kept(("memory", top_per_kind), lambda: memory_management(self, top_per_kind))

    def composition(self, kind: str = "Q", layers=None, **options) -> CompositionScores:
        """:func:`~residual_bandwidth.composition.composition_scores` between the heads of ``layers``
        (default the run's), from the run's weights."""
        layers = self.layers if layers is None else check_layers(self.model, layers)
        return self._kept(("composition", kind, repr(layers), repr(sorted(options.items()))),
                          lambda: composition_scores(self.weights_of(layers), kind, **options))

    def compression(self, layers, ks, **options) -> CompressionCurve:
        """:func:`~residual_bandwidth.compression.compression_curve`, fitted on this run's capture."""
        key = ("compression", repr(check_layers(self.model, layers)), repr(ks), repr(sorted(options.items())))
        return self._kept(key, lambda: compression_curve(self, layers, ks, **options))
