"""The dtypes a module keeps its arrays in, and which buffers a 16-bit one narrows.

float32 and float64 compute in themselves. bfloat16 (through `ml_dtypes`,
the library JAX uses) and float16 are *storage* types: a module of either
takes and gives arrays of it, keeps the values it holds across a step or the
whole sequence in it (the hoisted rows, the stored values of the tape and
their cotangents), multiplies on tensor cores in it, and does everything
else in float32: elementwise math, the sums of every product and of every
gradient, and the states carried from step to step (so rounding does not
drift over T). A value is rounded to the storage type where it is made when
it lives in a narrow buffer, so whoever reads it, in the same kernel or a
later one, reads the rounded value; the NumPy backend rounds the same values
at the same points, so it stays the reference for the kernels.

The schedule's buffers by role (rnnc/passes/costs.py): `rows`, `d_rows` and
the tape's non-state values are narrow; `seq`, `d_seq` (sums), `checkpoint`
and the tape's states stay float32 (`WIDE_ROLES`, `wide_bytes`).
"""
from __future__ import annotations

import numpy as np

try:
    import ml_dtypes
except ImportError:  # declared in pyproject.toml; only bfloat16 needs it
    ml_dtypes = None

NAMES = ("float32", "float64", "bfloat16", "float16")
NARROW = ("bfloat16", "float16")
WIDE_ROLES = ("seq", "checkpoint", "d_seq")  # held in float32 under a narrow dtype (and the tape's states)


def storage(dtype, allowed=NAMES) -> np.dtype:
    """The np.dtype of `dtype` (a name or a dtype), one of `allowed`, or a ValueError naming them."""
    name = getattr(dtype, "name", dtype)
    if isinstance(name, str) and name in allowed:
        if name == "bfloat16":
            if ml_dtypes is None:
                raise ValueError("dtype: bfloat16 needs the ml_dtypes package (pip install ml_dtypes)")
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(name)
    choices = ", ".join(repr(n) for n in allowed)
    raise ValueError(f"dtype: expected one of {choices}, got {dtype!r}")


def is_narrow(dtype) -> bool:
    return storage(dtype).name in NARROW


def compute(dtype) -> np.dtype:
    """The dtype arithmetic runs in: float32 for a 16-bit storage type, else the dtype itself."""
    return np.dtype(np.float32) if is_narrow(dtype) else storage(dtype)


def wide_bytes(dtype) -> int:
    """Bytes of an element of a buffer that stays wide (`WIDE_ROLES`, states): float32's under a narrow dtype."""
    return compute(dtype).itemsize


def rounded_where_made(program) -> dict:
    """Region name (the NumPy backend's runners) -> the values a module of a
    16-bit dtype rounds to it where they are made, because the CUDA backend
    keeps them in a narrow buffer: the hoisted rows it holds; the stored
    values of the tape that are not states, and the outputs (the states
    the step makes stay float32); in the step's backward, the cotangent of an
    input or hoisted value that is that value's only cotangent (written
    straight to its narrow rows). Rounding elsewhere (an input's cotangent
    summed from several, a result returned to the caller) happens on the way
    into its array, where nothing reads it before."""
    h, plan, step_bwd = program.hoisted, program.plan, program.grads["step"]
    states = {d.name for d in h.cell.of_kind("state")}
    nexts = {v for _, v in h.nexts}
    step = {v for v in plan.held["tape"] if v not in states} | {v for _, v in h.outputs}
    grads = [g for _, g in step_bwd.grads if g]
    rows = {d.name for d in h.cell.of_kind("input")} | set(h.pre.outputs)
    return {"pre": set(plan.held["rows"]), "step": step - nexts, "recompute": step - nexts,
            "d_step": {g for w, g in step_bwd.grads if g and grads.count(g) == 1 and w in rows}}
