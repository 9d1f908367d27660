"""Benchmark: the monitor's running statistics over >= 1M positions, in constant memory.

Not a test: it prints what it measured (``make bench``). Two parts, one run:

1. **Model-generated traffic.** The embedded model serves windows of 256 tokens (standard-library
   documentation as text, batches of 8) with a :class:`BandwidthMonitor` attached that streams
   *every* real position of its watched layers (``MonitorConfig(max_positions=None)``) into its running mean and
   scatter. Printed: positions per second, the resident memory after the first batch and at the
   end. At the ~550 tokens/s of this model on 2 CPU cores, 1M model-generated positions would take
   about half an hour, so the default is ``--model-positions 16384``; pass ``1048576`` to do it.

2. **Synthetic traffic with the model's measured spectrum**, ``--positions`` rows (default 2**20).
   The mean and the eigen-decomposition of the covariance streamed in part 1 at the middle watched
   layer define a Gaussian with the model's spectrum; its rows are drawn in requests of
   ``--request-rows`` and fed through ``BandwidthMonitor.observe`` (the monitor's whole per-request
   path: validation, massive-row test, per-request ranks, streaming update). Printed: resident memory
   at the start, every 10 % and at the end; rows per second; and the streamed spectrum against the
   population it was drawn from (a check that a million updates did not drift: the relative error of
   the top eigenvalues should be about ``sqrt(2 / n)``).

   Also timed: the bare accumulator, :class:`StreamingMoments` ``update`` on the same rows.

Usage: python bench/streaming.py [--positions 1048576] [--model-positions 16384] [--json FILE]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from common import describe_machine, machine, rss_mib, token_windows, write_json

from residual_bandwidth import load_model
from residual_bandwidth import metrics as M
from residual_bandwidth.monitor import AlertPolicy, BandwidthMonitor, MonitorConfig
from residual_bandwidth.streaming import StreamingMoments


def model_traffic(lm, positions: int, batch: int = 8, window: int = 256) -> tuple[dict, BandwidthMonitor]:
    ids = token_windows(lm.tokenizer, positions, window)
    monitor = BandwidthMonitor(lm.model, config=MonitorConfig(max_positions=None, history_size=100))
    rss, t_first, n_first, seen = [], None, 0, 0
    n_batches = -(-ids.shape[0] // batch)
    with torch.no_grad(), monitor:
        t0 = time.perf_counter()
        for b, i in enumerate(tqdm(range(0, ids.shape[0], batch), desc="model traffic", unit="batch", leave=False,
                                   disable=None)):
            chunk = ids[i:i + batch]
            lm.model(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False)
            seen += chunk.numel()
            if t_first is None:  # memory after the first batch: model, buffers and monitor warm
                t_first, n_first = time.perf_counter(), chunk.numel()
            if b == 0 or (b + 1) % max(1, n_batches // 10) == 0 or b == n_batches - 1:
                rss.append((seen, rss_mib()))
        dt = time.perf_counter() - t0
    marks = rss
    rss = [r for _, r in marks]
    totals = monitor.totals()
    proc = [r.processing_seconds for r in monitor.history]
    out = {"positions": int(ids.numel()), "seconds": dt, "positions_per_second": ids.numel() / dt,
           "rss_after_first_batch_mib": rss[0], "rss_end_mib": rss[-1],
           "rss_growth_mib": rss[-1] - rss[0],
           "after_first_positions_per_second": (ids.numel() - n_first) / (dt - (t_first - t0)) if dt > t_first - t0 else None,
           "rss_marks": marks, "layers": monitor.layers, "covariance_rows": totals["covariance_rows"],
           "massive_tokens": totals["massive_tokens"],
           "monitor_processing_ms_mean_last_100": 1e3 * float(np.mean(proc)) if proc else None}
    print(f"  {out['positions']:,} positions through {lm.name} with the monitor streaming every row of layers "
          f"{monitor.layers}: {dt:.1f} s ({out['positions_per_second']:.0f} positions/s)")
    print("  resident memory (positions seen -> MiB): " + ", ".join(f"{n:,} -> {r:.0f}" for n, r in marks))
    print(f"  resident memory after the first batch {rss[0]:.0f} MiB, at the end {rss[-1]:.0f} MiB "
          f"({out['rss_growth_mib']:+.0f} MiB); rows in the running covariance per layer: {totals['covariance_rows']} "
          f"(massive rows left out: {totals['massive_tokens']})")
    return out, monitor


def population_from(moments: StreamingMoments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, eigenvalues (descending, of the sample covariance) and eigenvectors of the streamed traffic."""
    cov = moments.covariance()
    lam, vec = torch.linalg.eigh(cov)
    return moments.mean, lam.flip(0).clamp(min=0), vec.flip(1)


def gaussian_sampler(mean, lam, vec, seed: int):
    """``draw(m)``: m float32 rows ``x = mu + z diag(sqrt(lambda)) V^T`` (z standard normal), whose
    covariance is ``V diag(lambda) V^T``: the measured spectrum and directions."""
    g = torch.Generator().manual_seed(seed)
    scale = lam.sqrt().to(torch.float32)
    basis = vec.T.to(torch.float32).contiguous()      # rows: principal directions
    mu = mean.to(torch.float32)
    return lambda m: mu + (torch.randn(m, mean.shape[0], generator=g) * scale) @ basis


