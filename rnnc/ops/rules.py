"""Rules several ops share: shape rules, costs, and how NumPy rules see axes."""
from __future__ import annotations

import math

import numpy as np

from ..shapes import Size, broadcast, shape_str
from .registry import AxisError, ShapeError


def numel(shape) -> int:
    """Elements of a shape of bound sizes or of ints."""
    return math.prod(int(s.value) if isinstance(s, Size) else int(s) for s in shape)


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


def norm_axis(axis: int, shape) -> int:
    """`axis` counted from 0, or a ShapeError about the `axis` argument."""
    rank = len(shape)
    if not -rank <= axis < rank:
        raise AxisError(axis, shape_str(shape), rank)
    return axis % rank


def shape_attr(shapes, attrs):
    """The shape rule of gradient plumbing: the result's shape is an attribute."""
    return attrs["shape"]


def per_element(k):
    """Cost of k flops per element of the result."""
    return lambda n, shapes: k * numel(n.shape)


def free(n, shapes) -> int:
    """No arithmetic: the op only moves elements."""
    return 0


def align(array: np.ndarray, batched: bool, rank: int) -> np.ndarray:
    """Insert unit axes after the batch axis so a batched per-example array of
    lower rank broadcasts against rank-`rank` values the per-example way."""
    if not batched:
        return array
    missing = rank - (array.ndim - 1)
    if missing <= 0:
        return array
    return array.reshape(array.shape[:1] + (1,) * missing + array.shape[1:])


def numpy_axis(n, x) -> int:
    """The NumPy axis of array `x` that node `n`'s per-example `axis` names
    (one further when `x` has the batch axis)."""
    return n.attr("axis") % (x.ndim - n.batched) + int(n.batched)
