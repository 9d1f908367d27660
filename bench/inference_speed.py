"""Bandwidth analysis at the speed of inference: measured ratios against the floor of the job.

The floor of a per-layer report of a model over a set of prompts is the bare forward pass plus, per
spectrum, one float32 centred covariance and its eigenvalues (two spectra per layer: all positions
and without massive activations). The forward pass is timed twice: through the blocks only
(``model.base_model``, what the library's listeners run) and through the whole model (with the
language-model head); both ratios are printed. This script prints the cost of each way of producing
the report as a ratio to those floors, from about 512 to 8,192 tokens:

* ``stored``: ``capture_residuals(kinds=["resid_post"])`` + ``ResidualBandwidthAnalyzer().analyze_layers``
  (float64 products, the default);
* ``stored32``: the same with ``precision="float32"``;
* ``streamed32``: ``streaming.stream_layer_statistics(precision="float32")`` + ``.metrics()``: the
  statistics are accumulated by hooks inside the forward pass, nothing of size tokens x d is kept.

Further parts: ``stream100k`` (the streamed path over ~100k tokens, fed in ten slices: RSS at the
start and after each slice, ratio to its floor), ``lo1`` (pooled 13 x 1024 x 768 metrics vs one float32 covariance pass, ranks vs float64) and
``lesson`` (``make lesson``'s analytics vs one forward pass of its prompts plus the compression-curve
evaluations).

The machine is shared, so every ratio is the median of paired, interleaved repetitions (the floor and
each variant timed back to back in a random order), and the load average is printed with it.

    python bench/inference_speed.py                 # every part
    python bench/inference_speed.py --parts report lo1 --repeat 3
    python bench/inference_speed.py --parts report --json out/bench/inference.json   # for summarize.py
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine, rss_mib, write_json  # noqa: E402

from residual_bandwidth import ResidualBandwidthAnalyzer, capture_residuals, load_model  # noqa: E402
from residual_bandwidth import metrics as M  # noqa: E402
from residual_bandwidth.capture import forward_batches  # noqa: E402
from residual_bandwidth.compression import CALIBRATION_PROMPTS  # noqa: E402
from residual_bandwidth.streaming import stream_layer_statistics  # noqa: E402


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def prompts_for(tokenizer, n_tokens: int) -> list[str]:
    """The built-in prompts repeated until they hold about ``n_tokens`` tokens."""
    out, total, i = [], 0, 0
    while total < n_tokens:
        p = CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)]
        out.append(p)
        total += len(tokenizer(p)["input_ids"])
        i += 1
    return out


@torch.no_grad()
def bare_forward(lm, prompts, batch_size=8, head=True) -> float:
    """The forward pass alone: the whole model (``head=True``), or ``model.base_model`` (embeddings,
    blocks, final norm; what the listeners run when none reads the logits)."""
    run = lm.model if head else lm.model.base_model
    t = time.perf_counter()
    for _, enc, _ in forward_batches(lm.model, lm.tokenizer, prompts, batch_size, 512):
        run(**enc, use_cache=False)
    return time.perf_counter() - t


def covariance_eig32(x: torch.Tensor) -> None:
    """One float32 centred covariance and its eigenvalues (the floor's unit of work per spectrum)."""
    c = x - x.mean(0)
    torch.linalg.eigvalsh(c.T @ c)


def floor_spectra(mats: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    for x in mats:
        covariance_eig32(x)   # all positions
        covariance_eig32(x)   # without massive positions (the same size, to within a few rows)
    return time.perf_counter() - t


def stored(lm, prompts, precision="float64") -> float:
    t = time.perf_counter()
    cap = capture_residuals(lm.model, lm.tokenizer, prompts, kinds=["resid_post"], progress=False)
    ResidualBandwidthAnalyzer(precision=precision).analyze_layers(cap)
    return time.perf_counter() - t


def streamed(lm, prompts) -> float:
    t = time.perf_counter()
    stream_layer_statistics(lm.model, lm.tokenizer, prompts, precision="float32").metrics()
    return time.perf_counter() - t


def part_report(lm, sizes, repeat) -> list[dict]:
    """The table below, printed and returned (one dict per size: medians of seconds and of ratios)."""
    print(f"\n## Per-layer report vs floor (forward + 2 float32 covariance+eigvalsh per layer); {load()}")
    print("Ratios: to the floor with the forward pass through the blocks (what the listeners run) and,")
    print("in brackets, with the whole model's forward pass (language-model head included).")
    print("| tokens | forward s (blocks / whole) | spectra s | stored (float64) | stored32 | streamed32 |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in sizes:
        prompts = prompts_for(lm.tokenizer, n)
        cap = capture_residuals(lm.model, lm.tokenizer, prompts, kinds=["resid_post"], progress=False)
        mats = cap.layer_stack("resid_post")
        tokens = cap.n_rows
        del cap
        ratios = {k: ([], []) for k in ("stored", "stored32", "streamed32")}
        base, whole, spec = [], [], []
        for _ in range(repeat):
            jobs = [("stored", lambda: stored(lm, prompts)), ("stored32", lambda: stored(lm, prompts, "float32")),
                    ("streamed32", lambda: streamed(lm, prompts))]
            random.shuffle(jobs)
            for name, job in jobs:   # each variant paired with a floor measured right before it
                base.append(bare_forward(lm, prompts, head=False))
                whole.append(bare_forward(lm, prompts))
                spec.append(floor_spectra(mats))
                t = job()
                ratios[name][0].append(t / (base[-1] + spec[-1]))
                ratios[name][1].append(t / (whole[-1] + spec[-1]))
        med = {k: tuple(statistics.median(v) for v in pair) for k, pair in ratios.items()}
        cells = " | ".join(f"{med[k][0]:.2f}x ({med[k][1]:.2f}x)" for k in ("stored", "stored32", "streamed32"))
        print(f"| {tokens:,} | {statistics.median(base):.2f} / {statistics.median(whole):.2f} | "
              f"{statistics.median(spec):.2f} | {cells} |", flush=True)
        rows.append({"tokens": tokens, "forward_blocks_s": statistics.median(base),
                     "forward_whole_s": statistics.median(whole), "spectra_s": statistics.median(spec),
                     **{k: {"over_blocks_floor": med[k][0], "over_whole_floor": med[k][1]} for k in med}})
    print(load())
    return rows


def part_stream100k(lm, n_tokens, slices=10, head_sample_tokens=8192):
    """The streamed path over ``n_tokens``, fed in ``slices`` consecutive runs of the same listener
    (the same work as one run), with the resident memory after each: constant memory means the
    readings stop growing once the first batches have sized torch's buffers."""
    from residual_bandwidth import LayerStreamer, run_listeners
    print(f"\n## Streamed per-layer statistics over ~{n_tokens:,} tokens; {load()}")
    prompts = prompts_for(lm.tokenizer, n_tokens)
    start = rss_mib()
    t = time.perf_counter()
    streamer = LayerStreamer(lm.model, precision="float32")
    step = -(-len(prompts) // slices)
    rss = []
    for i in range(0, len(prompts), step):
        run_listeners(lm.model, lm.tokenizer, prompts[i:i + step], [streamer])
        rss.append(rss_mib())
    st = streamer.out
    st.metrics()
    took = time.perf_counter() - t
    fwd = bare_forward(lm, prompts, head=False)
    sub = prompts_for(lm.tokenizer, head_sample_tokens)
    n_sub = sum(len(lm.tokenizer(p)["input_ids"]) for p in sub)
    head_share = 1 - bare_forward(lm, sub, head=False) / bare_forward(lm, sub)
    d = lm.model.config.hidden_size
    x = torch.randn(st.n_rows, d)   # the floor's covariance cost depends on the shape only
    spectra = floor_spectra([x] * len(st.layers))
    del x
    print(f"tokens {st.n_rows:,}; streamed {took:.1f} s; floor {fwd:.1f} s forward through the blocks + "
          f"{spectra:.1f} s spectra = {fwd + spectra:.1f} s; ratio {took / (fwd + spectra):.2f}x (the head is "
          f"{100 * head_share:.0f} % of a whole-model forward, measured on {n_sub:,} tokens); RSS start {start:.0f} MiB, "
          f"after each tenth {', '.join(f'{r:.0f}' for r in rss)} MiB; {load()}")


def part_lo1(repeat):
    print(f"\n## LO1 pooled metrics of 13 x 1024 x 768 vs one float32 covariance pass; {load()}")
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(768, 768, generator=g)
    x = (torch.randn(13 * 1024, 768, generator=g) * torch.linspace(3, 0.01, 768)) @ basis / 30
    ref = M.compute_metrics(x.double())
    r64, r32, base = [], [], []
    for _ in range(repeat):
        t = time.perf_counter(); c = x - x.mean(0); c.T @ c; base.append(time.perf_counter() - t)
        t = time.perf_counter(); m64 = M.compute_metrics(x); r64.append((time.perf_counter() - t) / base[-1])
        t = time.perf_counter(); c = x - x.mean(0); c.T @ c; base.append(time.perf_counter() - t)
        t = time.perf_counter(); m32 = M.compute_metrics(x, precision="float32")
        r32.append((time.perf_counter() - t) / base[-1])
    same = all(getattr(m32, k) == getattr(ref, k) for k in ("variance_rank",)) and \
        all(M.variance_threshold_rank(M.spectrum(x, precision="float32"), p) ==
            M.variance_threshold_rank(M.spectrum(x), p) for p in (0.5, 0.9, 0.95, 0.99))
    print(f"float32 covariance pass {statistics.median(base):.3f} s; compute_metrics float64 "
          f"{statistics.median(r64):.2f}x, float32 {statistics.median(r32):.2f}x; float32 ranks equal "
          f"float64 (p = 0.5, 0.9, 0.95, 0.99): {same}; float64 variance rank {m64.variance_rank}; {load()}")


def part_lesson(lm):
    from residual_bandwidth import ResidualRun
    from residual_bandwidth.capture import model_dims
    from residual_bandwidth.compression import HELDOUT_PROMPTS
    from residual_bandwidth.course.report import DEFAULT_PROMPTS, analytics_plan, run_analytics
    print(f"\n## make lesson's analytics vs one forward pass + the compression evaluations; {load()}")
    plan = analytics_plan(model_dims(lm.model), fast=False)
    evals = 1 + len(plan["compression_layers"]) * len(plan["compression_ks"]) * (1 + plan["compression_n_random"])
    fwd = bare_forward(lm, DEFAULT_PROMPTS)
    held = bare_forward(lm, HELDOUT_PROMPTS)
    t = time.perf_counter()   # as run_bandwidth_job does it: one pass feeds the capture and the memory module
    run = ResidualRun(lm.model, lm.tokenizer, DEFAULT_PROMPTS, kinds=["resid_pre", "resid_post"])
    run.capture
    shared = time.perf_counter() - t
    summary, _ = run_analytics(run, progress=False)
    took = time.perf_counter() - t
    floor = fwd + evals * held
    print(f"shared pass {shared:.2f} s + analytics {took - shared:.1f} s ({summary['seconds']}) = {took:.1f} s; "
          f"floor {fwd:.2f} s forward + {evals} x {held:.2f} s held-out forward = {floor:.1f} s; "
          f"ratio {took / floor:.2f}x; {load()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["report", "lo1", "lesson", "stream100k"],
                    choices=["report", "lo1", "lesson", "stream100k"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 2048, 8192])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stream-tokens", type=int, default=100_000)
    ap.add_argument("--json", help="write the per-layer report's table here (bench/summarize.py reads it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    random.seed(0)
    print(describe_machine(machine()))
    lm = load_model("embedded") if set(args.parts) - {"lo1"} else None
    out = {"machine": machine(), "repeat": args.repeat}
    for part in args.parts:
        if part == "report":
            out["report"] = part_report(lm, args.sizes, args.repeat)
        elif part == "lo1":
            part_lo1(args.repeat)
        elif part == "lesson":
            part_lesson(lm)
        else:
            part_stream100k(lm, args.stream_tokens)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