def synthetic_traffic(mean, lam, vec, layer: int, positions: int, request_rows: int, seed: int) -> dict:
    d = mean.shape[0]
    draw = gaussian_sampler(mean, lam, vec, seed)
    monitor = BandwidthMonitor(None, layers=[layer], alerts=AlertPolicy({}),
                               config=MonitorConfig(max_positions=None, d_model=d, history_size=100))
    n_requests = math.ceil(positions / request_rows)
    marks, seen = [], 0
    monitor.observe({layer: draw(request_rows)})
    seen += request_rows
    marks.append((seen, rss_mib()))
    t0 = time.perf_counter()
    for i in tqdm(range(1, n_requests), desc="synthetic traffic", unit="request", leave=False, disable=None):
        m = min(request_rows, positions - seen)
        monitor.observe({layer: draw(m)})
        seen += m
        if i % max(1, n_requests // 10) == 0 or seen == positions:
            marks.append((seen, rss_mib()))
    dt = time.perf_counter() - t0
    summary = monitor.traffic_summary(layer)
    streamed = monitor.traffic(layer)
    est = torch.from_numpy(streamed.eigenvalues().copy()) / (streamed.n - 1)
    rel = ((est[:10] - lam[:10]).abs() / lam[:10]).max().item()
    pop = M.Spectrum(eigenvalues=lam.numpy(), n_samples=positions, d_model=d, centered=True)
    out = {"positions": seen, "request_rows": request_rows, "requests": n_requests, "seconds": dt,
           "positions_per_second": (seen - request_rows) / dt, "rss_marks": marks,
           "rss_start_mib": marks[0][1], "rss_end_mib": marks[-1][1], "rss_growth_mib": marks[-1][1] - marks[0][1],
           "state_bytes": streamed.nbytes, "top10_eigenvalue_max_rel_err": rel,
           "expected_rel_err_scale": math.sqrt(2 / seen),
           "r95_streamed": summary["variance_rank"], "r95_population": M.variance_threshold_rank(pop),
           "pr_streamed": summary["participation_ratio"], "pr_population": M.participation_ratio(pop)}
    print(f"  {seen:,} rows of layer {layer}'s measured spectrum through BandwidthMonitor.observe in requests of "
          f"{request_rows}: {dt:.1f} s ({out['positions_per_second']:,.0f} rows/s)")
    print("  resident memory (rows seen -> MiB): " + ", ".join(f"{n:,} -> {r:.0f}" for n, r in marks))
    tail = [r for n, r in marks if n >= seen // 10]
    out["rss_growth_last_90pct_mib"] = tail[-1] - tail[0]
    print(f"  start {out['rss_start_mib']:.0f} MiB, end {out['rss_end_mib']:.0f} MiB ({out['rss_growth_mib']:+.1f} MiB; "
          f"{out['rss_growth_last_90pct_mib']:+.1f} MiB over the last 90 % of the rows); "
          f"the running state is {streamed.nbytes / 2**20:.2f} MiB (mean + d x d scatter, float64)")
    print(f"  streamed vs population: top-10 eigenvalues within {100 * rel:.2f} % (sampling error scale "
          f"sqrt(2/n) = {100 * out['expected_rel_err_scale']:.2f} %); r95 {out['r95_streamed']} vs "
          f"{out['r95_population']}; participation ratio {out['pr_streamed']:.3f} vs {out['pr_population']:.3f}")
    return out


def bare_accumulator(mean, lam, vec, positions: int, request_rows: int, seed: int) -> dict:
    draw = gaussian_sampler(mean, lam, vec, seed)
    acc = StreamingMoments(mean.shape[0])
    rows = [draw(request_rows) for _ in range(8)]
    start = rss_mib()
    t0 = time.perf_counter()
    seen = 0
    while seen < positions:
        acc.update(rows[(seen // request_rows) % len(rows)])  # re-use 8 drawn chunks: times the update only
        seen += request_rows
    dt = time.perf_counter() - t0
    out = {"positions": seen, "seconds": dt, "positions_per_second": seen / dt,
           "rss_start_mib": start, "rss_end_mib": rss_mib()}
    print(f"  bare StreamingMoments.update, {seen:,} rows in chunks of {request_rows}: {dt:.1f} s "
          f"({out['positions_per_second']:,.0f} rows/s); memory {start:.0f} -> {out['rss_end_mib']:.0f} MiB")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=2**20, help="synthetic rows (default 2**20)")
    ap.add_argument("--model-positions", type=int, default=16384, help="model-generated positions")
    ap.add_argument("--request-rows", type=int, default=1024, help="rows per synthetic request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.positions < 2 * args.request_rows or args.model_positions < 256:
        ap.error("--positions must be >= 2 * --request-rows and --model-positions >= 256")
    m = machine()
    print("machine:", describe_machine(m))
    lm = load_model("embedded")
    print("\n1. Model-generated traffic")
    model_part, monitor = model_traffic(lm, args.model_positions)
    layer = monitor.layers[len(monitor.layers) // 2]
    mean, lam, vec = population_from(monitor.traffic(layer))
    rows_measured = monitor.totals()["covariance_rows"][layer]
    monitor.close()
    print(f"\n2. Synthetic traffic with layer {layer}'s measured spectrum (from {rows_measured:,} "
          f"streamed rows; participation ratio {M.participation_ratio(lam.numpy()):.2f})")
    synth = synthetic_traffic(mean, lam, vec, layer, args.positions, args.request_rows, args.seed)
    bare = bare_accumulator(mean, lam, vec, args.positions, args.request_rows, args.seed)
    out = {"machine": m, "model": model_part, "synthetic": synth, "bare_accumulator": bare, "layer": layer}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
