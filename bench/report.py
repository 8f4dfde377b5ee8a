#!/usr/bin/env python3
"""Turn run-bench's JSON into ``table.md`` and ``ratios.png`` (issue 4's benchmark report).

    python bench/report.py bench/results/DATE/results.json      # rewrites both beside it

``bench/run`` calls this after each run.  The Markdown has every workload x server (MiB/s,
ratio to the baseline, spread, CPU, server microseconds per request), the ratio matrix and
issue 4's targets for the luanbd rows.  The chart shows the ratios as bars (medians) with the
passes as dots, so noise is visible next to each bar.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

#: Issue 4's targets are checked for every server whose name starts with "luanbd".
TARGETS_NOTE = ("The memory target (RSS with 64 idle connections) is not measured by "
                "run-bench.")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _row(summary: list[dict], server: str, workload: str) -> dict | None:
    return next((r for r in summary
                 if r["server"] == server and r["workload"] == workload), None)


def _ok(row: dict | None) -> bool:
    return row is not None and row.get("mib_s") is not None


def pass_ratios(doc: dict) -> dict[tuple[str, str], list[float]]:
    """Ratio of each pass of each (server, workload) to the baseline's median."""
    base = doc["settings"]["baseline"]
    out: dict[tuple[str, str], list[float]] = {}
    for r in doc["runs"]:
        b = _row(doc["summary"], base, r["workload"])
        if r.get("mib_s") is None or not _ok(b):
            continue
        assert b is not None
        out.setdefault((r["server"], r["workload"]), []).append(r["mib_s"] / b["mib_s"])
    return out


def target_checks(doc: dict, server: str) -> list[tuple[str, str, str]]:
    """(target, measured, met?) rows of issue 4's targets for one luanbd server."""
    summary = doc["summary"]
    base = doc["settings"]["baseline"]
    rows: list[tuple[str, str, str]] = []

    def ratio_target(wl: str, want: float, extra: str = "") -> None:
        r = _row(summary, server, wl)
        if r is None:
            return
        if not _ok(r) or r.get("ratio") is None:
            rows.append((f"{wl}: ratio >= {want:g}{extra}", "failed", "**no**"))
            return
        rows.append((f"{wl}: ratio >= {want:g}", f"{r['ratio']:.2f}x",
                     "yes" if r["ratio"] >= want else "**no**"))

    ratio_target("4k-randread-qd1", 1.0)
    ratio_target("4k-randwrite-qd1", 1.0)
    ratio_target("4k-randread-qd16", 1.0)
    r, b = _row(summary, server, "4k-randread-qd16"), _row(summary, base, "4k-randread-qd16")
    if _ok(r) and _ok(b) and r and b and r.get("server_us_per_op") and b.get("server_us_per_op"):
        rows.append((f"4k-randread-qd16: srv-us/op <= {base}'s ({b['server_us_per_op']:.1f})",
                     f"{r['server_us_per_op']:.1f}",
                     "yes" if r["server_us_per_op"] <= b["server_us_per_op"] else "**no**"))
    ratio_target("1m-seqread-qd4", 1.0)
    r, m = _row(summary, server, "1m-seqread-qd4"), _row(summary, "nbdkit-memory",
                                                         "1m-seqread-qd4")
    if _ok(r) and _ok(m) and r and m:
        frac = r["mib_s"] / m["mib_s"]
        rows.append(("1m-seqread-qd4: >= 0.5 x nbdkit-memory", f"{frac:.2f}x",
                     "yes" if frac >= 0.5 else "**no**"))
    ratio_target("1m-seqwrite-qd4", 1.0)
    ratio_target("nbdcopy-to-null", 1.5)
    return rows


