"""GPU check, part (c): everything on the GPU machine in one command, each step with its own time limit.

    python3 tools/gpu/run.py --parts /tmp/gpu-parts --dest /tmp/gpu --out $OUT [--provider cuda]

1. unpack: reassemble the parts, check every sha256, rebuild the weights (``unpack.py``);
2. provider: onnxruntime-gpu imports, and a session really gets CUDAExecutionProvider;
3. verify: ``ptuning-verify --provider cuda --report`` on every export, fp32 and fp16, through the torch-free
   runtime (golden.npz). ``*-fp16-unkept`` is the control without fp32 RMSNorm statistics: it is EXPECTED to fail
   on the GPU if the rule matters, and its outcome is reported, not counted;
4. tests: ``tools/gpu/test_cuda_runtime.py`` (IOBinding keeps the KV cache on the device, padding invariance,
   CUDA against CPU, streaming, classifiers);
5. bench: ``bench_gpu.py`` (ours fp16 against PEFT eager fp16, fp32 greedy tokens against PEFT on the GPU).
Writes ``OUT/gpu-report.json`` (every step's outcome and seconds, the verify reports, the bench) and
``OUT/gpu.log``. Exit 0 only when every counted step passed. ``--provider cpu`` is the dry run on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIMITS = {"unpack": 180, "provider": 60, "verify": 60, "tests": 240, "bench": 420}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=Path, required=True)
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out (e.g. bench)")
    p.add_argument("--bench-variants", default="fp16,fp32", help="bench_gpu.py --variants")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "gpu.log", "a", encoding="utf-8")
    # The unpacked onnxruntime-gpu shadows the machine's CPU onnxruntime; the dry run keeps the local one (the
    # carried wheel is built for Python 3.12 and the GPU's architecture).
    paths = [str(args.dest / "site"), str(REPO)] if args.provider == "cuda" else [str(REPO)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(paths),
               PTUNING_GPU_WORK=str(args.dest / "work"), PTUNING_GPU_PROVIDER=args.provider)
    report = {"steps": {}, "verify": {}, "provider": args.provider}
    start = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))

    def step(name, cmd, limit, counted=True):
        began = time.perf_counter()
        line = f"=== [{began - start:6.1f}s] {name}: {' '.join(map(str, cmd))}"
        print(line, flush=True)
        log.write(line + "\n")
        try:
            done = subprocess.run(list(map(str, cmd)), env=env, cwd=REPO, timeout=limit, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            rc, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as exc:
            rc, output = 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        seconds = round(time.perf_counter() - began, 1)
        log.write(output)
        log.flush()
        tail = output.strip().splitlines()[-12:]
        print("\n".join(tail), flush=True)
        report["steps"][name] = {"rc": rc, "seconds": seconds, "counted": counted, "tail": tail[-3:]}
        return rc

    py = sys.executable
    if "unpack" not in skip and step("unpack", [py, HERE / "unpack.py", "--parts", args.parts, "--dest", args.dest],
                                     LIMITS["unpack"]):
        return finish(report, args.out, log)
    step("provider", [py, "-c", PROVIDER_CHECK, args.dest / "work", args.provider], LIMITS["provider"])
    if report["steps"]["provider"]["rc"]:
        return finish(report, args.out, log)
    exports = sorted((args.dest / "work" / "exports").iterdir())
    for folder in exports:
        target = args.out / "verify" / f"{folder.name}.json"
        target.parent.mkdir(exist_ok=True)
        control = folder.name.endswith("-unkept")
        step(f"verify {folder.name}", [py, "-m", "ptuning_onnx.cli.verify", folder, "--provider", args.provider,
                                      "--report", target], LIMITS["verify"], counted=not control)
        if target.is_file():
            report["verify"][folder.name] = json.loads(target.read_text())
            target.unlink()
    if "tests" not in skip:
        step("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                       HERE / "test_cuda_runtime.py"], LIMITS["tests"])
    if "bench" not in skip:
        bench = args.out / "bench.json"
        extra = ["--variants", args.bench_variants]
        extra += ["--device", "cpu", "--dry-run", "--repeats", "1"] if args.provider == "cpu" else []
        step("bench", [py, HERE / "bench_gpu.py", "--work", args.dest / "work", "--out", bench, *extra],
             LIMITS["bench"])
        if bench.is_file():
            report["bench"] = json.loads(bench.read_text())
    return finish(report, args.out, log)


PROVIDER_CHECK = r"""
import json, sys, time
from pathlib import Path
import onnxruntime as ort
print("onnxruntime", ort.__version__, "from", ort.__file__, "providers", ort.get_available_providers())
from ptuning_onnx import runtime
folder = sorted((Path(sys.argv[1]) / "exports").iterdir())[0]
start = time.perf_counter()
model = runtime.load(folder, provider=sys.argv[2])
print("session providers", json.dumps(model.providers), f"load {time.perf_counter() - start:.1f} s")
import numpy as np
print("tokens", model.generate(input_ids=np.array([[5, 6, 7, 8]]), max_new_tokens=4, eos_token_id=[]).tolist())
"""


def finish(report: dict, out: Path, log) -> int:
    failed = [name for name, s in report["steps"].items() if s["rc"] and s["counted"]]
    report["failed"] = failed
    (out / "gpu-report.json").write_text(json.dumps(report, indent=1))
    summary = {name: (s["rc"], s["seconds"]) for name, s in report["steps"].items()}
    print(f"=== summary (step: rc, seconds): {json.dumps(summary)}", flush=True)
    print("=== FAILED: " + ", ".join(failed) if failed else "=== all counted steps passed", flush=True)
    log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
