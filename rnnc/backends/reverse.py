"""Reverse time, for every backend: `forward(..., reverse=True)`.

Example b of length L_b reads its steps L_b-1, L_b-2, ..., 0 and its output
for step t lands at step t, as in the reverse direction of PyTorch's
bidirectional layers over a packed sequence; steps past L_b stay padding.

The backends do not run time backwards. At their entry points they permute
the steps of every array laid out over time (the inputs and outputs in the
forward, the outputs' cotangents and the inputs' gradients in the backward)
and run forward time in between. The permutation swaps steps t and L_b-1-t
of example b, so applying it again undoes it.
"""
from __future__ import annotations

import numpy as np


def step_order(T: int, B: int, lengths) -> np.ndarray:
    """[T, B]: the step that (t, b) takes its row from when time runs backwards."""
    t = np.arange(T)[:, None]
    last = np.full(B, T) if lengths is None else np.asarray(lengths)
    return np.where(t < last, last - 1 - t, t)


def flip(array, order):
    """A [T, B, ...] host array with its steps permuted by `order` (unchanged for None)."""
    if order is None:
        return array
    return array[order, np.arange(order.shape[1])]


def flip_copies(order, nbytes: int) -> list:
    """The same permutation of a dense [T, B, ...] array of `nbytes` bytes, as
    (destination offset, source offset, bytes) copies of contiguous runs of
    rows: for memory only a device can reach. One copy for None; one per step
    when all lengths are equal; at most one per row."""
    if order is None:
        return [(0, 0, nbytes)]
    if order.size == 0:
        return []
    row = nbytes // order.size
    source = (order * order.shape[1] + np.arange(order.shape[1])).ravel()  # row index, rows in order
    starts = np.flatnonzero(np.diff(source, prepend=source[0] - 2) != 1)
    counts = np.diff(np.append(starts, source.size))
    return [(int(i) * row, int(source[i]) * row, int(n) * row) for i, n in zip(starts, counts)]
