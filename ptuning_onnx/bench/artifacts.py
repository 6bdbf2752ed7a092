"""Each contender's files, built once under ``<work>/<workload>/<contender>`` and reused by later runs.

Builds run in this process (imports are paid once, which keeps ``--quick`` short) through the library call each
tool's command wraps: our ``export(..., optimize=True)`` (fusions kept where they time faster), optimum's ``main_export``, onnxruntime-genai's builder ``create_model``.
Their output goes to ``<work>/<workload>/<contender>.log``. A failed build makes that contender "unavailable" with
the error as the reason, and the benchmark goes on without it. Each folder is made in a temporary sibling and
renamed into place, so a folder that exists is a finished build. (The ``export`` workload times whole processes;
these build times are for information only.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from .contenders import set_genai_threads
from .workloads import QUANTIZE, Workload

GENAI_PIN = "onnxruntime-genai==0.13.2"  # 0.18's builder needs transformers 5 (shared/FACTS.md)
# prune_lm_head: the builder's counterpart of our logits_to_keep=1 (the prefill computes the last position's
# logits only). It is the builder's own documented option, so the contender runs at its best.
GENAI_OPTIONS = ("hf_remote=false", "hf_token=false", "prune_lm_head=true")


def worker_env(threads: int) -> dict:
    """Environment for every process the benchmark starts: offline, and OpenMP/MKL held to ``threads``."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


@contextlib.contextmanager
def _output_to(log: Path):
    """Send this process's stdout and stderr (file descriptors too, for C++ and logging handlers) to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "a", encoding="utf-8") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _build_in_process(make, log: Path) -> tuple[bool, str, float]:
    """-> (ok, reason, seconds)."""
    start = time.perf_counter()
    try:
        with _output_to(log):
            make()
    except Exception as exc:  # any build failure makes the contender unavailable, with the error as the reason
        return False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]} (log: {log})", 0.0
    return True, "", time.perf_counter() - start


def _optimum_task(workload: Workload) -> str:
    return "text-generation-with-past" if workload.kind == "generate" else "text-classification"


def main_export_cmd(base: Path, out: Path, task: str, validate: bool) -> list:
    """optimum's ``main_export`` of the plain base model (no prompt), as a whole process."""
    code = ("import sys; from optimum.exporters.onnx import main_export; "
            "main_export(sys.argv[1], sys.argv[2], task=sys.argv[3], library_name='transformers', "
            f"do_validation={validate})")
    return [sys.executable, "-c", code, base, out, task]


def ours_export_cmd(base: Path, adapter: Path, out: Path, quantize) -> list:
    """``ptuning-export`` with its parity check, as a user runs it."""
    return [sys.executable, "-m", "ptuning_onnx.cli.export", "--base-model", base, "--adapter", adapter,
            "--output", out, "--quiet"] + (["--quantize", quantize] if quantize else [])


def genai_unavailable() -> str:
    """Why onnxruntime-genai cannot run here, or "" when it can."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return f"onnxruntime-genai is not installed (pip install -c constraints.txt {GENAI_PIN})"
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception as exc:  # a wheel that does not load here (ABI, missing library)
        return f"onnxruntime-genai does not import: {type(exc).__name__}: {exc}"
    return ""


def build(contender: str, workload: Workload, base: Path, adapter: Path, work: Path, threads: int) -> dict:
    """-> ``{"status": "ok", "paths": {...}, "build_s": s | None}`` or ``{"status": "unavailable", "reason": ...}``.

    ``build_s`` is None when the files came from an earlier run's cache.
    """
    task = "causal-lm" if workload.kind == "generate" else "seq-cls"
    if contender == "peft":
        return {"status": "ok", "paths": {"base": str(base), "adapter": str(adapter),
                                          "num_labels": workload.num_labels}, "build_s": 0.0}
    folder = work / workload.name / contender
    log = work / workload.name / f"{contender}.log"
    done = folder / ("genai_config.json" if contender.startswith("genai") else
                     "ptuning_onnx.json" if contender.startswith("ours") else "config.json")
    if contender.startswith("genai"):
        reason = genai_unavailable()
        if reason:
            return {"status": "unavailable", "reason": reason}
    ok, reason, seconds = True, "", None
    if not done.is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        if contender == "optimum":
            def make():
                from optimum.exporters.onnx import main_export

                main_export(str(base), tmp, task=_optimum_task(workload), library_name="transformers",
                            do_validation=False)
        elif contender.startswith("genai"):
            def make():
                from onnxruntime_genai.models.builder import create_model, parse_extra_options

                create_model(None, str(base), str(tmp), contender.split("-")[1], "cpu", str(work / "genai-cache"),
                             **parse_extra_options(list(GENAI_OPTIONS), "cpu"))
        else:
            def make():
                from ..export import export

                export(base, adapter, tmp, quantize=QUANTIZE[contender], optimize=True, progress=False)
        ok, reason, seconds = _build_in_process(make, log)
        if ok:
            tmp.rename(folder)
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        return {"status": "unavailable", "reason": reason}
    if contender.startswith("genai"):
        set_genai_threads(folder, threads)
    return {"status": "ok", "paths": {"folder": str(folder), "num_labels": workload.num_labels},
            "build_s": seconds, "task": task}


def describe_build(contender: str) -> str:
    if contender == "optimum":
        return "optimum main_export of the base (no prompt)"
    if contender.startswith("genai"):
        return f"onnxruntime-genai builder, {contender.split('-')[1]}, base (no prompt), {' '.join(GENAI_OPTIONS)}"
    if contender.startswith("ours"):
        return f"ptuning-export {contender.split('-')[1]}, with the prompt, parity checked"
    return "PEFT eager (PyTorch), with the prompt"
