"""Cells written for the tests of the lengths mask, of step results that depend
on params alone and of chains of once-per-sequence values (the NumPy tests
in test_lengths.py, the CUDA ones in test_cuda_emulated.py)."""
from __future__ import annotations

import numpy as np

import rnnc

# x normalised to unit length: 0/0 on a step of zero padding, NaN on NaN padding
NORM = """
cell norm {
    dim D, H
    input x[D]
    state h[H]
    param W[D, H], U[H, H], b[H] = 0.1
    n = x / sqrt(sum(x * x, axis=-1, keepdims=1))
    h_new = tanh(n @ W + h @ U + b)
    next h = h_new
    output y = h_new
}
"""

# step results of params alone: outputs that are a param and a value of params,
# and a state whose next value is a param
SHARED = """
cell shared {
    dim D, H
    input x[D]
    state h[H], s[H]
    param W[D, H], U[H, H], b[H], a[H] = 0.5
    h_new = tanh(x @ W + h @ U + b * s)
    next h = h_new
    next s = a
    output pb = b
    output tb = tanh(b)
    output y = h_new
}
"""

# once-per-sequence values computed from others before the step reads them:
# contexts projected and combined, and a chain of params alone
CHAIN = """
cell chain {
    dim D, H, E
    input x[D]
    context e[E], mem[E]
    state h[H]
    param W[D, H], U[H, H], We[E, H], Wm[E, H], mu[H], c[H] = 0.3
    ctxh = tanh(e @ We)
    keys = mem @ Wm
    centered = keys - mu
    gate = sigmoid(centered * ctxh)
    scale = exp(c) * exp(c) + 1
    h_new = tanh(x @ W + h @ U * gate + scale * ctxh)
    next h = h_new
    output y = h_new
    output g = gate
}
"""

CELLS = {"norm": NORM, "shared": SHARED, "chain": CHAIN}
DIMS = {"D": 3, "H": 4, "E": 2}
T, B = 6, 4
LENGTHS = np.array([6, 3, 0, 1])  # full, partial, empty and one step


def padding(steps: int, lengths) -> np.ndarray:
    """[T, B]: the padded steps of each example."""
    return np.arange(steps)[:, None] >= np.asarray(lengths)[None, :]


def fill_padding(args: dict, lengths, value) -> dict:
    """`args` (inputs, states, contexts, params, d_outputs, d_states) with the
    padded steps of every input and output cotangent set to `value`."""
    out = {k: dict(v) for k, v in args.items()}
    for group in ("inputs", "d_outputs"):
        for name, array in out[group].items():
            array = array.copy()
            array[padding(array.shape[0], lengths)] = value
            out[group][name] = array
    return out


def compile_cell(text: str, policy: str, dtype: str = "float64"):
    """A program of one of CELLS (or a cell's text) at DIMS under a policy, or
    "budget": 40% of `none`'s peak for T steps of batch B."""
    dims = {k: v for k, v in DIMS.items() if f" {k}" in text.split("input")[0]}
    if policy == "budget":
        none = rnnc.compile(text, dims=dims, recompute="none").plan
        budget = none.peak_bytes(T, B, dtype) * 40 // 100
        return rnnc.compile(text, dims=dims, memory_budget=budget, seq_len=T, batch=B, dtype=dtype)
    return rnnc.compile(text, dims=dims, recompute=policy)
