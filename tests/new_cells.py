"""Cells written for the tests, beyond the shipped examples: each uses one
construct a user may write that the examples do not (the NumPy and CUDA tests
both run them). The three after them are for the lengths mask (test_lengths.py
and test_cuda_emulated.py), with what those tests share; the last ones leave a
value unread by a region (test_unread.py)."""
from __future__ import annotations

import numpy as np

import rnnc

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

# per-example matrix states multiplied together (a product per example with
# more than one row, column and summand: tensor cores under tf32), a sum and
# a softmax within each example, a recurrent product of a concatenation (of
# sizes no vector copy divides) beside them and a bias: the CUDA backend runs
# these in launches of several kernels (test_cuda_emulated.py)
PER_EXAMPLE = """
cell per_example {
    dim D, H, S
    input x[D]
    state h[H], m[S, H], q[H, H], g[S]
    param W[D, H], U[H + S, H], b[H]
    a = x @ W + concat(h, g) @ U + b
    h_new = tanh(a)
    mq = m @ q
    score = sum(mq * h_new, axis=-1)
    alpha = softmax(score, axis=0)
    r = alpha @ m
    next h = h_new + 0.5 * r
    next m = tanh(mq)
    next q = q * sigmoid(h_new)
    next g = tanh(score)
    output y = r
}
"""
PER_EXAMPLE_DIMS = {"D": 3, "H": 4, "S": 5}


def _step(expr: str, body: str = "") -> str:
    return ("cell deep {\n    dim D, H\n    input x[D]\n    state h[H]\n    param W[D, H]\n"
            f"    a = x @ W\n{body}    r = {expr}\n    next h = tanh(r)\n    output y = r\n}}\n")


def deep_pairs(terms: int = 10_000, depth: int = 1_000) -> dict:
    """Cells whose step is one very long or very deep expression, each with a
    shallow cell that computes the same function (so the same outputs and
    gradients, up to rounding): name -> (deep text, shallow text)."""
    assert terms % 2 == 0 and depth % 2 == 0
    return {
        # h * a - h + h - h + ...: a left-nested tree `terms` deep
        "sum": (_step("h * a" + " - h + h" * (terms // 2)), _step("h * a")),
        # statements r1 = h - r0, r2 = h - r1, ...: r_terms is r0
        "statements": (_step(f"r{terms}", "    r0 = a * h\n" + "".join(
            f"    r{i + 1} = h - r{i}\n" for i in range(terms))), _step("a * h")),
        "minus": (_step("-" * depth + "(h * a)"), _step("h * a")),
        "calls": (_step("abs(" * depth + "h * a" + ")" * depth), _step("abs(h * a)")),
        # h / 1000 + (h / 1000 + (... + a)): nested to the right, in parentheses
        "parens": (_step("(h * 0.001 + " * depth + "a" + ")" * depth), _step(f"h * {0.001 * depth} + a")),
    }


# --- the lengths mask ----------------------------------------------------------------------
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

# the three above, at these sizes, for LENGTHS_T steps of a batch of 4 with LENGTHS
LENGTHS_CELLS = {"norm": NORM, "shared": SHARED, "chain": CHAIN}
LENGTHS_DIMS = {"D": 3, "H": 4, "E": 2}
LENGTHS_T, LENGTHS_B = 6, 4
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
    """A program of a cell's text at LENGTHS_DIMS under a policy, or "budget":
    40% of `none`'s peak for LENGTHS_T steps of batch LENGTHS_B."""
    dims = {k: v for k, v in LENGTHS_DIMS.items() if f" {k}" in text.split("input")[0]}
    T, B = LENGTHS_T, LENGTHS_B
    if policy == "budget":
        none = rnnc.compile(text, dims=dims, recompute="none").plan
        budget = none.peak_bytes(T, B, dtype) * 40 // 100
        return rnnc.compile(text, dims=dims, memory_budget=budget, seq_len=T, batch=B, dtype=dtype)
    return rnnc.compile(text, dims=dims, recompute=policy)


# --- values a region never reads -------------------------------------------------------------
# a state its step never reads: the next value is a product of the input alone
UNREAD_STATE = """
cell unread_state {
    dim D, H
    input x[D]
    state h[H]
    param W[D, H]
    a = x @ W
    next h = a
    output y = tanh(a)
}
"""

# a state that is the input as it is (the step computes nothing for it), beside one that is read
COPIED_STATE = """
cell copied_state {
    dim D, H
    input x[D]
    state h[H], c[D]
    param W[D, H], U[H, H]
    h_new = tanh(x @ W + h @ U)
    next h = h_new
    next c = x
    output y = h_new
}
"""

# states read only by each other's next values (a chain and a swap), and one read only by an output
CROSSED_STATES = """
cell crossed_states {
    dim D
    input x[D]
    state h[D], c[D], s[D], u[D], o[D]
    next h = c
    next c = tanh(x)
    next s = u
    next u = s
    next o = x * 2
    output y = tanh(o + x)
}
"""

# an input, a context and params no region reads, beside a context the step never reads
# (only the once-per-sequence region does) and an input only the hoisted rows read
UNUSED_DECLARATIONS = """
cell unused_declarations {
    dim D, H
    input x[D], z[D]
    context e[H], unused[H]
    state h[H]
    param W[D, H], U[H, H], V[H, H], spare[D]
    ctx = tanh(e @ V)
    h_new = tanh(x @ W + h @ U + ctx)
    next h = h_new
    output y = h_new
}
"""

UNREAD_CELLS = {"state": UNREAD_STATE, "copied_state": COPIED_STATE, "crossed_states": CROSSED_STATES,
                "unused_declarations": UNUSED_DECLARATIONS}
