"""Elementwise ops: arithmetic, comparisons and the activation functions.

Each is fused into the CUDA backend's phase kernels as its C expression
(`CExpr`); the NumPy rule receives its arguments aligned to the result's rank.
A derivative that is 0 at a tie (max, min, relu, abs) is written with `gt`,
which is 0 there.
"""
from __future__ import annotations

import numpy as np

from .registry import CExpr, Function, Internal, Number, Operator, Param, defop
from .rules import broadcast_shapes, per_element, same_shape

BINARY = (Param("a"), Param("b"))


def arithmetic(name, symbol, numpy, vjp, c):
    defop(name, syntax=Operator(symbol, name), shape=broadcast_shapes, numpy=numpy, vjp=vjp, flops=per_element(1),
          recompute=True, cuda=CExpr(c))


def unary(name, numpy, vjp, c, flops=4):
    defop(name, syntax=Function(name), shape=same_shape, numpy=numpy, vjp=vjp, flops=per_element(flops),
          recompute=True, cuda=CExpr(c))


def where_wins(B, g, x, y, larger: bool):
    """The cotangent of max (larger) or min for argument x against y: g where x
    is strictly the larger (smaller) one, 0 elsewhere and at a tie, summed down
    to x's shape."""
    wins = B.gt(x, y) if larger else B.gt(y, x)
    return B.reduce_to(B.mul(g, wins), x)


def extremum(name, numpy, c, larger):
    defop(name, syntax=Function(name, BINARY), shape=broadcast_shapes, numpy=numpy,
          vjp=lambda B, n, g: [where_wins(B, g, *n.args, larger=larger),
                               where_wins(B, g, *reversed(n.args), larger=larger)],
          flops=per_element(1), recompute=True, cuda=CExpr(c))


arithmetic("add", "+", lambda n, a, b: a + b,
           lambda B, n, g: [B.reduce_to(g, n.args[0]), B.reduce_to(g, n.args[1])], "({0} + {1})")
arithmetic("sub", "-", lambda n, a, b: a - b,
           lambda B, n, g: [B.reduce_to(g, n.args[0]), B.reduce_to(B.neg(g), n.args[1])], "({0} - {1})")
arithmetic("mul", "*", lambda n, a, b: a * b,
           lambda B, n, g: [B.reduce_to(B.mul(g, n.args[1]), n.args[0]),
                            B.reduce_to(B.mul(g, n.args[0]), n.args[1])], "({0} * {1})")
arithmetic("div", "/", lambda n, a, b: a / b,
           lambda B, n, g: [B.reduce_to(B.div(g, n.args[1]), n.args[0]),
                            B.reduce_to(B.neg(B.mul(B.div(g, n.args[1]), n.out)), n.args[1])], "({0} / {1})")
defop("neg", syntax=Operator("-", "neg"), shape=same_shape, numpy=lambda n, x: -x,
      vjp=lambda B, n, g: [B.neg(g)], flops=per_element(1), recompute=True, cuda=CExpr("(-{0})"))

extremum("max", lambda n, a, b: np.maximum(a, b), "fmaxf({0}, {1})", larger=True)
extremum("min", lambda n, a, b: np.minimum(a, b), "fminf({0}, {1})", larger=False)
defop("gt", syntax=Internal("the derivative of max, min, relu and abs: 1 where a > b, else 0 (at a tie too)", 2),
      shape=broadcast_shapes, numpy=lambda n, a, b: (a > b).astype(np.result_type(a, b)),
      vjp=lambda B, n, g: [None, None], flops=per_element(1), recompute=True,
      cuda=CExpr("(({0} > {1}) ? 1.0f : 0.0f)"))

# select(c, a, b) is a where c is nonzero, else b. Unlike c * a + (1 - c) * b,
# a NaN or inf in the branch not taken never reaches the result.
defop("select", syntax=Internal("the lengths mask (rnnc/passes/mask.py): a where c is nonzero, else b", 3),
      shape=broadcast_shapes, numpy=lambda n, c, a, b: np.where(c != 0, a, b),
      vjp=lambda B, n, g: [None, B.reduce_to(B.emit("select", n.args[0], g, B.const(0)), n.args[1]),
                           B.reduce_to(B.emit("select", n.args[0], B.const(0), g), n.args[2])],
      flops=per_element(1), recompute=True, cuda=CExpr("(({0} != 0.0f) ? {1} : {2})"))


def sigmoid_np(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow for large |x|


unary("sigmoid", lambda n, x: sigmoid_np(x),
      lambda B, n, g: [B.mul(g, B.mul(n.out, B.sub(B.const(1), n.out)))], "(1.0f / (1.0f + expf(-{0})))")
unary("tanh", lambda n, x: np.tanh(x),
      lambda B, n, g: [B.mul(g, B.sub(B.const(1), B.mul(n.out, n.out)))], "tanhf({0})")
unary("relu", lambda n, x: np.maximum(x, 0),
      lambda B, n, g: [B.mul(g, B.gt(n.args[0], B.const(0)))], "fmaxf({0}, 0.0f)", flops=1)
unary("exp", lambda n, x: np.exp(x), lambda B, n, g: [B.mul(g, n.out)], "expf({0})")
unary("log", lambda n, x: np.log(x), lambda B, n, g: [B.div(g, n.args[0])], "logf({0})")
unary("sqrt", lambda n, x: np.sqrt(x), lambda B, n, g: [B.div(g, B.mul(B.const(2), n.out))], "sqrtf({0})")
unary("abs", lambda n, x: np.abs(x),
      lambda B, n, g: [B.mul(g, B.sub(B.gt(n.args[0], B.const(0)), B.gt(B.const(0), n.args[0])))],
      "fabsf({0})", flops=1)
unary("softplus", lambda n, x: np.logaddexp(0.0, x), lambda B, n, g: [B.mul(g, B.emit("sigmoid", n.args[0]))],
      "(fmaxf({0}, 0.0f) + log1pf(expf(-fabsf({0}))))", flops=5)

# A literal is a Python float, which NumPy treats as weakly typed: it never
# widens a float32 array to float64.
defop("const", syntax=Number(), shape=lambda shapes, attrs: (), numpy=lambda n: n.attr("value"),
      vjp=lambda B, n, g: [], flops=lambda n, shapes: 0, recompute=True, cuda=CExpr("{value}"))
