"""Cells written for the tests, beyond the shipped examples: each uses one
construct a user may write that the examples do not (the NumPy and CUDA tests
both run them)."""
from __future__ import annotations

import numpy as np

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

# literal-only subexpressions, folded by the checker: a clip, negative
# literals, literal arithmetic, functions of literals and a named constant
LITERALS = """
cell literal_math {
    dim D, H
    input x[D]
    state h[H]
    param W[D, H]
    half = 1 - 0.5
    a = x @ W
    clipped = max(h, -3.0) + min(h, 2 * 1.5)
    flipped = h * -1 + h / -2 - (1 - 0.5)
    scaled = exp(-1) * a + sqrt(4.0) * half * h + abs(-2) - softplus(0) * relu(-1.0) + sigmoid(0) * tanh(a)
    n = tanh(clipped + flipped + scaled)
    next h = n
    output y = n
}
"""


def literal_math_step(x, h, W):
    """One step of LITERALS, written out in NumPy."""
    a = x @ W
    clipped = np.maximum(h, -3.0) + np.minimum(h, 3.0)
    flipped = -h - h / 2 - 0.5
    scaled = np.exp(-1) * a + 2 * 0.5 * h + 2 - np.log(2) * 0 + 0.5 * np.tanh(a)
    return np.tanh(clipped + flipped + scaled)


# a value made once per sequence from a scalar param (shape [], shared) and
# one made from a context (batched), both read by every step
ONCE_PER_SEQUENCE = """
cell once_per_sequence {
    dim D, H
    input x[D]
    context e[H]
    state h[H]
    param W[D, H], a[], g[H] = 1
    rate = sigmoid(a)
    bias = tanh(e)
    n = tanh(x @ W + rate * h + bias * g)
    next h = n
    output y = n
}
"""

CELLS = {"scalar_params": SCALAR_PARAMS, "literals": LITERALS, "once_per_sequence": ONCE_PER_SEQUENCE}
DIMS = {"D": 3, "H": 4}
