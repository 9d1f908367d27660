"""Benchmark: LO1 metrics on a GPT-2-sized stack vs the seed's algorithm, sklearn and the covariance floor.

Prints measured times and ratios taken in one run (``make bench``). Not a test: the numbers depend
on the machine. Parts:

1. A 13-layer x 1024-position x 768-dimension stack (GPT-2 small's shape), with a power-law spectrum
   and a massive activation at position 0, as the embedded model has. Timed:
   - the seed lesson's algorithm, re-implemented faithfully (``torch.svd`` of the pooled matrix,
     cumulative sigma, its basis-slice "subspace" projections, and its per-position Python loop
     over the first 50 positions of every layer computing PR(|x|));
   - this library: ``ResidualBandwidthAnalyzer.analyze_effective_bandwidth`` (pooled metrics with
     massive-position detection) and the per-layer report ``analyze_layers``;
   - ``sklearn.decomposition.PCA(n_components=0.95, svd_solver="full")``;
   - the floor: one pass forming the centred d x d covariance (float64, the precision the library
     uses; float32 shown too).
2. Scaling with positions n and d_model: time and peak resident memory of ``compute_metrics``.

Usage: python bench/lo1_metrics.py [--quick]
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
import torch

from residual_bandwidth import ResidualBandwidthAnalyzer, compute_metrics


def stack(layers=13, n=1024, d=768, seed=0) -> list[torch.Tensor]:
    """Synthetic residual stack: power-law spectrum (lambda_i ~ i^-1.2), a shared mean, one massive row."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, d + 1, dtype=torch.float32) ** -0.6
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    out = []
    for _ in range(layers):
        x = (torch.randn(n, d, generator=g) * scales) @ basis.T + 0.5 * torch.randn(d, generator=g)
        x[0] = 0.0
        x[0, 7] = 100.0 * float(x[1:].norm(dim=1).median())
        out.append(x)
    return out


def seed_algorithm(states: list[torch.Tensor]) -> int:
    """The seed lesson's analyze_effective_bandwidth + detect_bandwidth_bottlenecks, as written."""
    all_states = torch.cat(states, dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        U, S, V = torch.svd(all_states)
    cumulative = torch.cumsum(S, dim=0)
    rank = int(torch.sum(cumulative < 0.95 * torch.sum(S)).item()) + 1
    p = S / torch.sum(S)
    _ = -torch.sum(p * torch.log(p + 1e-8))
    d = all_states.shape[1]
    size = d // 5
    for i in range(5):  # its basis-aligned "subspaces": rows of V
        comp = V[i * size:(i + 1) * size, :]
        proj = torch.mm(all_states, comp.T)
        _ = torch.var(proj, dim=0).sum().item() / torch.var(all_states, dim=0).sum().item()
    flagged = 0
    for state in states:  # its per-position loop over the first 50 positions
        for pos in range(min(state.shape[0], 50)):
            a = torch.abs(state[pos, :])
            pr = (torch.sum(a) ** 2) / torch.sum(a ** 2)
            if pr / d > 0.8:
                flagged += 1
                torch.topk(a, 5)
    return rank


def covariance_floor(states, dtype) -> torch.Tensor:
    x = torch.cat(states).to(dtype)
    c = x - x.mean(0)
    return c.T @ c


def best_of(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_memory(fn) -> tuple[float, float]:
    """(seconds, peak resident memory above the starting RSS in MiB), sampled every 2 ms.

    tracemalloc would miss torch's allocator, so we watch the process RSS instead."""
    import threading
    import psutil
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    done.set()
    t.join()
    return dt, (max(peak[0], proc.memory_info().rss) - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller scaling grid")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, numpy {np.__version__}")

    states = stack()
    pooled = torch.cat(states)
    print(f"\n1. LO1 metrics on {len(states)} layers x {states[0].shape[0]} positions x {states[0].shape[1]} "
          f"({pooled.shape[0]} x {pooled.shape[1]} pooled)")
    an = ResidualBandwidthAnalyzer()
    from sklearn.decomposition import PCA
    rows = {
        "seed algorithm (torch.svd + loops)": lambda: seed_algorithm(states),
        "library: pooled metrics (analyze_effective_bandwidth)": lambda: an.analyze_effective_bandwidth(states),
        "library: per-layer report (analyze_layers)": lambda: an.analyze_layers(states),
        "sklearn PCA(0.95, full)": lambda: PCA(n_components=0.95, svd_solver="full").fit(pooled.numpy()),
        "floor: centred covariance pass, float64": lambda: covariance_floor(states, torch.float64),
        "floor: centred covariance pass, float32": lambda: covariance_floor(states, torch.float32),
    }
    times = {k: best_of(f) for k, f in rows.items()}
    lib = times["library: pooled metrics (analyze_effective_bandwidth)"]
    for k, t in times.items():
        print(f"  {k:<56} {t:8.3f} s   {t / lib:6.2f}x library")
    print(f"  => seed / library = {times['seed algorithm (torch.svd + loops)'] / lib:.1f}x (target >= 10x); "
          f"library / float64 covariance floor = {lib / times['floor: centred covariance pass, float64']:.2f}x "
          f"(target <= 2x)")

    print("\n2. Scaling of compute_metrics (time, peak RSS above the input)")
    grid = [(n, d) for d in (576, 768) for n in (1_000, 10_000, 100_000, 1_000_000)]
    grid += [(n, d) for d in (2048, 4096) for n in (1_000, 10_000, 100_000)]
    if args.quick:
        grid = [(n, d) for n, d in grid if n * d <= 10_000 * 2048]
    g = torch.Generator().manual_seed(1)
    for n, d in grid:
        x = torch.randn(n, d, generator=g)
        input_mib = x.numel() * 4 / 2**20
        dt, peak = peak_memory(lambda: compute_metrics(x))
        print(f"  n={n:>9,} d={d:>5}  {dt:8.3f} s  peak extra {peak:8.1f} MiB (input {input_mib:8.1f} MiB)"
              f"  path: {'d x d covariance' if n >= d else 'n x n Gram'}")
        del x


if __name__ == "__main__":
    main()
