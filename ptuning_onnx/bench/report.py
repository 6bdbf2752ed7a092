"""Medians, ratios (ours / each contender: below 1 means ours is faster or smaller), issue 8's goals, and the
Markdown table, JSON file and PNG chart that show them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from .workloads import OURS

GEN_METRICS = ("total_ms", "ttft_ms", "per_token_ms")
CLS_METRICS = ("ms",)
COLD_METRICS = ("total_ms", "peak_rss_mb")


def medians(samples: dict) -> dict:
    """``{contender: [{metric: value}, ...]}`` -> ``{contender: {metric: median}}``."""
    return {name: {m: statistics.median(s[m] for s in rows) for m in rows[0]} for name, rows in samples.items()
            if rows}


def ratios(meds: dict, metrics) -> dict:
    """``{ours variant: {other contender: {metric: ours / other}}}`` for every variant and contender measured."""
    out = {}
    for ours in (n for n in OURS if n in meds):
        out[ours] = {other: {m: meds[ours][m] / meds[other][m] for m in metrics
                             if m in meds[ours] and meds[other].get(m)}
                     for other in meds if other != ours}
    return out


# ---------------------------------------------------------------- goals (issue 8)

# (what, limit, [(workload, batch index, new-tokens index or None, ours, contender, metric)])
GOALS = [
    ("generate, ours fp32 / PEFT", 0.50,
     [("gpt2", b, 0, "ours-fp32", "peft", "total_ms") for b in (0, -1)]),
    ("each further token, ours fp32 / onnxruntime-genai fp32", 0.70,
     [("llama", 0, n, "ours-fp32", "genai-fp32", "per_token_ms") for n in (0, -1)]),
    ("each further token, ours int4 / onnxruntime-genai int4", 0.80,
     [("llama", b, n, "ours-int4", "genai-int4", "per_token_ms") for b in (0, -1) for n in (0, -1)]),
    ("whole generation, ours int4 with prompt / onnxruntime-genai int4 base without prompt", 0.75,
     [("llama", 0, -1, "ours-int4", "genai-int4", "total_ms")]),
    ("time to first token, ours / onnxruntime-genai, same precision", 0.50,
     [("llama", b, 0, f"ours-{p}", f"genai-{p}", "ttft_ms") for p in ("fp32", "int4") for b in (0, -1)]),
    ("generate, ours int4 / PEFT fp32", 0.20,
     [("llama", b, 0, "ours-int4", "peft", "total_ms") for b in (0, -1)]),
    ("classify fp32, ours / PEFT", 0.35, [("minilm", 0, None, "ours-fp32", "peft", "ms")]),
    ("classify fp32, ours / PEFT", 0.70, [("minilm", -1, None, "ours-fp32", "peft", "ms")]),
    ("classify int8, ours / PEFT", 0.45, [("minilm", -1, None, "ours-int8", "peft", "ms")]),
    ("export time with checks, ours (parity) / optimum main_export (validation)", 1.2,
     [("export", None, None, "ours", "optimum", "seconds")]),
]
NOT_MEASURED = [("classify int8, accuracy drop on the trained demo's held-out split", "<= 1 point",
                 "not measured by ptuning-bench (it needs the demo's trained adapter): run "
                 "tools/quantized_accuracy.py")]


def _cell(results: dict, workload: str, b: Optional[int], n: Optional[int]):
    wl = results["workloads"].get(workload)
    if wl is None or "cells" not in wl:
        return None, None
    desc = wl["description"]
    batch = desc["batches"][b]
    new = desc["new_tokens"][n] if n is not None else None
    for cell in wl["cells"]:
        if cell["batch"] == batch and cell.get("new_tokens") == new:
            where = f"{workload}, batch {batch}" + (f", {desc['prompt_tokens']}+{new}" if new else
                                                    f", {desc['prompt_tokens']} tokens")
            return cell, where
    return None, None


def goals(results: dict) -> list:
    rows = []
    for what, limit, cells in GOALS:
        for workload, b, n, ours, other, metric in cells:
            if workload == "export":
                ex = results["workloads"].get("export", {})
                value = ex.get("ratio")
                where = ex.get("model", "export")
            else:
                cell, where = _cell(results, workload, b, n)
                value = ((cell or {}).get("ratios", {}).get(ours, {}).get(other, {}).get(metric))
                where = where or workload
            status = "not measured" if value is None else ("pass" if value <= limit else "miss")
            if workload != "export":
                where = f"{where}; {ours} / {other}"
            row = {"goal": what, "where": where, "metric": metric, "limit": limit, "measured": value,
                   "status": status, "ours": ours, "contender": other}
            if value is None and any(r["goal"] == what and r["where"] == where for r in rows):
                continue  # a workload that did not run: one row per goal, not one per cell
            rows.append(row)
    for what, limit, why in NOT_MEASURED:
        rows.append({"goal": what, "where": "minilm", "metric": "accuracy", "limit": limit, "measured": None,
                     "status": "not measured", "note": why})
    return rows


# ---------------------------------------------------------------- Markdown

def _f(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio_cell(ratio: dict, metrics) -> str:
    if not ratio:
        return "-"
    return " · ".join(_f(ratio.get(m), 2) for m in metrics)


def _contender_table(wl: dict) -> list:
    lines = ["| contender | what | build (s) | load (ms) | peak RSS (MB) | status |", "|---|---|---:|---:|---:|---|"]
    for name, c in wl["contenders"].items():
        status = "ok" if c["status"] == "ok" else f"{c['status']}: {c.get('reason', '')}"
        lines.append(f"| {name} | {c.get('what', '')} | {_f(c.get('build_s'))} | {_f(c.get('load_ms'), 0)} | "
                     f"{_f(c.get('peak_rss_mb'), 0)} | {status} |")
    return lines


def _workload_md(name: str, wl: dict) -> list:
    desc = wl["description"]
    out = [f"### {name}: {desc['title']}, {desc['num_virtual_tokens']} virtual tokens, "
           f"{desc['prompt_tokens']} {'prompt ' if desc['kind'] == 'generate' else ''}tokens", ""]
    ours = [n for n in OURS if n in wl["contenders"]]
    if desc["kind"] == "generate":
        out.append("Medians in ms; ratio columns: ours / that row, as whole · first token · each further token.")
        out.append("")
        head = "| batch | new | contender | whole | first token | further token | " + \
            " | ".join(f"{o} / it" for o in ours) + " |"
        out += [head, "|" + "---:|" * 2 + "---|" + "---:|" * (3 + len(ours))]
        for cell in wl["cells"]:
            for c, m in cell["medians"].items():
                rs = [_ratio_cell(cell["ratios"].get(o, {}).get(c), GEN_METRICS) if o != c else "1" for o in ours]
                out.append(f"| {cell['batch']} | {cell['new_tokens']} | {c} | {_f(m['total_ms'])} | "
                           f"{_f(m['ttft_ms'])} | {_f(m['per_token_ms'], 2)} | " + " | ".join(rs) + " |")
    else:
        out += ["Medians in ms of one forward; ratio columns: ours / that row.", ""]
        out += ["| batch | contender | forward | " + " | ".join(f"{o} / it" for o in ours) + " |",
                "|---:|---|---:|" + "---:|" * len(ours)]
        for cell in wl["cells"]:
            for c, m in cell["medians"].items():
                rs = [_ratio_cell(cell["ratios"].get(o, {}).get(c), CLS_METRICS) if o != c else "1" for o in ours]
                out.append(f"| {cell['batch']} | {c} | {_f(m['ms'])} | " + " | ".join(rs) + " |")
    notes = [f"{cell['batch']}x{cell.get('new_tokens', '')}: {k} {v}" for cell in wl["cells"]
             for k, v in cell.get("agreement", {}).items()]
    if notes:
        out += ["", "Same outputs? " + "; ".join(notes)]
    return out + [""] + _contender_table(wl) + [""]


def _export_md(ex: dict) -> list:
    if "ratio" not in ex:
        return [f"### export: not measured ({ex.get('reason', '')})", ""]
    return [f"### export time: {ex['model']}, whole processes, {len(ex['pairs'])} pairs after a warm-up pair", "",
            "| ptuning-export with parity (s) | optimum main_export with validation (s) | ours / optimum "
            "(median of pairs, min-max) |", "|---:|---:|---|",
            f"| {ex['medians']['ours']:.1f} | {ex['medians']['optimum']:.1f} | {ex['ratio']:.2f} "
            f"({min(ex['pair_ratios']):.2f}-{max(ex['pair_ratios']):.2f}) |", ""]


def _cold_md(cold: dict) -> list:
    if "medians" not in cold:
        return [f"### cold start: not measured ({cold.get('reason', '')})", ""]
    ours = [n for n in OURS if n in cold["medians"]]
    out = [f"### cold start: {cold['model']}, import + load in a fresh process, medians of {cold['repeats']}", "",
           "Ratio columns: ours / that row, as import+load time · peak RSS.", "",
           "| contender | import (ms) | load (ms) | import + load (ms) | peak RSS (MB) | " +
           " | ".join(f"{o} / it" for o in ours) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(ours)]
    for c, m in cold["medians"].items():
        rs = [_ratio_cell(cold["ratios"].get(o, {}).get(c), COLD_METRICS) if o != c else "1" for o in ours]
        out.append(f"| {c} | {_f(m['import_ms'], 0)} | {_f(m['load_ms'], 0)} | {_f(m['total_ms'], 0)} | "
                   f"{_f(m['peak_rss_mb'], 0)} | " + " | ".join(rs) + " |")
    for c, why in cold.get("unavailable", {}).items():
        out.append(f"| {c} | - | - | - | - | unavailable: {why} |")
    return out + [""]


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"## ptuning-bench{' --quick (tiny models: a smoke run, not a measurement)' if meta['quick'] else ''}",
           "", f"{meta['machine']}; {meta['threads']} threads for every contender; medians of {meta['repeats']} "
           f"interleaved rounds after a warm-up; load average {meta['load_before']:.2f} before, "
           f"{meta.get('load_after', 0):.2f} after; {meta['versions']}", ""]
    for name, wl in results["workloads"].items():
        if name == "export":
            out += _export_md(wl)
        elif name == "cold":
            out += _cold_md(wl)
        elif "reason" in wl:
            out += [f"### {name}: not measured ({wl['reason']})", ""]
        else:
            out += _workload_md(name, wl)
    out += ["### goals (issue 8)", "", "| goal | where | limit | measured | result |", "|---|---|---:|---:|---|"]
    for g in results["goals"]:
        limit = g["limit"] if isinstance(g["limit"], str) else f"<= {g['limit']:.2f}"
        out.append(f"| {g['goal']} | {g['where']} | {limit} | {_f(g['measured'], 2)} | "
                   f"{g['status']}{': ' + g['note'] if g.get('note') else ''} |")
    return "\n".join(out) + "\n"


def write_json(results: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")


# ---------------------------------------------------------------- PNG

def write_png(results: dict, path: Path) -> bool:
    """Ratio bars per workload (whole time, ours / each contender) and the goals; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(n, wl) for n, wl in results["workloads"].items() if "cells" in wl]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(14, 3.4 * (len(panels) + 1)), squeeze=False)
    for ax, (name, wl) in zip(axes[:-1, 0], panels, strict=True):
        metric = "total_ms" if wl["description"]["kind"] == "generate" else "ms"
        labels, groups = [], {o: [] for o in OURS}
        for cell in wl["cells"]:
            for other in cell["medians"]:
                if other in OURS:
                    continue
                labels.append(f"b{cell['batch']}" + (f"+{cell['new_tokens']}" if "new_tokens" in cell else "") +
                              f"\n{other}")
                for o in OURS:
                    groups[o].append(cell["ratios"].get(o, {}).get(other, {}).get(metric, float("nan")))
        width = 0.8 / len(OURS)
        for i, o in enumerate(OURS):
            ax.bar([x + i * width for x in range(len(labels))], groups[o], width, label=o)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # ratios: 0.5 and 2 are equally far from 1
        ax.set_xticks([x + width for x in range(len(labels))], labels, fontsize=6)
        ax.set_ylabel("ours / it")
        ax.set_title(f"{name}: {wl['description']['title']} (below 1: ours faster)", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[-1, 0]
    rows = [g for g in results["goals"] if g["measured"] is not None]
    ax.barh(range(len(rows)), [g["measured"] for g in rows],
            color=["tab:green" if g["status"] == "pass" else "tab:red" for g in rows])
    ax.scatter([g["limit"] for g in rows], range(len(rows)), marker="|", s=200, color="black", label="goal")
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=0.6)
    short = {"total_ms": "whole", "ttft_ms": "first token", "per_token_ms": "further token", "ms": "forward",
             "seconds": "export time"}
    ax.set_yticks(range(len(rows)), [f"{g['ours']} / {g['contender']}: {short.get(g['metric'], g['metric'])}, "
                                     f"{g['where'].split(';')[0][:34]}" for g in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_title("issue 8 goals: measured ratio (green pass, red miss) and the goal", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
