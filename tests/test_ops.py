"""Every op's rules, and every op's derivative against finite differences."""
import numpy as np
import pytest

import rnnc
from rnnc.frontend.check import BUILTINS
from rnnc.gradcheck import gradcheck
from rnnc.ops import OPS

# ops that only appear in backward graphs need no derivative of their own
BACKWARD_ONLY = {"gt", "pad", "reduce_to", "broadcast_in"}


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_every_rule(name):
    op = OPS[name]
    assert callable(op.shape) and callable(op.numpy) and callable(op.flops)
    if name not in BACKWARD_ONLY:
        assert callable(op.vjp), f"{name} has no derivative rule"
    if op.elementwise:
        assert isinstance(op.cuda, str) and op.cuda, f"{name} has no CUDA expression"


def test_every_language_function_is_an_op():
    lowered = {"split": "slice"}  # split lowers to one slice per part
    for func in BUILTINS:
        assert lowered.get(func, func) in OPS


# One small cell per construct: x and h are [4], enc is [3, 4] per example,
# P is a shared [4, 4] matrix, v a shared [4] vector.
CELL = """
cell probe {{
    dim N, S
    input x[N]
    context enc[S, N]
    state h[N]
    param P[N, N], v[N]
    {body}
}}
"""

BODIES = {
    "add_sub_mul_div": "next h = (x + h) * v - h / (x * x + 2)",
    "neg": "next h = -x * h + v",
    "sigmoid": "next h = sigmoid(x + h * v)",
    "tanh": "next h = tanh(x + h * v)",
    "relu": "next h = relu(x + h * v)",
    "exp": "next h = exp(0.3 * (x + h))",
    "log": "next h = log(x * x + h * h + 1)",
    "sqrt": "next h = sqrt(x * x + h * h + 1)",
    "abs": "next h = abs(x + h - v)",
    "softplus": "next h = softplus(x + h * v)",
    "max_min": "next h = max(x, h) + min(h, v)",
    "sum_keepdims": "next h = h + sum(x * h, axis=0, keepdims=1)",
    "sum_matrix_axis0": "next h = sum(enc * h, axis=0) + x",
    "mean": "next h = h * mean(x, axis=0, keepdims=1) + mean(enc * h, axis=0)",
    "softmax": "next h = softmax(x * h, axis=0)",
    "softmax_axis0_matrix": "a = softmax(enc * h, axis=0)\n next h = sum(a, axis=0) * x",
    "split_concat": "a, b = split(concat(x, h), 2)\n next h = a * b",
    "split_matrix_axis0": "a, b, c = split(enc, 3, axis=0)\n next h = sum(a + b * c, axis=0) + h",
    "transpose": "next h = tanh(h @ transpose(P) + x)",
    "vector_matrix": "next h = x @ P + h @ P",
    "matrix_vector": "next h = P @ h + x",
    "vector_vector": "next h = h * (x @ h) + v",
    "context_products": "alpha = softmax(enc @ h, axis=0)\n next h = alpha @ enc + x",
    "shared_only": "w = v * v + 1\n next h = h * w + x",
    "shared_matrix_broadcast": "next h = sum(P * h, axis=0) + x",
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_derivative_matches_finite_differences(name):
    prog = rnnc.compile(CELL.format(body=BODIES[name]), dims={"N": 4, "S": 3}, recompute="none")
    report = gradcheck(prog.load(dtype="float64"), T=3, B=2, seed=3)
    assert report.worst < 1e-6, report.format()


TIES = {
    "relu": ("next h = relu(x) + 0 * h", {"x": 0.0}),
    "abs": ("next h = abs(x) + 0 * h", {"x": 0.0}),
    "max": ("next h = max(x, h)", {"x": 1.0, "h": 1.0}),
    "min": ("next h = min(x, h)", {"x": 1.0, "h": 1.0}),
}


@pytest.mark.parametrize("name", sorted(TIES))
def test_derivative_at_a_tie_is_zero(name):
    body, values = TIES[name]
    text = "cell tie {\n dim N\n input x[N]\n state h[N]\n " + body + "\n}"
    mod = rnnc.compile(text, dims={"N": 3}).load()
    x = np.full((1, 2, 3), values["x"])
    h = np.full((2, 3), values.get("h", 0.5))
    res = mod.forward({"x": x}, {}, states={"h": h})
    g = mod.backward(res, d_states={"h": np.ones((2, 3))})
    assert np.all(g.inputs["x"] == 0)
    if "h" in values:
        assert np.all(g.states["h"] == 0)
