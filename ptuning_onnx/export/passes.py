"""The export options and the optional passes over traced graphs, shared by the single and the multi-prompt export.

Passes, in order: onnxruntime's fusions (``--optimize``, fusion.py), fp16 (fp16.py), int8/int4 (optimize.py). A
quantized graph is made from an fp32 graph that first passed the exact gate; the caller says how to run that gate
(``exact_fp32``), since a single export checks one adapter and a multi-prompt export all of them in one batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import TaskType
from ..errors import ConfigError

DTYPES = ("fp32", "fp16")
QUANTIZE = (None, "int8", "int4")


def check_options(*, dtype: str, device: str, quantize: Optional[str], external_data, opset, skip_verify: bool,
                  int4_block_size: Optional[int] = None) -> None:
    """The export options every export shares (single and multi-prompt), refused before anything loads."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of: {', '.join(DTYPES)}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; expected cpu or cuda")
    if device == "cuda" and not skip_verify:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(f"--device cuda: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider; "
                              "install onnxruntime-gpu (in place of onnxruntime) or verify with --device cpu")
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantization {quantize!r}; expected one of: {', '.join(QUANTIZE[1:])}")
    if dtype == "fp16" and quantize:
        raise ConfigError(f"--quantize {quantize} works on fp32 graphs; drop --dtype fp16")
    from .optimize import INT4_BLOCK_SIZES

    if int4_block_size is not None:
        if quantize != "int4":
            raise ConfigError("--int4-block-size goes with --quantize int4")
        if type(int4_block_size) is not int or int4_block_size not in INT4_BLOCK_SIZES:
            raise ConfigError(f"int4 block size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, "
                              f"got {int4_block_size!r}")
    if external_data not in (None, True, False):
        raise ConfigError(f"external_data must be None, True or False, got {external_data!r}")
    if not isinstance(opset, int) or not 14 <= opset <= 21:
        raise ConfigError(f"opset must be an integer in [14, 21], got {opset!r}")


def apply_passes(tmp: Path, graphs: list, config, task: TaskType, log, *, optimize: bool, dtype: str,
                 quantize: Optional[str], external_data: Optional[bool], exact_fp32=None,
                 raw_attention_mask: bool = False, ref=None, int4_block_size: Optional[int] = None) -> tuple:
    """The optional passes over the traced graphs in ``tmp``, in order: fusions, fp16, quantization; shared by the
    single and the multi-prompt export. ``exact_fp32(optimization)``: the exact gate on the fp32 graph, run before
    quantizing (None with --skip-verify). ``raw_attention_mask``: for fusion.py (masks with holes: multi-prompt
    graphs). ``ref``: the reference a single export's graph was traced from, or a multi-prompt causal graph's list of
    them, for fusion.py's Llama builder (other multi-prompt graphs pass None and get onnxruntime's fusions). Returns
    (the manifest's ``optimization`` entry, the exact gate's report)."""
    from ..tolerance import default_atol

    optimization = None
    if optimize:
        with log.step("fusing graphs (onnxruntime's transformer fusions), timing fused against unfused"):
            from .fusion import fuse

            optimization = fuse(tmp, [spec.name for spec in graphs], config, task, external_data=external_data,
                                raw_attention_mask=raw_attention_mask, ref=ref)
    if dtype == "fp16":
        with log.step("converting graphs to fp16"):
            from .fp16 import to_fp16

            for spec in graphs:
                to_fp16(tmp / f"{spec.name}.onnx", external_data)
    exact = None
    if quantize and exact_fp32 is not None:
        # A quantized graph cannot be held to 1e-4; the graph it is made from can, and that is where a wrong
        # prompt, wrong positions or a dropped virtual token are caught whatever the size of their effect.
        with log.step(f"verifying the fp32 graph against PyTorch before quantizing (atol {default_atol():g})"):
            exact = exact_fp32(optimization)
    if quantize:
        with log.step(f"quantizing graphs to {quantize}"):
            from .optimize import quantize_graph

            for spec in graphs:
                quantize_graph(tmp / f"{spec.name}.onnx", quantize, external_data=external_data,
                               int4_block_size=int4_block_size)
    return optimization, exact
