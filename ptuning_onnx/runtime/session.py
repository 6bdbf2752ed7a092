"""onnxruntime sessions: which execution provider, and how one call feeds a graph repeatedly.

``GraphRunner`` is created inside each call (never stored on the model): it owns that call's IOBinding on CUDA, so
concurrent calls share only the sessions, whose ``run`` is thread-safe. Tensors that go back into the next step
(KV cache, encoder states) are never copied between steps:
- CUDA: they stay ``OrtValue``s in device memory (IOBinding); only the small logits come to the host.
- CPU: ``session.run`` already hands its outputs over without a copy (the numpy arrays wrap onnxruntime's buffers)
  and reads contiguous numpy inputs in place, so each ``present`` goes straight back as the next ``past``.
  Measured against ``run_with_ort_values`` on 2 cores: as fast or faster (its Python wrapper costs ~45 us a step,
  and it was ~9% slower on a 900-token, batch-4 GPT-2-small cache), so the plain path is the CPU path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..errors import PtuningError

log = logging.getLogger("ptuning_onnx.runtime")

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# onnxruntime's CUDA provider runs fp32 MatMul/GEMM in TF32 (10-bit mantissa) unless use_tf32 is 0, which breaks
# the 1e-4 an fp32 export was verified to: measured on an H200 with onnxruntime-gpu 1.31.1 (golden.npz, tiny models),
# max abs diff 2.7e-4 (GPT-2 logits) and 1.3e-3 (BERT seq-cls logits) with TF32, 2.4e-7 and 4.8e-7 without. fp32
# graphs are the accuracy choice; fp16 graphs (unaffected) are the speed one on CUDA.
CUDA_OPTIONS = {"use_tf32": "0"}
PROVIDERS = ("auto", "cpu", "cuda")


class ProviderError(PtuningError, RuntimeError):
    """The requested execution provider is missing or did not take the graph."""


class SessionLoadError(PtuningError, RuntimeError):
    """onnxruntime refused a graph file."""


def parse_provider(provider: str) -> tuple[str, int]:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> (kind, device_id)."""
    if isinstance(provider, str):
        kind, _, index = provider.lower().partition(":")
        if kind in PROVIDERS and (not index or (kind == "cuda" and index.isdigit())):
            return kind, int(index or 0)
    raise ProviderError(f"unknown provider {provider!r}; expected one of: auto, cpu, cuda, cuda:N")


def cuda_available() -> bool:
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


def _preload_cuda_libraries() -> None:
    # onnxruntime-gpu wheels find the CUDA/cuDNN libraries of the nvidia-* pip packages only after this call.
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # a failed preload shows up below as a session without CUDA
            log.debug("onnxruntime.preload_dlls() failed: %s", exc)


# Session config for graphs run one token at a time. Each decoding step is ~300 small kernels; with the thread
# pool's work cut into blocks handed out as threads free up (instead of one static share per thread), a thread
# that the OS delays no longer holds up every kernel: Llama-125M int4 steps 0.82-0.93x at batch 1 and 8 on this
# 2-core machine (interleaved A/B, four runs); classifiers' single large runs gained nothing (0.94-1.03x), so
# they keep onnxruntime's default. onnxruntime-genai 0.13's config cannot set it.
DECODING_CONFIG = {"session.dynamic_block_base": "4"}


