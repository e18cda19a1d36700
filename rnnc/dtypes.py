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
