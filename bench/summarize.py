"""Gather the JSON files written by the benchmark scripts into one Markdown table (``make bench``).

Reads ``<dir>/{lo1,streaming,monitor,notebook,grading,inference,explorer}.json`` (whichever exist), prints the table and
writes it to ``<dir>/summary.md``. Every number comes from those files; nothing is typed in here.

Usage: python bench/summarize.py [out/bench]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from common import describe_machine

COMMANDS = {
    "lo1": "python bench/lo1_metrics.py",
    "streaming": "python bench/streaming.py",
    "monitor": "python bench/monitor_overhead.py",
    "notebook": "python bench/notebook.py",
    "grading": "python bench/grading.py",
    "inference": "python bench/inference_speed.py --parts report",
    "explorer": "python bench/explorer.py",
}


# the scaling cases shown in the table (all of them are in lo1.json and in the script's output)
SCALING_ROWS = ((1_000, 4096), (10_000, 2048), (1_000_000, 576), (1_000_000, 768), (1_000_000, 2048),
                (100_000, 4096), (1_000_000, 4096))


def load(folder: Path) -> dict:
    return {k: json.loads((folder / f"{k}.json").read_text()) for k in COMMANDS if (folder / f"{k}.json").exists()}


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def rows(data: dict) -> list[tuple[str, str, str, str, str]]:
    """(measurement, value, target, verdict, command) rows."""
    out = []
    if "lo1" in data:
        p1 = data["lo1"]["part1"]
        s, r = p1["seconds"], p1["ratios"]
        shape = "x".join(map(str, p1["shape"]))
        cmd = COMMANDS["lo1"]
        out += [
            (f"LO1 pooled metrics, {shape}: library", f"{s['library']:.3f} s", "", "", cmd),
            ("... seed's algorithm (torch.svd + loops) / library", f"{r['seed_over_library']:.2f}x", ">= 10x",
             verdict(r["seed_over_library"] >= 10), cmd),
            ("... library / one float64 covariance pass", f"{r['library_over_floor64']:.2f}x", "<= 2x",
             verdict(r["library_over_floor64"] <= 2), cmd),
            ("... sklearn PCA(0.95, full) / library", f"{r['sklearn_over_library']:.2f}x", "", "", cmd),
            ("... seed's algorithm / float64 covariance pass (the bound on the first ratio)",
             f"{r['seed_over_floor64']:.2f}x", "", "", cmd),
            ("... per-layer report analyze_layers (26 spectra)", f"{s['library_layers']:.3f} s", "", "", cmd),
        ]
        for row in data["lo1"].get("part3", []):
            lib = row.get("library")
            if not lib or "seconds" not in lib or (row["n"], row["d"]) not in SCALING_ROWS:
                continue
            value = (f"{lib['seconds']:.2f} s, +{lib['peak_extra_mib']:.0f} MiB (input {row['input_mib']:.0f} MiB"
                     f"{', bfloat16' if row.get('dtype', 'float32') != 'float32' else ''})")
            other, seed = row.get("other", {}), row.get("seed", {})
            if "seconds" in other:
                value += f"; {row['other_path']} path {other['seconds']:.2f} s, +{other['peak_extra_mib']:.0f} MiB"
            if "seconds" in seed:
                value += (f"; seed's torch.svd {seed['seconds']:.2f} s, +{seed['peak_extra_mib']:.0f} MiB "
                          f"({seed['seconds'] / lib['seconds']:.1f}x the time, "
                          f"{seed['peak_extra_mib'] / max(lib['peak_extra_mib'], 1):.1f}x the memory)")
            out.append((f"compute_metrics, n={row['n']:,}, d={row['d']} ({row['auto_path']} path)", value, "", "", cmd))
    if "streaming" in data:
        st = data["streaming"]["synthetic"]
        md = data["streaming"]["model"]
        cmd = COMMANDS["streaming"]
        out += [
            (f"Monitor statistics over {st['positions']:,} positions (synthetic, model's spectrum)",
             f"{st['seconds']:.1f} s, {st['positions_per_second']:,.0f} rows/s", "", "", cmd),
            ("... resident memory start -> end", f"{st['rss_start_mib']:.0f} -> {st['rss_end_mib']:.0f} MiB "
             f"({st['rss_growth_last_90pct_mib']:+.1f} MiB over the last 90 %)", "constant", 
             verdict(abs(st["rss_growth_last_90pct_mib"]) < 16), cmd),
            (f"... model-generated positions ({md['positions']:,})",
             f"{md['positions_per_second']:.0f} positions/s, {md['rss_after_first_batch_mib']:.0f} -> "
             f"{md['rss_end_mib']:.0f} MiB", "", "", cmd),
        ]
    if "monitor" in data:
        cmd = COMMANDS["monitor"]
        for cfg in data["monitor"]["configs"]:
            for r in cfg["results"]:
                out.append((f"Monitor overhead [{cfg['config']['label']}], batch {r['batch_size']}",
                            f"{100 * r['overhead_paired_median']:+.1f} % (paired median; ratio of medians "
                            f"{100 * r['overhead_median']:+.1f} %)",
                            "<= 3 %" if cfg["config"]["label"] == "default" else "",
                            verdict(r["overhead_paired_median"] <= 0.03) if cfg["config"]["label"] == "default" else "",
                            cmd))
    if "inference" in data:   # the default precision and float32 side by side, per size
        for r in data["inference"].get("report", []):
            def ratio(k):
                return f"{r[k]['over_blocks_floor']:.2f}x ({r[k]['over_whole_floor']:.2f}x)"
            out.append((f"Per-layer report, {r['tokens']:,} tokens, / floor (forward through the blocks; whole "
                        "model): stored float64 ; stored float32 ; streamed float32",
                        f"{ratio('stored')} ; {ratio('stored32')} ; {ratio('streamed32')}", "", "",
                        COMMANDS["inference"]))
    if "explorer" in data:
        ex, cmd = data["explorer"], COMMANDS["explorer"]
        out += [("Explorer, layer step to a view rendered ahead (kernel side, p95 of 20)",
                 f"{ex['ahead_p95_ms']:.1f} ms", f"<= {ex['target_ms']} ms in the browser",
                 verdict(ex["ahead_p95_ms"] <= ex["target_ms"]), cmd),
                ("... a setting drawn now (threshold far away; p95 of 5)", f"{ex['drawn_p95_ms']:.0f} ms", "", "", cmd),
                (f"... rendering every neighbour ahead ({ex['layers']} layers)",
                 f"{ex['render_ahead_seconds']:.1f} s in the background", "", "", cmd)]
    if "notebook" in data:
        nb = data["notebook"]
        out.append(("Lesson notebook, papermill, embedded model", f"{nb['best_seconds']:.1f} s", "< 90 s",
                    verdict(nb["best_seconds"] < 90), COMMANDS["notebook"]))
        first = nb.get("solutions", {}).get("first_figure_seconds")
        if first is not None:
            out.append(("... first figure, seconds of code after the set-up cell", f"{first:.1f} s", "<= 15 s",
                        verdict(first <= 15), COMMANDS["notebook"]))
    if "grading" in data:
        g = data["grading"]
        cmd = COMMANDS["grading"]
        if "fast_serial" in g:
            out.append((f"Grading, fast mode, serial ({g['n']} submissions)",
                        f"{g['fast_serial']['per_submission']:.1f} s/submission", "<= 20 s",
                        verdict(g["fast_serial"]["per_submission"] <= 20), cmd))
        if "fast_jobs2" in g:
            out.append(("... fast mode, --jobs 2", f"{g['fast_jobs2']['per_submission']:.1f} s/submission", "", "", cmd))
        if "full_serial" in g:
            out.append((f"... full mode, serial ({g['full_serial']['n']} submissions)",
                        f"{g['full_serial']['per_submission']:.1f} s/submission", "", "", cmd))
    return out


def table(data: dict) -> str:
    lines = ["| Measurement | Measured | Target | | Command |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | `{e}` |" for a, b, c, d, e in rows(data)]
    machines = {k: v["machine"] for k, v in data.items() if isinstance(v, dict) and "machine" in v
                and isinstance(v["machine"], dict) and "cpu" in v["machine"]}
    if machines:
        lines += ["", "Machine (per script): "]
        lines += [f"- {k}: {describe_machine(m)}" for k, m in machines.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    folder = Path((argv or sys.argv[1:] or ["out/bench"])[0])
    data = load(folder)
    if not data:
        raise SystemExit(f"no benchmark results in {folder}; run `make bench` first")
    text = table(data)
    print(text)
    (folder / "summary.md").write_text(text)
    print(f"wrote {folder / 'summary.md'}")


if __name__ == "__main__":
    main()
