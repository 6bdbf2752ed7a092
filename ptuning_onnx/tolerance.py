"""What a graph's outputs are held to, and the two measures that apply it. Torch-free: numpy only.

One definition for both places that judge a graph: parity at export time (``parity.py``, ``parity_quantized.py``,
against the PyTorch reference) and ``runtime/golden.py`` on a serving host (against the reference's outputs saved in
``golden.npz``). The same folder therefore passes or fails by the same rule wherever it is checked.

- fp32: max abs diff <= 1e-4.
- fp16: max abs diff <= 1e-2 + 2e-2 * max |reference output| (fp16 rounding grows with magnitude: T5's encoder
  states reach ~3.3 on the tiny model).
- int8 / int4: ``||onnx - reference|| / ||perturbed-prompt reference - reference||`` <= 0.75 per output
  (``parity_quantized.py`` says why).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

ATOL = {"fp32": 1e-4, "fp16": 1e-2}
RTOL_FP16 = 2e-2
REL_LIMIT = 0.75


def default_atol(dtype: str = "fp32") -> float:
    return ATOL[dtype]


def default_rtol(dtype: str = "fp32") -> float:
    return RTOL_FP16 if dtype == "fp16" else 0.0


class MaxDiffs:
    """The exact gate: max abs diff per output name, and any structural problems.

    An output's bound is ``atol + rtol * scale``, where scale is the largest ``|reference|`` seen for that name."""

    def __init__(self, atol: float, rtol: float = 0.0, scales: Optional[dict] = None) -> None:
        """``scales``: each output's scale as measured elsewhere (golden.npz keeps a column subset of large logits,
        whose largest value can be smaller than the whole vocabulary's that the export's bound used)."""
        self.atol, self.rtol = atol, rtol
        self.max: dict = {}
        self.scale: dict = {}
        self.fixed_scale: dict = dict(scales or {})
        self.problems: list = []

    def bound(self, name: str) -> float:
        return self.atol + self.rtol * self.fixed_scale.get(name, self.scale.get(name, 0.0))

    def values(self, name: str, got: np.ndarray, want: np.ndarray, where: Optional[np.ndarray] = None) -> None:
        """``where`` (broadcastable over the leading axes of both): the positions compared; None, all of them."""
        if got.shape != want.shape:
            self.problems.append(f"{name}: shape {list(got.shape)} != reference {list(want.shape)}")
            return
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        if where is not None:
            diff = diff[where.astype(bool)]
        value = float(diff.max()) if diff.size else 0.0
        if not np.isfinite(value):
            value = float("inf")
        self.max[name] = max(self.max.get(name, 0.0), value)
        self.scale[name] = max(self.scale.get(name, 0.0), float(np.abs(want).max()) if want.size else 0.0)

    def tokens(self, got: np.ndarray, want: np.ndarray) -> None:
        if not np.array_equal(got, want):
            self.problems.append(f"greedy tokens differ: onnx {got.tolist()} vs reference {want.tolist()}")

    @property
    def passed(self) -> bool:
        return not self.problems and all(v <= self.bound(k) for k, v in self.max.items())


class RelativeErrors:
    """The quantized gate. Per output, the squared norms of (graph - reference), (graph - control) and
    (control - reference), where control is the reference with a perturbed prompt; ``ratios`` turns them into
    errors in units of the prompt's own effect."""

    def __init__(self) -> None:
        self.err: dict = {}
        self.control: dict = {}
        self.effect: dict = {}
        self.top1: dict = {}

    def add(self, name: str, got: np.ndarray, want: np.ndarray, ctrl: np.ndarray, where=None) -> None:
        got, want, ctrl = (np.asarray(x, np.float64) for x in (got, want, ctrl))
        if name.endswith("logits"):
            # Softmax ignores a shift shared by all classes; so does this measure (it matters with 2 labels).
            got, want, ctrl = (x - x.mean(-1, keepdims=True) for x in (got, want, ctrl))
        if where is not None:
            keep = where.astype(bool)
            got, want, ctrl = got[keep], want[keep], ctrl[keep]
        for store, value in ((self.err, got - want), (self.control, got - ctrl), (self.effect, ctrl - want)):
            store[name] = store.get(name, 0.0) + float(np.sum(value * value))
        if name.endswith("logits") and got.ndim >= 1 and got.size:
            hits, count = self.top1.get(name, (0, 0))
            self.top1[name] = (hits + int((got.argmax(-1) == want.argmax(-1)).sum()), count + got[..., 0].size)

    def ratios(self, store: dict) -> dict:
        return {k: (float(np.sqrt(v / self.effect[k])) if self.effect[k] > 0 else float("inf"))
                for k, v in store.items()}

    def top1_agreement(self) -> dict:
        return {k: hits / count for k, (hits, count) in self.top1.items()}
