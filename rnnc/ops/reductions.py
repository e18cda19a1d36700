"""Sums over axes, and softmax.

`sum`, `mean` and `reduce_to` (the derivatives' sum of a cotangent down to a
value's shape) are kernels of reduce.cu.j2; their CUDA parameters say which
axes of the argument are summed, whether its rows are (a shared result of a
batched argument) and whether the sum is divided by its count. `softmax` is a
kernel of softmax.cu.j2 over one axis.
"""
from __future__ import annotations

import numpy as np

from ..shapes import Size, concrete_shape
from .registry import FLAG, INTEGER, Function, Internal, Kernel, Param, defop
from .rules import norm_axis, numel, numpy_axis, shape_attr

AXIS = Param("axis", INTEGER, -1)


def reduce_shape(shapes, attrs):
    shape = shapes[0]
    axis = norm_axis(attrs["axis"], shape)
    if attrs["keepdims"]:
        return shape[:axis] + (Size.const(1),) + shape[axis + 1:]
    return shape[:axis] + shape[axis + 1:]


def reduce_vjp(scale):
    def vjp(B, n, g):
        x = B.values[n.args[0]]
        axis = n.attr("axis") % len(x.shape)
        back = B.emit("broadcast_in", g, shape=tuple(x.shape), axis=None if n.attr("keepdims") else axis)
        if scale:
            back = B.div(back, B.const(x.shape[axis].value))
        return [back]
    return vjp


def over_axis(mean: bool):
    """The reduce kernel's parameters of sum (mean: divided by the count) over one axis."""
    return lambda n, x: {"axes": (n.attr("axis") % len(x.shape),), "rows": False, "mean": mean}


def reduction(name, numpy, mean: bool, flops):
    defop(name, syntax=Function(name, keywords=(AXIS, Param("keepdims", FLAG, 0))), shape=reduce_shape,
          numpy=lambda n, x: numpy(x, axis=numpy_axis(n, x), keepdims=bool(n.attr("keepdims"))),
          vjp=reduce_vjp(scale=mean), flops=flops, recompute=True, cuda=Kernel("reduce.cu.j2", over_axis(mean)))


reduction("sum", lambda x, **kw: x.sum(**kw), mean=False, flops=lambda n, shapes: numel(shapes[0]))
reduction("mean", lambda x, **kw: x.mean(**kw), mean=True, flops=lambda n, shapes: numel(shapes[0]) + numel(n.shape))


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


def reduce_to_axes(n, x):
    """The reduce kernel's parameters of reduce_to: the leading axes the target
    lacks, the unit axes it has where `x` does not, and the rows when the
    target is shared."""
    target = concrete_shape(n.attr("shape"))
    shape = tuple(x.shape)
    lead = len(shape) - len(target)
    units = tuple(lead + k for k, t in enumerate(target) if t == 1 and shape[lead + k] != 1)
    return {"axes": tuple(range(lead)) + units, "rows": x.batched and not n.batched, "mean": False}


defop("reduce_to", syntax=Internal("derivatives: a cotangent summed down to the shape of a value that was broadcast"),
      shape=shape_attr, numpy=reduce_to_np, vjp=None, flops=lambda n, shapes: numel(shapes[0]), recompute=True,
      cuda=Kernel("reduce.cu.j2", reduce_to_axes), sums_rows=True, batched=lambda flags, attrs: attrs["batched"])


def softmax_shape(shapes, attrs):
    norm_axis(attrs["axis"], shapes[0])  # refuses an axis out of range
    return shapes[0]


def softmax_np(n, x):
    axis = numpy_axis(n, x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_vjp(B, n, g):
    # dx = y * (g - sum(g * y, axis, keepdims))
    inner = B.emit("sum", B.mul(g, n.out), axis=n.attr("axis"), keepdims=1)
    return [B.mul(n.out, B.sub(g, inner))]


defop("softmax", syntax=Function("softmax", keywords=(AXIS,)), shape=softmax_shape, numpy=softmax_np,
      vjp=softmax_vjp, flops=lambda n, shapes: 5 * numel(n.shape), recompute=True,
      cuda=Kernel("softmax.cu.j2", lambda n, x: {"axis": n.attr("axis") % len(x.shape)}))
