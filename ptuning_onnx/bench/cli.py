"""``ptuning-bench``: our runtime against PEFT, optimum and onnxruntime-genai, interleaved in one run, as ratios.

    ptuning-bench --work ~/.cache/ptuning-bench --json bench.json --png bench.png   # full sizes, ~45 min on 2 cores
    ptuning-bench --quick --json quick.json                                          # tiny models: a smoke run

Workloads (``--workloads``, default all): ``llama`` (Llama-125M shape), ``gpt2`` (GPT-2-small shape), ``minilm``
(all-MiniLM-L6-v2 seq-cls), ``export`` (ptuning-export with parity against optimum's main_export), ``cold``
(import + load in a fresh process). Every contender runs in its own worker process, with the same thread count;
one warm-up call each, then ``--repeats`` rounds in rotating order. Medians, and ratios ours / each contender.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..cli._common import run_cli
from ..errors import ConfigError
from . import artifacts, report
from .contenders import cold_start_code
from .worker import PAUSE_S, Worker, WorkerError, round_robin, run_timed
from .workloads import OURS, WORKLOADS, Workload, build_adapter, build_base, plan


def _say(message: str) -> None:
    print(f"[ptuning-bench] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptuning-bench", description=__doc__.split("\n")[0].split(":", 1)[1].strip())
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from: {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--repeats", type=int, help="timed rounds after the warm-up (default 5; --quick: 1)")
    p.add_argument("--export-pairs", type=int, help="timed export pairs after a warm-up pair (default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="tiny models from models/, small sizes: a smoke run")
    p.add_argument("--threads", type=int, default=2, help="threads for every contender (default 2)")
    p.add_argument("--work", type=Path, help="keep built models and exports here and reuse them on the next run "
                                             "(default: a temporary folder, removed afterwards)")
    p.add_argument("--json", type=Path, help="write every sample, median, ratio and goal here")
    p.add_argument("--png", type=Path, help="write a chart of the ratios and goals here (needs matplotlib)")
    return p


@run_cli
def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    selected = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(selected) - set(WORKLOADS))
    if unknown or not selected:
        raise ConfigError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; expected: "
                          f"{', '.join(WORKLOADS)}")
    for name in ("repeats", "export_pairs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    repeats = args.repeats or (1 if args.quick else 5)
    pairs = args.export_pairs or (1 if args.quick else 3)
    work = args.work or Path(tempfile.mkdtemp(prefix="ptuning-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run(plan(args.quick, args.threads), selected, work, repeats, pairs)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(report.markdown(results))
    if args.json:
        report.write_json(results, args.json)
        _say(f"wrote {args.json}")
    if args.png:
        _say(f"wrote {args.png}" if report.write_png(results, args.png) else
             "no PNG: matplotlib is not installed (pip install matplotlib)")
    return 0


def run(p, selected: list, work: Path, repeats: int, pairs: int) -> dict:
    results = {"meta": _meta(p, repeats), "workloads": {}}
    if p.quick:
        import torch

        # Builds run in this process. Tiny models gain nothing from a second thread, and on a busy machine
        # torch's spinning OpenMP threads made a tiny export 5x slower (1.2 s vs 6-7 s at load average 6).
        torch.set_num_threads(1)
    for name in ("llama", "gpt2", "minilm"):
        if name in selected:
            results["workloads"][name] = _run_workload(getattr(p, name), p, work, repeats)
    if "export" in selected:
        results["workloads"]["export"] = _run_export(p.gpt2, p, work, pairs)
    if "cold" in selected:
        results["workloads"]["cold"] = _run_cold(p.llama, p, work, repeats)
    results["meta"]["load_after"] = os.getloadavg()[0]
    results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["goals"] = report.goals(results)
    return results


def _prepare(wl: Workload, p, work: Path) -> tuple[Path, Path, dict]:
    """Base, adapter, and every contender built (or found in ``work``): ``{name: build info}``."""
    (work / wl.name).mkdir(parents=True, exist_ok=True)
    base = build_base(wl, p.quick, work)
    adapter = build_adapter(wl, base, work)
    contenders = {}
    for name in wl.contenders:
        start = time.perf_counter()
        info = artifacts.build(name, wl, base, adapter, work, p.threads)
        info["what"] = artifacts.describe_build(name)
        contenders[name] = info
        state = "ok" if info["status"] == "ok" else info["reason"]
        _say(f"{wl.name}/{name}: {state} ({time.perf_counter() - start:.1f}s)")
    return base, adapter, contenders


def _run_workload(wl: Workload, p, work: Path, repeats: int) -> dict:
    try:
        _, _, contenders = _prepare(wl, p, work)
    except Exception as exc:  # a base model or adapter that cannot be built: report it, go on with the rest
        return {"description": wl.describe(), "reason": f"{type(exc).__name__}: {exc}"}
    workers, started = {}, {}
    try:
        for name, info in contenders.items():
            if info["status"] == "ok":
                started[name] = Worker(name, wl.name, info["paths"], quick=p.quick, threads=p.threads,
                                       log=work / wl.name / f"{name}.worker.log")
        for name, worker in started.items():
            try:
                workers[name] = worker.ready()
                contenders[name]["load_ms"] = worker.load_ms
            except WorkerError as exc:
                contenders[name].update(status="failed", reason=str(exc))
        failed: dict = {}
        cells = []
        for cell in wl.cells():
            _say(f"{wl.name}: timing {cell} x {repeats} rounds over {', '.join(workers)}")
            op = "generate" if wl.kind == "generate" else "classify"
            samples = round_robin(workers, {"op": op, **cell}, repeats, failed, pause=0.0 if p.quick else PAUSE_S)
            meds = report.medians(samples)
            metrics = report.GEN_METRICS if wl.kind == "generate" else report.CLS_METRICS
            cells.append({**cell, "samples": samples, "medians": meds, "ratios": report.ratios(meds, metrics),
                          "agreement": _agreement(workers, failed, {"op": "tokens", **cell}, wl.kind)})
        for name, worker in workers.items():
            if name not in failed:
                try:
                    contenders[name]["peak_rss_mb"] = worker.call({"op": "rss"})["peak_rss_mb"]
                except WorkerError as exc:
                    failed[name] = str(exc)
        for name, reason in failed.items():
            contenders[name].update(status="failed", reason=reason)
    finally:
        for worker in started.values():
            worker.close()
    return {"description": wl.describe(), "contenders": contenders, "cells": cells}


# Pairs that run the same model and should give the same tokens: ours fp32 and PEFT share the adapter; optimum's
# and genai's fp32 exports are both the bare base model.
SAME_MODEL = (("ours-fp32", "peft"), ("genai-fp32", "optimum"))


def _agreement(workers: dict, failed: dict, request: dict, kind: str) -> dict:
    out = {}
    for a, b in SAME_MODEL:
        if a in workers and b in workers and a not in failed and b not in failed:
            try:
                x, y = workers[a].call(request)["tokens"], workers[b].call(request)["tokens"]
            except WorkerError as exc:
                out[f"{a} vs {b}"] = f"not compared: {exc}"
                continue
            if x == y:
                out[f"{a} vs {b}"] = "same " + ("tokens" if kind == "generate" else "labels")
            elif kind == "generate":
                first = min(next(i for i, (u, v) in enumerate(zip(r, s, strict=True)) if u != v)
                            for r, s in zip(x, y, strict=True) if r != s)
                out[f"{a} vs {b}"] = f"tokens differ from new token {first} (random weights: near-ties)"
            else:
                out[f"{a} vs {b}"] = f"{sum(u != v for u, v in zip(x, y, strict=True))} of {len(x)} labels differ"
    return out


def _run_export(wl: Workload, p, work: Path, pairs: int) -> dict:
    """ptuning-export (parity) against main_export (validation), whole processes, alternating, ratio per pair."""
    base = build_base(wl, p.quick, work)
    adapter = build_adapter(wl, base, work)
    model = f"{wl.title}, {wl.num_virtual_tokens} virtual tokens, fp32"
    folder = work / "export-timing"
    ours_t, theirs_t = [], []
    try:
        for i in range(pairs + 1):  # the first pair warms the file cache and is not counted
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            cmds = {"ours": artifacts.ours_export_cmd(base, adapter, folder / "ours", None),
                    "optimum": artifacts.main_export_cmd(base, folder / "optimum", "text-generation-with-past",
                                                         validate=True)}
            order = ["ours", "optimum"] if i % 2 == 0 else ["optimum", "ours"]
            times = {}
            for name in order:
                _say(f"export: {name} (pair {i} of {pairs}{', warm-up' if i == 0 else ''})")
                times[name], _ = run_timed(cmds[name], p.threads)
            if i:
                ours_t.append(times["ours"])
                theirs_t.append(times["optimum"])
    except WorkerError as exc:
        return {"model": model, "reason": str(exc)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pair_ratios = [a / b for a, b in zip(ours_t, theirs_t, strict=True)]
    return {"model": model, "pairs": [{"ours_s": a, "optimum_s": b} for a, b in zip(ours_t, theirs_t, strict=True)],
            "medians": {"ours": statistics.median(ours_t), "optimum": statistics.median(theirs_t)},
            "pair_ratios": pair_ratios, "ratio": statistics.median(pair_ratios)}


def _run_cold(wl: Workload, p, work: Path, repeats: int) -> dict:
    """Import + load of each contender of ``wl`` in a fresh process, interleaved; the first round warms caches."""
    try:
        _, _, contenders = _prepare(wl, p, work)
    except Exception as exc:
        return {"reason": f"{type(exc).__name__}: {exc}"}
    task = "causal-lm" if wl.kind == "generate" else "seq-cls"
    codes = {n: cold_start_code(n, c["paths"], task, p.threads) for n, c in contenders.items() if c["status"] == "ok"}
    unavailable = {n: c["reason"] for n, c in contenders.items() if c["status"] != "ok"}
    samples: dict = {n: [] for n in codes}
    for r in range(repeats + 1):
        names = list(codes)
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in unavailable:
                continue
            try:
                _, out = run_timed([sys.executable, "-c", codes[name]], p.threads)
            except WorkerError as exc:
                unavailable[name] = str(exc)
                continue
            data = json.loads(out.strip().splitlines()[-1])
            data["total_ms"] = data["import_ms"] + data["load_ms"]
            if r:
                samples[name].append(data)
        _say(f"cold: round {r} of {repeats}{' (warm-up)' if r == 0 else ''}")
    samples = {n: s for n, s in samples.items() if s and n not in unavailable}
    meds = report.medians(samples)
    return {"model": wl.title, "repeats": repeats, "samples": samples, "medians": meds,
            "ratios": report.ratios(meds, report.COLD_METRICS), "unavailable": unavailable}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(p, repeats: int) -> dict:
    packages = ("torch", "transformers", "peft", "optimum-onnx", "onnxruntime", "onnxruntime-genai", "ptuning-onnx")
    versions = {name: _version(name) for name in packages}
    return {"quick": p.quick, "threads": p.threads, "repeats": repeats, "argv": sys.argv,
            "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "python": platform.python_version(), "package_versions": versions,
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "load_before": os.getloadavg()[0], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ratio": "ours / contender: below 1 means ours is faster (or smaller)", "ours": list(OURS),
            "workloads": {n: w.describe() for n, w in p.model_workloads().items()}}


if __name__ == "__main__":
    sys.exit(main())
