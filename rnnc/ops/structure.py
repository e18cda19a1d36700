"""Ops that move elements: split (slices), concatenation, transpose, and the
padding and broadcasting their derivatives make.

The CUDA backend fuses each into the phase kernels as index arithmetic: its
`Inline` lowering reads its argument at a moved index (yielding the value,
row and index it reads) and returns the C expression of its result.
"""
from __future__ import annotations

import numpy as np

from ..shapes import Size, concrete_shape, shape_str
from .registry import COUNT, INTEGER, Function, Inline, Internal, Param, ShapeError, defop
from .rules import free, norm_axis, numpy_axis, shape_attr

AXIS = Param("axis", INTEGER, -1)


# --- split: one slice per part ------------------------------------------------------------
def split_parts(values, given) -> list:
    """The attrs of each part's slice: `parts` equal slices along `axis`."""
    (x,), parts = values, given["parts"]
    axis = norm_axis(given["axis"], x.shape)
    size = x.shape[axis]
    part = size.divide(Size.const(parts))
    if not part.symbols and part.value is None:
        raise ShapeError(f"cannot split size {size} of {shape_str(x.shape)} into {parts} equal parts")
    return [{"axis": axis, "start": part * Size.const(k), "stop": part * Size.const(k + 1)} for k in range(parts)]


def slice_shape(shapes, attrs):
    shape = shapes[0]
    axis = norm_axis(attrs["axis"], shape)
    return shape[:axis] + (attrs["stop"] - attrs["start"],) + shape[axis + 1:]


def slice_np(n, x):
    index = [slice(None)] * x.ndim
    index[numpy_axis(n, x)] = slice(n.attr("start").value, n.attr("stop").value)
    return x[tuple(index)]


def slice_vjp(B, n, g):
    x = B.values[n.args[0]]
    axis = n.attr("axis") % len(x.shape)
    return [B.emit("pad", g, axis=axis, before=n.attr("start"), after=x.shape[axis] - n.attr("stop"))]


def lower_slice(loop, n, shape, row, index):
    axis = n.attr("axis") % len(shape)
    moved = list(index)
    moved[axis] = loop.temp_int(f"{index[axis]} + {n.attr('start').value}")
    return (yield n.args[0], row, tuple(moved))


defop("slice", syntax=Function("split", (Param("x"), Param("parts", COUNT)), (AXIS,), attrs=split_parts,
                               results="parts"),
      shape=slice_shape, numpy=slice_np, vjp=slice_vjp, flops=free, recompute=True, cuda=Inline(lower_slice))


def pad_shape(shapes, attrs):
    shape, axis = shapes[0], attrs["axis"]
    return shape[:axis] + (shape[axis] + attrs["before"] + attrs["after"],) + shape[axis + 1:]


def pad_np(n, g):
    widths = [(0, 0)] * g.ndim
    widths[n.attr("axis") + int(n.batched)] = (n.attr("before").value, n.attr("after").value)
    return np.pad(g, widths)


def lower_pad(loop, n, shape, row, index):
    # the argument is read at a clamped index (always in bounds) and the pad selects 0 outside
    axis, before = n.attr("axis"), n.attr("before").value
    size = shape[axis] - before - n.attr("after").value
    j = loop.temp_int(f"{index[axis]} - {before}")
    moved = list(index)
    moved[axis] = loop.clamp(j, size)
    inner = yield n.args[0], row, tuple(moved)
    return loop.temp("float", f"({j} >= 0 && {j} < {size}) ? {inner} : 0.0f")


defop("pad", syntax=Internal("the derivative of a slice: its cotangent with zeros around it"),
      shape=pad_shape, numpy=pad_np, vjp=None, flops=free, recompute=True, cuda=Inline(lower_pad))


# --- concatenation ------------------------------------------------------------------------------
def concat_shape(shapes, attrs):
    first = shapes[0]
    axis = norm_axis(attrs["axis"], first)
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
    xs = [np.broadcast_to(x, (batch,) + x.shape) if batch is not None and x.ndim == rank else x for x in xs]
    return np.concatenate(xs, axis=n.attr("axis") % rank + int(n.batched))


def concat_vjp(B, n, g):
    axis = n.attr("axis") % len(n.shape)
    start, grads = Size.const(0), []
    for a in n.args:
        stop = start + B.values[a].shape[axis]
        grads.append(B.reduce_to(B.emit("slice", g, axis=axis, start=start, stop=stop), a))
        start = stop
    return grads


def lower_concat(loop, n, shape, row, index):
    axis = n.attr("axis") % len(shape)
    start, parts = 0, []
    for a in n.args:
        size = loop.shape_of(a)[axis]
        moved = list(index)
        moved[axis] = loop.clamp(f"{index[axis]} - {start}", size)
        parts.append((start + size, (yield a, row, tuple(moved))))
        start += size
    expr = parts[-1][1]
    for stop, value in reversed(parts[:-1]):
        expr = f"({index[axis]} < {stop}) ? {value} : {expr}"
    return loop.temp("float", expr)


defop("concat", syntax=Function("concat", keywords=(AXIS,), variadic=True), shape=concat_shape,
      numpy=concat_np, vjp=concat_vjp, flops=free, recompute=True, cuda=Inline(lower_concat))


# --- transpose ------------------------------------------------------------------------------------
def transpose_shape(shapes, attrs):
    if len(shapes[0]) != 2:
        raise ShapeError(f"transpose takes a matrix, not shape {shape_str(shapes[0])}")
    return shapes[0][::-1]


def lower_transpose(loop, n, shape, row, index):
    return (yield n.args[0], row, tuple(reversed(index)))


defop("transpose", syntax=Function("transpose"), shape=transpose_shape,
      numpy=lambda n, x: np.swapaxes(x, -1, -2), vjp=lambda B, n, g: [B.emit("transpose", g)], flops=free,
      recompute=True, cuda=Inline(lower_transpose))


# --- broadcasting back along a summed axis -----------------------------------------------------
def broadcast_in_np(n, g):
    lead = int(n.batched)
    if n.attr("axis") is not None:
        g = np.expand_dims(g, n.attr("axis") + lead)
    return np.broadcast_to(g, g.shape[:lead] + concrete_shape(n.attr("shape")))


def lower_broadcast_in(loop, n, shape, row, index):
    axis = n.attr("axis")
    kept = tuple(ix for k, ix in enumerate(index) if k != axis)
    kept_shape = tuple(s for k, s in enumerate(shape) if k != axis)
    return (yield n.args[0], row, loop.broadcast(n.args[0], kept_shape, kept))


defop("broadcast_in", syntax=Internal("the derivative of sum and mean: the cotangent broadcast back "
                                      "along the summed axis (`axis`, None when it was kept)"),
      shape=shape_attr, numpy=broadcast_in_np, vjp=None, flops=free, recompute=True,
      cuda=Inline(lower_broadcast_in))
