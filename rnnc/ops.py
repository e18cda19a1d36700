"""The op registry: every fact about an op, registered together.

Each `defop(...)` call states one op's shape rule, NumPy implementation,
derivative (VJP) rule, CUDA expression and cost side by side, as JAX defines
each primitive together with its rules.

Conventions:
- Shapes are per example (no batch axis). A NumPy rule receives arrays with a
  leading batch axis when the value is batched. Elementwise rules receive
  their arguments already aligned to the result's rank (see `align`).
- A VJP rule receives a `Builder`, the forward node and the name of the
  cotangent of its result, and returns one cotangent name (or None) per input.
- `cuda` is a C expression over `{0}`, `{1}` for elementwise ops and None for
  the others, which the CUDA code generator lowers itself: structural ops to
  index arithmetic, products, reductions and softmax to kernels of their own.
- `flops` is the cost per example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .ir import Node, Value
from .shapes import Size, broadcast, concrete_shape, shape_str


class ShapeError(Exception):
    """A shape rule refused its arguments; the checker adds the position."""


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | None  # None: any number of arguments
    shape: Callable  # (arg shapes, attrs) -> result shape
    numpy: Callable  # (node, *arrays) -> array
    vjp: Callable | None  # (builder, node, cotangent) -> [cotangent or None per arg]
    cuda: str | None  # elementwise C expression, None for structural ops
    flops: Callable  # (node, arg shapes as int tuples) -> flops per example
    elementwise: bool = False
    batched: Callable | None = None  # (arg batched flags, attrs) -> bool; default any()


OPS: dict[str, OpDef] = {}


def defop(name, arity, shape, numpy, vjp, cuda, flops, elementwise=False, batched=None):
    OPS[name] = OpDef(name, arity, shape, numpy, vjp, cuda, flops, elementwise, batched)


def numel(shape) -> int:
    """Elements of a shape of bound sizes or of ints."""
    return math.prod(int(s.value) if isinstance(s, Size) else int(s) for s in shape)


# --- shape rules shared by several ops ---------------------------------------
def same_shape(shapes, attrs):
    return shapes[0]


def broadcast_shapes(shapes, attrs):
    out = shapes[0]
    for s in shapes[1:]:
        b = broadcast(out, s)
        if b is None:
            raise ShapeError(f"shapes {shape_str(out)} and {shape_str(s)} do not broadcast")
        out = b
    return out


def norm_axis(axis: int, rank: int, shape) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"axis {axis} is out of range for shape {shape_str(shape)} (rank {rank})")
    return axis % rank


def per_element(k):
    """Cost of k flops per element of the result."""
    return lambda n, shapes: k * numel(n.shape)


# --- the builder that VJP rules and the checker use ---------------------------
class Builder:
    """Appends nodes to a region, inferring each result's shape and batchedness."""

    def __init__(self, values: dict, prefix: str = "%"):
        self.values = dict(values)  # name -> Value
        self.nodes: list[Node] = []
        self.producers: dict[str, Node] = {}  # name -> the node of `nodes` that makes it
        self.prefix = prefix
        self.counter = 0

    def fresh(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"

    def emit(self, op: str, *args: str, name: str | None = None, pos=None, **attrs) -> str:
        opdef = OPS[op]
        arg_values = [self.values[a] for a in args]
        shape = opdef.shape([v.shape for v in arg_values], attrs)
        flags = [v.batched for v in arg_values]
        batched = opdef.batched(flags, attrs) if opdef.batched else any(flags)
        node = Node(name or self.fresh(), op, tuple(args), tuple(sorted(attrs.items())),
                    tuple(shape), batched, pos)
        self.nodes.append(node)
        self.producers[node.out] = node
        self.values[node.out] = node.value
        return node.out

    # shorthands for VJP rules
    def const(self, value: float) -> str:
        return self.emit("const", value=float(value))

    def add(self, a, b): return self.emit("add", a, b)
    def sub(self, a, b): return self.emit("sub", a, b)
    def mul(self, a, b): return self.emit("mul", a, b)
    def div(self, a, b): return self.emit("div", a, b)
    def neg(self, a): return self.emit("neg", a)

    def reduce_to(self, g: str, like: str) -> str:
        """Sum the cotangent `g` down to the shape and batchedness of value `like`."""
        gv, target = self.values[g], self.values[like]
        if gv.shape == target.shape and gv.batched == target.batched:
            return g
        return self.emit("reduce_to", g, shape=tuple(target.shape), batched=target.batched,
                         src_batched=gv.batched)


# --- NumPy helpers -------------------------------------------------------------
def align(array: np.ndarray, batched: bool, rank: int) -> np.ndarray:
    """Insert unit axes after the batch axis so a batched per-example array of
    lower rank broadcasts against rank-`rank` values the per-example way."""
    if not batched:
        return array
    missing = rank - (array.ndim - 1)
    if missing <= 0:
        return array
    return array.reshape(array.shape[:1] + (1,) * missing + array.shape[1:])


def einsum2(spec: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A two-operand einsum that runs on BLAS (tensordot) when no axis is shared
    by both operands and the result, and on np.einsum otherwise."""
    ins, out = spec.split("->")
    la, lb = ins.split(",")
    shared_kept = set(la) & set(lb) & set(out)
    if shared_kept:
        return np.einsum(spec, a, b, optimize=True)
    summed = [c for c in la if c in lb]
    res = np.tensordot(a, b, axes=([la.index(c) for c in summed], [lb.index(c) for c in summed]))
    order = [c for c in la if c not in summed] + [c for c in lb if c not in summed]
    perm = [order.index(c) for c in out]
    return res if perm == sorted(perm) else res.transpose(perm)


def sigmoid_np(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow for large |x|


def softplus_np(x):
    return np.logaddexp(0.0, x)


def g_where_wins(B, g, x, y, larger: bool):
    """The cotangent of max (larger) or min for argument x against y: g where x
    is strictly the larger (smaller) one, 0 elsewhere and at a tie, summed down
    to x's shape."""
    wins = B.emit("gt", x, y) if larger else B.emit("gt", y, x)
    return B.reduce_to(B.mul(g, wins), x)


# --- elementwise ops -------------------------------------------------------------
defop("add", 2, broadcast_shapes, lambda n, a, b: a + b,
      lambda B, n, g: [B.reduce_to(g, n.args[0]), B.reduce_to(g, n.args[1])],
      "({0} + {1})", per_element(1), elementwise=True)
defop("sub", 2, broadcast_shapes, lambda n, a, b: a - b,
      lambda B, n, g: [B.reduce_to(g, n.args[0]), B.reduce_to(B.neg(g), n.args[1])],
      "({0} - {1})", per_element(1), elementwise=True)
defop("mul", 2, broadcast_shapes, lambda n, a, b: a * b,
      lambda B, n, g: [B.reduce_to(B.mul(g, n.args[1]), n.args[0]),
                       B.reduce_to(B.mul(g, n.args[0]), n.args[1])],
      "({0} * {1})", per_element(1), elementwise=True)
defop("div", 2, broadcast_shapes, lambda n, a, b: a / b,
      lambda B, n, g: [B.reduce_to(B.div(g, n.args[1]), n.args[0]),
                       B.reduce_to(B.neg(B.mul(B.div(g, n.args[1]), n.out)), n.args[1])],
      "({0} / {1})", per_element(1), elementwise=True)
defop("max", 2, broadcast_shapes, lambda n, a, b: np.maximum(a, b),
      lambda B, n, g: [g_where_wins(B, g, *n.args, larger=True),
                       g_where_wins(B, g, *reversed(n.args), larger=True)],
      "fmaxf({0}, {1})", per_element(1), elementwise=True)
defop("min", 2, broadcast_shapes, lambda n, a, b: np.minimum(a, b),
      lambda B, n, g: [g_where_wins(B, g, *n.args, larger=False),
                       g_where_wins(B, g, *reversed(n.args), larger=False)],
      "fminf({0}, {1})", per_element(1), elementwise=True)
# gt(a, b) is 1 where a > b else 0: the derivative of max, min, relu and abs,
# which is 0 at a tie. It only appears in backward graphs.
defop("gt", 2, broadcast_shapes, lambda n, a, b: (a > b).astype(np.result_type(a, b)),
      lambda B, n, g: [None, None],
      "(({0} > {1}) ? 1.0f : 0.0f)", per_element(1), elementwise=True)
# select(c, a, b) is a where c is nonzero, else b: the lengths mask
# (rnnc/passes/mask.py). Unlike c * a + (1 - c) * b, a NaN or inf in the
# branch not taken never reaches the result.
defop("select", 3, broadcast_shapes, lambda n, c, a, b: np.where(c != 0, a, b),
      lambda B, n, g: [None, B.reduce_to(B.emit("select", n.args[0], g, B.const(0)), n.args[1]),
                       B.reduce_to(B.emit("select", n.args[0], B.const(0), g), n.args[2])],
      "(({0} != 0.0f) ? {1} : {2})", per_element(1), elementwise=True)
defop("neg", 1, same_shape, lambda n, x: -x,
      lambda B, n, g: [B.neg(g)],
      "(-{0})", per_element(1), elementwise=True)
defop("sigmoid", 1, same_shape, lambda n, x: sigmoid_np(x),
      lambda B, n, g: [B.mul(g, B.mul(n.out, B.sub(B.const(1), n.out)))],
      "(1.0f / (1.0f + expf(-{0})))", per_element(4), elementwise=True)
defop("tanh", 1, same_shape, lambda n, x: np.tanh(x),
      lambda B, n, g: [B.mul(g, B.sub(B.const(1), B.mul(n.out, n.out)))],
      "tanhf({0})", per_element(4), elementwise=True)
defop("relu", 1, same_shape, lambda n, x: np.maximum(x, 0),
      lambda B, n, g: [B.mul(g, B.emit("gt", n.args[0], B.const(0)))],
      "fmaxf({0}, 0.0f)", per_element(1), elementwise=True)
defop("exp", 1, same_shape, lambda n, x: np.exp(x),
      lambda B, n, g: [B.mul(g, n.out)],
      "expf({0})", per_element(4), elementwise=True)
defop("log", 1, same_shape, lambda n, x: np.log(x),
      lambda B, n, g: [B.div(g, n.args[0])],
      "logf({0})", per_element(4), elementwise=True)
defop("sqrt", 1, same_shape, lambda n, x: np.sqrt(x),
      lambda B, n, g: [B.div(g, B.mul(B.const(2), n.out))],
      "sqrtf({0})", per_element(4), elementwise=True)
defop("abs", 1, same_shape, lambda n, x: np.abs(x),
      lambda B, n, g: [B.mul(g, B.sub(B.emit("gt", n.args[0], B.const(0)),
                                      B.emit("gt", B.const(0), n.args[0])))],
      "fabsf({0})", per_element(1), elementwise=True)
defop("softplus", 1, same_shape, lambda n, x: softplus_np(x),
      lambda B, n, g: [B.mul(g, B.emit("sigmoid", n.args[0]))],
      "(fmaxf({0}, 0.0f) + log1pf(expf(-fabsf({0}))))", per_element(5), elementwise=True)
# A literal is a Python float, which NumPy treats as weakly typed: it never
# widens a float32 array to float64.
defop("const", 0, lambda shapes, attrs: (), lambda n: n.attr("value"),
      lambda B, n, g: [],
      "{value}", lambda n, shapes: 0, elementwise=True)


# --- contraction ---------------------------------------------------------------------
BATCH = "z"  # the letter of the hidden batch axis in `dot` specs


def matmul_spec(a: Value, b: Value) -> str:
    """The `dot` spec of `a @ b` under NumPy matmul rules on per-example shapes
    (vectors and matrices); the batch axis is a letter of its own, so it never
    mixes with the others."""
    ra, rb = len(a.shape), len(b.shape)
    if not (1 <= ra <= 2 and 1 <= rb <= 2):
        raise ShapeError(f"'@' takes vectors and matrices, not shapes {shape_str(a.shape)} "
                         f"and {shape_str(b.shape)}")
    la = "ik"[2 - ra:]
    lb = "kj"[: rb]
    out = la[:-1] + lb[1:]
    z = BATCH if a.batched or b.batched else ""
    return (BATCH if a.batched else "") + la + "," + (BATCH if b.batched else "") + lb + "->" + z + out


def _dot_letters(spec):
    ins, out = spec.split("->")
    la, lb = ins.split(",")
    return la.replace(BATCH, ""), lb.replace(BATCH, ""), out.replace(BATCH, "")


def dot_shape(shapes, attrs):
    la, lb, out = _dot_letters(attrs["spec"])
    sizes = {}
    for letters, shape in ((la, shapes[0]), (lb, shapes[1])):
        for c, s in zip(letters, shape):
            if c in sizes and sizes[c] != s:
                raise ShapeError(f"matmul inner sizes differ: {shape_str(shapes[0])} @ "
                                 f"{shape_str(shapes[1])} ({sizes[c]} vs {s})")
            sizes.setdefault(c, s)
    return tuple(sizes[c] for c in out)


def dot_vjp(B, n, g):
    """d(a) = g contracted with b back to a's letters; likewise for b."""
    ins, out = n.attr("spec").split("->")
    la, lb = ins.split(",")
    a, b = n.args
    da = B.emit("dot", g, b, spec=f"{out},{lb}->{la}")
    db = B.emit("dot", a, g, spec=f"{la},{out}->{lb}")
    return [da, db]


def dot_flops(n, shapes):
    la, lb, _ = _dot_letters(n.attr("spec"))
    sizes = dict(zip(la, shapes[0][-len(la):] if la else ()))
    sizes.update(zip(lb, shapes[1][-len(lb):] if lb else ()))
    return 2 * math.prod(sizes.values())


defop("dot", 2, dot_shape, lambda n, a, b: einsum2(n.attr("spec"), a, b), dot_vjp, None, dot_flops,
      batched=lambda flags, attrs: BATCH in attrs["spec"].split("->")[1])


# --- reductions and softmax over one per-example axis ------------------------------
def reduce_shape(shapes, attrs):
    shape = shapes[0]
    axis = norm_axis(attrs["axis"], len(shape), shape)
    if attrs.get("keepdims"):
        return shape[:axis] + (Size.const(1),) + shape[axis + 1:]
    return shape[:axis] + shape[axis + 1:]


def _numpy_axis(n, x):
    """The NumPy axis of array `x` that node `n`'s per-example `axis` names
    (one further when `x` has the batch axis)."""
    return n.attr("axis") % (x.ndim - n.batched) + int(n.batched)


def reduce_vjp(scale):
    def vjp(B, n, g):
        x = B.values[n.args[0]]
        back = B.emit("broadcast_in", g, shape=tuple(x.shape),
                      axis=None if n.attr("keepdims") else n.attr("axis") % len(x.shape))
        if scale:
            back = B.div(back, B.const(x.shape[n.attr("axis") % len(x.shape)].value))
        return [back]
    return vjp


defop("sum", 1, reduce_shape,
      lambda n, x: x.sum(axis=_numpy_axis(n, x), keepdims=bool(n.attr("keepdims"))),
      reduce_vjp(scale=False), None, lambda n, shapes: numel(shapes[0]))
defop("mean", 1, reduce_shape,
      lambda n, x: x.mean(axis=_numpy_axis(n, x), keepdims=bool(n.attr("keepdims"))),
      reduce_vjp(scale=True), None, lambda n, shapes: numel(shapes[0]) + numel(n.shape))


def softmax_np(n, x):
    axis = _numpy_axis(n, x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_vjp(B, n, g):
    # dx = y * (g - sum(g * y, axis, keepdims))
    inner = B.emit("sum", B.mul(g, n.out), axis=n.attr("axis"), keepdims=1)
    return [B.mul(n.out, B.sub(g, inner))]


def softmax_shape(shapes, attrs):
    norm_axis(attrs["axis"], len(shapes[0]), shapes[0])  # refuses an axis out of range
    return shapes[0]


defop("softmax", 1, softmax_shape, softmax_np, softmax_vjp, None, lambda n, shapes: 5 * numel(n.shape))


# --- structure: slices, concatenation, transposes, gradient plumbing ------------
def slice_shape(shapes, attrs):
    shape = shapes[0]
    axis = norm_axis(attrs["axis"], len(shape), shape)
    return shape[:axis] + (attrs["stop"] - attrs["start"],) + shape[axis + 1:]


def slice_np(n, x):
    axis = _numpy_axis(n, x)
    index = [slice(None)] * x.ndim
    index[axis] = slice(n.attr("start").value, n.attr("stop").value)
    return x[tuple(index)]


def slice_vjp(B, n, g):
    x = B.values[n.args[0]]
    axis = n.attr("axis") % len(x.shape)
    return [B.emit("pad", g, axis=axis, before=n.attr("start"),
                   after=x.shape[axis] - n.attr("stop"))]


defop("slice", 1, slice_shape, slice_np, slice_vjp, None, lambda n, shapes: 0)


def pad_shape(shapes, attrs):
    shape, axis = shapes[0], attrs["axis"]
    return shape[:axis] + (shape[axis] + attrs["before"] + attrs["after"],) + shape[axis + 1:]


def pad_np(n, g):
    axis = n.attr("axis") + int(n.batched)
    widths = [(0, 0)] * g.ndim
    widths[axis] = (n.attr("before").value, n.attr("after").value)
    return np.pad(g, widths)


defop("pad", 1, pad_shape, pad_np, None, None, lambda n, shapes: 0)


def concat_shape(shapes, attrs):
    first = shapes[0]
    axis = norm_axis(attrs["axis"], len(first), first)
    total = first[axis]
    for s in shapes[1:]:
        if len(s) != len(first) or any(x != y for i, (x, y) in enumerate(zip(s, first)) if i != axis):
            raise ShapeError(f"concat needs equal shapes except along axis {attrs['axis']}: "
                             f"{shape_str(first)} and {shape_str(s)}")
        total = total + s[axis]
    return first[:axis] + (total,) + first[axis + 1:]


def concat_np(n, *xs):
    rank = len(n.shape)
    batch = next((x.shape[0] for x in xs if x.ndim > rank), None)
    xs = [np.broadcast_to(x, (batch,) + x.shape) if batch is not None and x.ndim == rank else x
          for x in xs]
    return np.concatenate(xs, axis=n.attr("axis") % rank + int(n.batched))


def concat_vjp(B, n, g):
    axis = n.attr("axis") % len(n.shape)
    start, grads = Size.const(0), []
    for a in n.args:
        stop = start + B.values[a].shape[axis]
        grads.append(B.reduce_to(B.emit("slice", g, axis=axis, start=start, stop=stop), a))
        start = stop
    return grads


defop("concat", None, concat_shape, concat_np, concat_vjp, None, lambda n, shapes: 0)


def transpose_shape(shapes, attrs):
    if len(shapes[0]) != 2:
        raise ShapeError(f"transpose takes a matrix, not shape {shape_str(shapes[0])}")
    return shapes[0][::-1]


defop("transpose", 1, transpose_shape, lambda n, x: np.swapaxes(x, -1, -2),
      lambda B, n, g: [B.emit("transpose", g)], None, lambda n, shapes: 0)


def reduce_to_np(n, g):
    """Sum `g` down to the target shape: over the batch axis when the target is
    shared, over leading axes the target lacks, and over its unit axes."""
    target = concrete_shape(n.attr("shape"))
    if n.attr("src_batched") and not n.batched:
        g = g.sum(axis=0)
    lead = int(n.batched)
    extra = g.ndim - lead - len(target)
    if extra:
        g = g.sum(axis=tuple(range(lead, lead + extra)))
    units = tuple(lead + i for i, s in enumerate(target) if s == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=units, keepdims=True) if units else g


def shape_attr(shapes, attrs):
    """The shape rule of gradient plumbing: the result's shape is an attribute."""
    return attrs["shape"]


defop("reduce_to", 1, shape_attr, reduce_to_np, None, None, lambda n, shapes: numel(shapes[0]),
      batched=lambda flags, attrs: attrs["batched"])


def broadcast_in_np(n, g):
    lead = int(n.batched)
    if n.attr("axis") is not None:
        g = np.expand_dims(g, n.attr("axis") + lead)
    target = concrete_shape(n.attr("shape"))
    return np.broadcast_to(g, g.shape[:lead] + target)


defop("broadcast_in", 1, shape_attr, broadcast_in_np, None, None, lambda n, shapes: 0)
