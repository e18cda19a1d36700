"""Every op's facts, and every op's derivative against finite differences."""
import inspect
import re
from importlib import resources

import numpy as np
import pytest

import rnnc
from rnnc.backends.cuda.kernels import BUILDERS
from rnnc.gradcheck import gradcheck
from rnnc.ops import OPS, CExpr, Function, Inline, Internal, Kernel, LiteralKind, Number, Operator
from rnnc.ops.registry import REQUIRED

TEMPLATES = resources.files("rnnc.templates")


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_declares_every_fact(name):
    """What the checker, planner and both backends read of an op is all there:
    an op without a fact fails here, not in a pass that meets it later."""
    op = OPS[name]
    assert isinstance(op.syntax, (Function, Operator, Number, Internal)), "how a cell writes it"
    if isinstance(op.syntax, Internal):
        assert op.syntax.why, "an internal op says what makes it"
    if isinstance(op.syntax, Function):
        for param in op.syntax.params + op.syntax.keywords:
            assert param.kind is None or isinstance(param.kind, LiteralKind), param
        for keyword in op.syntax.keywords:
            assert isinstance(keyword.kind, LiteralKind) and keyword.default is not REQUIRED, keyword
            assert keyword.kind.allows(keyword.default), keyword
    for fact in ("shape", "numpy", "flops"):
        assert callable(getattr(op, fact)), f"{name} has no {fact} rule"
    # everything a cell writes has a derivative; only ops of backward graphs may lack one
    assert callable(op.vjp) or (op.vjp is None and isinstance(op.syntax, Internal)), f"{name} has no derivative"
    assert all(isinstance(fact, bool) for fact in (op.recompute, op.rounds_inputs, op.sums_rows))
    lowering = op.cuda
    if isinstance(lowering, CExpr):
        arity = op.arity or 0
        args = [f"ARG{i}" for i in range(arity)]
        attrs = {"value": "1.0f"} if isinstance(op.syntax, Number) else {}
        c = lowering.expr.format(*args, **attrs)
        assert all(a in c for a in args), f"{name}'s C expression leaves out an argument: {c}"
    elif isinstance(lowering, Inline):
        assert inspect.isgeneratorfunction(lowering.lower), f"{name}'s lowering yields what it reads"
    else:
        assert isinstance(lowering, Kernel), f"{name} has no CUDA lowering"
        assert TEMPLATES.joinpath(lowering.template).is_file(), lowering.template
        assert lowering.template in BUILDERS and callable(lowering.params)


def test_every_language_name_is_one_op():
    functions = [op.syntax.name for op in OPS.values() if isinstance(op.syntax, Function)]
    operators = [op.syntax for op in OPS.values() if isinstance(op.syntax, Operator)]
    assert len(set(functions)) == len(functions) and len({o.rule for o in operators}) == len(operators)
    # every operator of the grammar, by the name its rule gives it
    grammar = resources.files("rnnc.grammar").joinpath("cell.lark").read_text()
    assert {o.rule for o in operators} == set(re.findall(r"-> (\w+)", grammar)) - {"number", "name", "call", "keyword"}


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
    # the masks held fixed (gradcheck draws them all from one seed): per step, per
    # sequence (a context's, and variational), shared by the batch (a param's), and zoneout's
    "dropout": "next h = tanh(dropout(x * h, 0.3) + dropout(h, 0.5, variational=1) * dropout(v, 0.25)) "
               "+ sum(dropout(enc, 0.4), axis=0)",
    "zoneout": "next h = zoneout(tanh(x + h @ P), h, 0.3) + zoneout(v, x, 0.5)",
}


def test_every_op_with_a_derivative_is_checked_by_finite_differences():
    """A new op's derivative rule fails here until a cell above runs it."""
    run = set()
    for body in BODIES.values():
        prog = rnnc.compile(CELL.format(body=body), dims={"N": 4, "S": 3}, recompute="none")
        run |= {n.op for n in prog.cell.graph.nodes}
    derived = {name for name, op in OPS.items() if op.vjp is not None and not isinstance(op.syntax, Internal)}
    assert not derived - run, f"no finite-difference check of {sorted(derived - run)}"


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
