"""Benchmark: forward latency of the embedded model with and without the bandwidth monitor.

Not a test (no pass/fail): it prints the measured overhead so the default configuration of
:class:`residual_bandwidth.monitor.BandwidthMonitor` can be chosen and documented.

Method
------
For each batch size, the same tokenised batch is run ``--reps`` times *with* and ``--reps`` times
*without* the monitor, interleaved (A B B A A B ...) so that drift in machine load (other processes
on a shared CPU) hits both arms equally. The monitor stays constructed; it is attached before each
"with" run and detached after it (attach/detach are not timed). Reported per batch size:

* median latency of each arm and ``overhead = median(with) / median(without) - 1``;
* the median of the paired ratios ``with_i / without_i - 1`` (pairs are adjacent runs);
* the same ratio of medians for the process CPU time (all threads) of each forward: less sensitive
  to being descheduled on a shared machine, more sensitive to OpenMP spin-waiting;
* the monitor's own time per request (``processing_seconds`` of its records: the work done after
  the forward pass; its mean includes the requests that run a buffered d x d update), as a share
  of the median plain latency: a lower-noise view of the same cost (it leaves out the hooks' row
  copies, which are small).

Usage::

    python bench/monitor_overhead.py                      # default configuration, batch 1 and 8
    python bench/monitor_overhead.py --layers all --max-positions 0   # everything, for comparison
    python bench/monitor_overhead.py --json out.json

On a shared machine the numbers move by a few percent between runs; run it on an idle machine
for numbers to quote, and read the paired and processing-time estimates beside the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from common import describe_machine, machine as describe

from residual_bandwidth import load_model
from residual_bandwidth.monitor import BandwidthMonitor, MonitorConfig

PROMPTS = [
    "The transformer architecture revolutionized natural language processing by introducing attention.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b",
    "Water boils at one hundred degrees Celsius at sea level.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She opened the door, looked outside, and saw that it was snowing.",
    "Prime numbers have exactly two distinct positive divisors.",
]


def parse_layers(text: str):
    if text in ("default", ""):
        return None
    if text == "all":
        return "all"
    return [int(t) for t in text.split(",")]


@torch.no_grad()
def bench_batch(model, enc, monitor: BandwidthMonitor, reps: int, warmup: int) -> dict:
    cpu: list[float] = []

    def run():
        c, t = time.process_time(), time.perf_counter()
        model(**enc, use_cache=False)
        wall = time.perf_counter() - t
        cpu.append(time.process_time() - c)
        return wall

    for _ in range(warmup):
        run()
        with monitor:
            run()
    base, mon = [], []
    last = monitor.history[-1].request if monitor.history else 0
    cpu.clear()
    cpu_base, cpu_mon = [], []
    for i in range(reps):
        order = ("plain", "monitored") if i % 2 == 0 else ("monitored", "plain")
        for arm in order:
            if arm == "plain":
                base.append(run())
                cpu_base.append(cpu[-1])
            else:
                monitor.attach()
                try:
                    mon.append(run())
                finally:
                    monitor.detach()
                cpu_mon.append(cpu[-1])
    proc = [r.processing_seconds for r in monitor.history if r.request > last]
    mb, mm = statistics.median(base), statistics.median(mon)
    paired = statistics.median(m / b - 1 for b, m in zip(base, mon))
    return {
        "batch_size": int(enc["input_ids"].shape[0]),
        "tokens_per_prompt_max": int(enc["input_ids"].shape[1]),
        "real_tokens": int(enc["attention_mask"].sum()),
        "reps": reps,
        "median_plain_ms": 1e3 * mb,
        "median_monitored_ms": 1e3 * mm,
        "overhead_median": mm / mb - 1,
        "overhead_mean": statistics.fmean(mon) / statistics.fmean(base) - 1,
        "overhead_paired_median": paired,
        "cpu_plain_ms_median": 1e3 * statistics.median(cpu_base),
        "cpu_monitored_ms_median": 1e3 * statistics.median(cpu_mon),
        "overhead_cpu_time": statistics.median(cpu_mon) / statistics.median(cpu_base) - 1,
        "monitor_processing_ms_median": 1e3 * statistics.median(proc),
        "monitor_processing_ms_mean": 1e3 * statistics.fmean(proc),
        "processing_share_of_plain": statistics.fmean(proc) / mb,
    }


def make_monitor(model, layers, max_positions, min_tokens_for_rank) -> BandwidthMonitor:
    kw = {} if max_positions is None else {"max_positions": max_positions or None}
    return BandwidthMonitor(model, layers=layers, config=MonitorConfig(
        min_tokens_for_rank=min_tokens_for_rank, history_size=10_000, **kw))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", default="default", help="'default', 'all' or e.g. '7,14,21,29'")
    ap.add_argument("--max-positions", type=int, default=None,
                    help="rows sampled per request and layer (default: the monitor's; 0 = all rows)")
    ap.add_argument("--min-tokens-for-rank", type=int, default=8)
    ap.add_argument("--compare", action="store_true",
                    help="also measure all layers, and all layers with every position, for comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    configs = [("requested" if (args.layers != "default" or args.max_positions is not None) else "default",
                parse_layers(args.layers), args.max_positions)]
    if args.compare:
        configs += [("all layers", "all", None), ("all layers, all positions", "all", 0)]
    machine = {**describe(), "model": lm.name}
    machine["load_average_before"] = machine["load_average"]
    print("machine:", describe_machine(machine), "| model:", lm.name)
    out = {"machine": machine, "configs": []}
    for label, layers, max_pos in configs:
        monitor = make_monitor(model, layers, max_pos, args.min_tokens_for_rank)
        monitor.attach()  # resolves the layer list
        config = {"label": label, "kind": monitor.kind, "layers": monitor.layers,
                  "max_positions": monitor.config.max_positions,
                  "min_tokens_for_rank": monitor.config.min_tokens_for_rank,
                  "exclude_massive": monitor.config.exclude_massive,
                  "eigenvalues": "lazy (traffic_summary / recommendations / scrape only)",
                  "logging": "off", "thresholds": monitor.thresholds}
        monitor.detach()
        print(f"\nconfiguration [{label}]: " + json.dumps(config, default=str))
        results = []
        for b in (int(x) for x in args.batch_sizes.split(",")):
            batch = PROMPTS[:b] if b <= len(PROMPTS) else (PROMPTS * (b // len(PROMPTS) + 1))[:b]
            enc = tok(batch, return_tensors="pt", padding=True)
            r = bench_batch(model, dict(enc), monitor, args.reps, args.warmup)
            results.append(r)
            print(f"  batch {r['batch_size']} ({r['real_tokens']} real tokens, {r['reps']} reps): plain "
                  f"{r['median_plain_ms']:.1f} ms, monitored {r['median_monitored_ms']:.1f} ms -> overhead "
                  f"{100 * r['overhead_median']:+.2f} % (ratio of medians), "
                  f"{100 * r['overhead_mean']:+.2f} % (ratio of means), "
                  f"{100 * r['overhead_paired_median']:+.2f} % (median of paired ratios), "
                  f"{100 * r['overhead_cpu_time']:+.2f} % (process CPU time); monitor "
                  f"processing {r['monitor_processing_ms_mean']:.2f} ms mean "
                  f"({r['monitor_processing_ms_median']:.2f} median) = "
                  f"{100 * r['processing_share_of_plain']:.2f} % of the median plain forward")
        monitor.close()
        out["configs"].append({"config": config, "results": results})
    machine["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nload average before/after: {machine['load_average_before']} / {machine['load_average_after']}"
          f" on {os.cpu_count()} CPUs (other processes on this CPU inflate the noise)")
    print("target: <= 3 % overhead with the default configuration")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
