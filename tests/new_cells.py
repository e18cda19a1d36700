"""Cells written for the tests, beyond the shipped examples: each uses one
construct a user may write that the examples do not (the NumPy and CUDA tests
both run them)."""
from __future__ import annotations

# params of shape []: a learnt scalar gain and a scalar leak
SCALAR_PARAMS = """
cell scalar_gain {
    dim D, H
    input x[D]
    state h[H]
    param W[D, H], a[], b[] = 0.5
    z = a * (x @ W) + b * h
    n = tanh(z) * sigmoid(a)
    next h = n
    output y = n
}
"""

CELLS = {"scalar_params": SCALAR_PARAMS}
DIMS = {"D": 3, "H": 4}
