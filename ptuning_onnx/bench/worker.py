"""Worker processes, one per contender, and the round-robin schedule that times them.

Why processes: torch and onnxruntime are never timed in one process. After torch's OpenMP threads have run,
onnxruntime CPU calls in the same process were measured 2x slower (GPT-2-small, 2 cores). And each contender's
peak RSS is its own process's.

Protocol (JSON lines): the worker is started with its spec as argv[1], loads its contender and answers
``{"ready": true, "load_ms": ...}`` (or ``{"error": ...}``); then each request line gets one answer line:
``{"op": "generate", "batch": B, "new_tokens": N}`` -> ``{"total_ms", "ttft_ms", "per_token_ms"}``;
``{"op": "classify", "batch": B}`` -> ``{"ms"}``; ``{"op": "tokens", ...}`` -> the last result of that cell;
``{"op": "rss"}`` -> ``{"peak_rss_mb"}``. Errors come back as ``{"error": "Type: message"}``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .artifacts import worker_env
from .workloads import plan, prompt_ids

PAUSE_S = 0.3  # torch's OpenMP threads spin for up to ~200 ms after their work; let them stop before the next call


def serve(spec: dict) -> int:
    from .contenders import runner_for

    workload = getattr(plan(spec["quick"]), spec["workload"])
    task = "causal-lm" if workload.kind == "generate" else "seq-cls"
    try:
        start = time.perf_counter()
        runner = runner_for(spec["contender"], spec["paths"], task, spec["threads"])
        _answer({"ready": True, "load_ms": (time.perf_counter() - start) * 1e3})
    except Exception as exc:
        _answer({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    last = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            _answer(_handle(runner, workload, request, last))
        except Exception as exc:
            _answer({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def _handle(runner, workload, request: dict, last: dict) -> dict:
    op = request["op"]
    if op == "rss":
        return {"peak_rss_mb": peak_rss_mb()}
    key = (request["batch"], request.get("new_tokens"))
    if op == "tokens":
        return {"tokens": last[key].tolist()}
    ids = prompt_ids(workload, request["batch"])
    if op == "generate":
        n = request["new_tokens"]
        tokens, first, total = runner.generate(ids, n)
        last[key] = tokens
        return {"total_ms": total * 1e3, "ttft_ms": first * 1e3,
                "per_token_ms": (total - first) * 1e3 / (n - 1) if n > 1 else 0.0}
    if op == "classify":
        start = time.perf_counter()
        logits = runner.classify(ids, np.ones_like(ids))
        ms = (time.perf_counter() - start) * 1e3
        last[key] = logits.argmax(-1)
        return {"ms": ms}
    raise ValueError(f"unknown op {op!r}")


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` rather than ``ru_maxrss``: on Linux a child's ru_maxrss
    starts at its parent's RSS at fork time, so every worker would report at least the main process's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _answer(data: dict) -> None:
    print(json.dumps(data), flush=True)


class WorkerError(RuntimeError):
    pass


class Worker:
    """The main process's handle on one worker."""

    def __init__(self, contender: str, workload: str, paths: dict, *, quick: bool, threads: int, log: Path):
        spec = {"contender": contender, "workload": workload, "paths": paths, "quick": quick, "threads": threads}
        self.name, self.log = contender, log
        self._log_fh = open(log, "a", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "-m", "ptuning_onnx.bench.worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_fh, text=True,
                                     env=worker_env(threads))
        self.load_ms: Optional[float] = None

    def ready(self) -> "Worker":
        """Wait until the contender is loaded (workers are started together and load side by side)."""
        if self.load_ms is None:
            self.load_ms = self._read()["load_ms"]
        return self

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise WorkerError(f"{self.name} worker exited {self.proc.returncode} (log: {self.log})")
        data = json.loads(line)
        if "error" in data:
            raise WorkerError(f"{self.name}: {data['error']}")
        return data

    def call(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:  # the worker died (a crash in a native library, out of memory)
            raise WorkerError(f"{self.name} worker is gone ({exc}; log: {self.log})") from None
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_fh.close()


def round_robin(workers: dict, request: dict, repeats: int, failed: dict, pause: float = PAUSE_S) -> dict:
    """``{name: [result, ...]}``: one warm-up call each, then ``repeats`` rounds, every worker once per round.

    The order rotates each round, so no contender always runs right after the same one. A worker that fails is
    recorded in ``failed`` (name -> reason) and left out of the remaining rounds.
    """
    names = [n for n in workers if n not in failed]
    samples: dict = {n: [] for n in names}

    def one(name, keep):
        if name in failed:
            return
        time.sleep(pause)
        try:
            result = workers[name].call(request)
        except WorkerError as exc:
            failed[name] = str(exc)
            return
        if keep:
            samples[name].append(result)

    for name in names:
        one(name, keep=False)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            one(name, keep=True)
    return {n: s for n, s in samples.items() if s and n not in failed}


def run_timed(cmd: list, threads: int, cwd=None) -> tuple[float, str]:
    """Run a whole process; -> (seconds, stdout). Raises WorkerError with its last output line on failure."""
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=worker_env(threads), cwd=cwd)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise WorkerError(f"exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
    return seconds, proc.stdout


if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1])))