def markdown(doc: dict, chart: str | None = "ratios.png") -> str:
    s = doc["settings"]
    base = s["baseline"]
    servers = [x["name"] for x in doc["servers"]]
    workloads = [w["name"] for w in doc["workloads"]]
    summary = doc["summary"]
    m = doc["machine"]
    lines = [
        f"# luanbd vs nbdkit: run of {doc['started']}",
        "",
        f"run-bench, {m['cpus']} CPUs ({m['cpu_model']}), disk {s['size'] >> 20} MiB, "
        f"{s['runtime_s']:g} s per workload (+{s['ramp_s']:g} s fio ramp), "
        f"{s['repeat']} pass(es), medians"
        + (f", pinned {s['pin']}" if s.get("pin") else "") + ". "
        f"Ratios are MiB/s relative to `{base}` in this run (above 1 is faster). "
        "Machine, versions, load and the luanbd code measured: `machine.md`. "
        "Noise: 5-30 % per cell between runs; read ../../README.md and the shared "
        "harness README before quoting a ratio.",
        "",
    ]
    if chart:
        lines += [f"![ratio to {base}]({chart})", ""]

    # Ratio matrix first: the summary a reader wants.
    lines += [f"## Ratio to {base} (median MiB/s)", "",
              "| workload | " + " | ".join(servers) + " |",
              "|---|" + "---:|" * len(servers)]
    for wl in workloads:
        cells = []
        for sv in servers:
            r = _row(summary, sv, wl)
            if r is None:
                cells.append("")
            elif not _ok(r):
                cells.append("FAILED")
            else:
                cells.append(_fmt(r.get("ratio"), ".2f") + "x")
        lines.append(f"| {wl} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## Every workload x server", "",
              "spread = (max - min) / median over the passes; srv-cpu / cli-cpu = CPU of the "
              "server / client as % of one core; srv-us/op = server CPU microseconds per "
              "request (nbdcopy: per 256 KiB request).", "",
              f"| workload | server | MiB/s | IOPS | x {base} | spread | srv-cpu | cli-cpu "
              "| srv-us/op |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for wl in workloads:
        for sv in servers:
            r = _row(summary, sv, wl)
            if r is None:
                continue
            if not _ok(r):
                why = (r.get("errors") or ["not run"])[0].replace("|", "/")[:90]
                lines.append(f"| {wl} | {sv} | FAILED: {why} | | | | | | |")
                continue
            spread = "-" if r.get("spread_pct") is None else f"{r['spread_pct']:.0f}%"
            lines.append(
                f"| {wl} | {sv} | {r['mib_s']:.1f} | {_fmt(r.get('iops'), '.0f')} "
                f"| {_fmt(r.get('ratio'), '.2f')}x | {spread} "
                f"| {r['server_cpu_pct']:.0f}% | {r['client_cpu_pct']:.0f}% "
                f"| {_fmt(r.get('server_us_per_op'), '.1f')} |")
    lines.append("")

    luanbd = [sv for sv in servers if sv.startswith("luanbd")]
    if luanbd and base == "nbdkit-lua":
        checks = {sv: target_checks(doc, sv) for sv in luanbd}
        names = [t for t, _, _ in checks[luanbd[0]]]
        lines += ["## Issue 4 targets (medians of this run)", "",
                  "| target | " + " | ".join(luanbd) + " |",
                  "|---|" + "---|" * len(luanbd)]
        for name in names:
            cells = []
            for sv in luanbd:
                hit = next((c for c in checks[sv] if c[0] == name), None)
                cells.append(f"{hit[1]} {hit[2]}" if hit else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", TARGETS_NOTE, ""]

    failed = [r for r in summary if r.get("errors")]
    if failed:
        lines += ["## Failed runs", ""]
        for r in failed:
            for e in r["errors"]:
                lines.append(f"- {r['server']} {r['workload']}: `{e}`")
        lines.append("")
    if doc.get("skipped"):
        lines += ["Skipped servers: " + "; ".join(f"{k} ({v})" for k, v in
                                                   doc["skipped"].items()), ""]
    lines += ["## Servers", ""]
    for x in doc["servers"]:
        # bench/run --commit runs a temporary `git archive` of src/: name the commit instead.
        template = re.sub(r"PYTHONPATH=\S*/luanbd-([0-9a-f]+)/src",
                          r"PYTHONPATH=<src/ of \1>", x["template"])
        lines.append(f"- `{x['name']}`: `{template}`")
    lines.append("")
    return "\n".join(lines)


def chart(doc: dict, path: Path) -> None:
    """Grouped bars of the median ratio per workload, one colour per server (the baseline
    grey); dots are the individual passes, each divided by the baseline's median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = doc["settings"]["baseline"]
    # The baseline stays in, as a grey bar at 1.0: its dots show its own noise.
    servers = [x["name"] for x in doc["servers"]]
    workloads = [w["name"] for w in doc["workloads"]]
    passes = pass_ratios(doc)
    n = max(len(servers), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(9.0, 1.6 * len(workloads) + 2), 5.2), dpi=110)
    colours = plt.get_cmap("tab10")
    top = 1.0
    for i, sv in enumerate(servers):
        xs, ys = [], []
        for j, wl in enumerate(workloads):
            x = j - 0.4 + width * (i + 0.5)
            r = _row(doc["summary"], sv, wl)
            if r is None:
                continue
            if not _ok(r) or r.get("ratio") is None:
                ax.text(x, 0.02, "failed", rotation=90, ha="center", va="bottom",
                        fontsize=7, color="red")
                continue
            xs.append(x)
            ys.append(r["ratio"])
            dots = passes.get((sv, wl), [])
            if len(dots) > 1:
                ax.plot([x] * len(dots), dots, "o", ms=2.5, color="black", alpha=0.6,
                        zorder=3)
            high = max(r["ratio"], *dots)
            ax.text(x, high + 0.02, f"{r['ratio']:.2f}", ha="center", va="bottom",
                    fontsize=6.5)
            top = max(top, high)
        colour = "0.7" if sv == base else colours(i % 10)
        ax.bar(xs, ys, width * 0.92, label=sv, color=colour)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel(f"MiB/s relative to {base} (median)")
    s = doc["settings"]
    ax.set_title(f"Ratio to {base}, {doc['started'][:10]}: {s['repeat']} pass(es) of "
                 f"{s['runtime_s']:g} s, {s['size'] >> 20} MiB disk; dots = passes",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(json_path: Path, with_chart: bool = True) -> list[Path]:
    """Write table.md (and ratios.png) beside ``json_path``; return the paths written."""
    doc: dict[str, Any] = json.loads(json_path.read_text())
    out = json_path.parent
    written = []
    if with_chart:
        chart(doc, out / "ratios.png")
        written.append(out / "ratios.png")
    (out / "table.md").write_text(markdown(doc, "ratios.png" if with_chart else None))
    written.insert(0, out / "table.md")
    return written


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="run-bench --json output")
    p.add_argument("--no-chart", action="store_true", help="write table.md only")
    args = p.parse_args(argv)
    for path in write_report(args.json, not args.no_chart):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