def build_sessions(paths: dict, provider: str = "auto", threads: Optional[int] = None,
                   config: Optional[dict] = None) -> tuple[dict, str, int]:
    """``{graph: path}`` -> (``{graph: InferenceSession}``, device ``"cpu"``/``"cuda"``, device_id).

    ``config``: onnxruntime session config entries (``DECODING_CONFIG`` for generative tasks).

    ``"cuda"`` raises ``ProviderError`` unless every session really got CUDA (onnxruntime falls back to CPU
    silently when a CUDA library is missing). ``"auto"`` tries CUDA when the build has it and logs the outcome.
    """
    import onnxruntime as ort

    kind, device_id = parse_provider(provider)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ProviderError(f"threads must be a positive integer or None, got {threads!r}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the logits_to_keep initializer-as-input warning is expected
    if threads is not None:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    want_cuda = kind == "cuda" or (kind == "auto" and cuda_available())
    if kind == "cuda" and not cuda_available():
        raise ProviderError(f"provider='cuda' but this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                            f"(available: {ort.get_available_providers()}); install onnxruntime-gpu")
    if want_cuda:
        _preload_cuda_libraries()
        try:
            cuda_sessions = _create(paths, options, [(CUDA, {"device_id": device_id, **CUDA_OPTIONS}), CPU])
        except SessionLoadError as exc:
            if kind == "cuda":
                raise ProviderError(f"provider='cuda' failed: {exc}") from None
            log.warning("ptuning_onnx.runtime: CUDAExecutionProvider did not load (%s); using CPU", exc)
        else:
            got = {name: s.get_providers() for name, s in cuda_sessions.items()}
            if all(p[0] == CUDA for p in got.values()):
                log.info("ptuning_onnx.runtime: using CUDAExecutionProvider (device %d)", device_id)
                return cuda_sessions, "cuda", device_id
            if kind == "cuda":
                raise ProviderError(f"provider='cuda' but onnxruntime fell back to {got}; a CUDA library is "
                                    f"probably missing (see onnxruntime.preload_dlls())")
            log.warning("ptuning_onnx.runtime: CUDAExecutionProvider did not load (%s); using CPU", got)
    sessions = _create(paths, options, [CPU])
    log.info("ptuning_onnx.runtime: using CPUExecutionProvider")
    return sessions, "cpu", 0


def _create(paths: dict, options, providers: list) -> dict:
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        try:
            sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise SessionLoadError(f"onnxruntime could not load {Path(path).name}: {exc}") from None
    return sessions


class GraphRunner:
    """Runs one session for one call. Inputs are numpy arrays (host) or ``OrtValue``s from an earlier step.

    ``run`` returns ``(host, kept)``: ``host`` maps the names in ``to_host`` to numpy arrays; ``kept`` maps every
    other output name to an ``OrtValue`` that stays where onnxruntime put it (device memory on CUDA). On CPU every
    output is a numpy array in ``host``, and ``kept`` is empty.
    """

    # Tests set this to drive the IOBinding (CUDA) code path on a CPU-only machine; never set in production.
    force_binding = False

    def __init__(self, session, device: str = "cpu", device_id: int = 0):
        self.session, self.device, self.device_id = session, device, device_id
        self.output_names = [o.name for o in session.get_outputs()]
        # One IOBinding per runner, and one runner per call: a shared IOBinding is not thread-safe.
        self._binding = session.io_binding() if device == "cuda" or self.force_binding else None

    def run(self, inputs: dict, to_host: Iterable[str] = ("logits",)) -> tuple[dict, dict]:
        wanted = set(to_host)
        if self._binding is None:
            return self._run_cpu(inputs, wanted)
        return self._run_bound(self._binding, inputs, wanted)

    def _run_cpu(self, inputs: dict, to_host: set) -> tuple[dict, dict]:
        outputs = self.session.run(self.output_names, {name: _contiguous(v) for name, v in inputs.items()})
        return dict(zip(self.output_names, outputs, strict=True)), {}

    def _run_bound(self, io, inputs: dict, to_host: set) -> tuple[dict, dict]:
        from onnxruntime import OrtValue

        io.clear_binding_inputs()
        io.clear_binding_outputs()
        # bind_cpu_input keeps only a raw pointer to numpy memory, and cannot bind an optional input (an
        # initializer such as logits_to_keep). An OrtValue made from the array holds a reference and binds both.
        held = []
        for name, value in inputs.items():
            if not isinstance(value, OrtValue):
                value = OrtValue.ortvalue_from_numpy(_contiguous(value))
                held.append(value)
            io.bind_ortvalue_input(name, value)
        for name in self.output_names:
            # Small outputs we read (logits) come back to the host; everything else stays on the device.
            if name in to_host:
                io.bind_output(name, "cpu")
            else:
                io.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(io)
        return self._split(io.get_outputs(), to_host)

    def _split(self, outputs, to_host: set) -> tuple[dict, dict]:
        host, kept = {}, {}
        for name, value in zip(self.output_names, outputs, strict=True):
            if name in to_host:
                host[name] = value.numpy()
            else:
                kept[name] = value
        return host, kept


def _contiguous(value) -> np.ndarray:
    # Not np.ascontiguousarray: it turns a 0-d array (a scalar input such as logits_to_keep) into shape (1,).
    return np.asarray(value, order="C")


FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _output_buffer(session, name: str, leading: tuple) -> Optional[np.ndarray]:
    """An empty array for output ``name`` with ``leading`` dims and the graph's fixed trailing ones, or None when a
    trailing dim is symbolic or the type is not a plain float."""
    output = next(o for o in session.get_outputs() if o.name == name)
    dtype = FLOAT_TYPES.get(output.type)
    trailing = output.shape[len(leading):]
    if dtype is None or not all(isinstance(d, int) and d > 0 for d in trailing):
        return None
    return np.empty((*leading, *trailing), dtype)


class SharedKVCache:
    """Decoding steps whose past and present are ONE preallocated buffer per cache tensor: onnxruntime's
    GroupQueryAttention sees the same memory bound as ``past_key_values.*`` and ``present.*`` (its
    past_present_share_buffer mode, as onnxruntime-genai runs it) and writes each step's keys/values in place, where
    a returned present is a new buffer that the kernel fills with a copy of the whole past, every layer and step.

    For graphs whose manifest says ``model.past_present_share_buffer`` (export/build_llama.py), on the CPU. Built
    from the cache so far (past name -> (B, KV, T, D), the same T for all) with room for ``steps`` more positions:
    each buffer is (B, KV, T + steps, D), those T first. Every buffer belongs to one call (runs change them in
    place); the session may be shared.
    """

    def __init__(self, session, cache: dict, steps: int):
        from onnxruntime import OrtValue

        self.session = session
        self.io = session.io_binding()
        self._held: list = []  # the OrtValues, which point at the buffers' memory
        # Step inputs: name -> (array, OrtValue over it). An input whose shape is unchanged (ids, positions,
        # prompt_ids) is copied into its array and stays bound; only the growing mask is bound anew each step.
        self._inputs: dict = {}
        self.buffers: dict = {}  # past name -> (B, KV, T + steps, D)
        self.filled = next(iter(cache.values())).shape[2]  # positions written so far
        batch = next(iter(cache.values())).shape[0]
        # The logits of a one-token step go into one buffer bound once: get_outputs() would wrap every present too.
        self._logits = _output_buffer(session, "logits", (batch, 1))
        if self._logits is None:
            self.io.bind_output("logits", "cpu")
        else:
            self._held.append(OrtValue.ortvalue_from_numpy(self._logits))
            self.io.bind_ortvalue_output("logits", self._held[-1])
        for past_name, present in cache.items():
            batch, heads, _, head_dim = present.shape
            buffer = np.zeros((batch, heads, self.filled + steps, head_dim), present.dtype)  # pads must be finite
            buffer[:, :, :self.filled] = present
            value = OrtValue.ortvalue_from_numpy(buffer)
            self.io.bind_ortvalue_input(past_name, value)
            self.io.bind_ortvalue_output(past_name.replace("past_key_values", "present", 1), value)
            self.buffers[past_name] = buffer
            self._held.append(value)

    def run(self, inputs: dict) -> np.ndarray:
        """One step of one token per row on ``inputs`` (the small ones: ids, mask, positions, ...); returns the
        (B, 1, V) logits."""
        from onnxruntime import OrtValue

        if inputs["input_ids"].shape[1] != 1:
            raise ValueError(f"SharedKVCache runs one token per row, got input_ids {inputs['input_ids'].shape}")
        for name, value in inputs.items():
            value = np.asarray(value)
            held = self._inputs.get(name)
            if held is not None and held[0].shape == value.shape and held[0].dtype == value.dtype:
                np.copyto(held[0], value)  # the OrtValue points at this array: nothing to bind
                continue
            array = np.array(value, order="C", copy=True)  # ours: a caller's array may change after the call
            ort_value = OrtValue.ortvalue_from_numpy(array)
            self.io.bind_ortvalue_input(name, ort_value)
            self._inputs[name] = (array, ort_value)
        self.session.run_with_iobinding(self.io)
        self.filled += 1
        # A copy: the bound logits buffer is overwritten by the next run.
        logits = self._logits if self._logits is not None else self.io.get_outputs()[0].numpy()
        return np.array(logits, copy=True)

    def past(self) -> dict:
        """The cache so far, past name -> (B, KV, filled, D): views of the buffers (valid until the next run)."""
        return {name: buffer[:, :, :self.filled] for name, buffer in self.buffers.items()}

