"""Checking the arrays a caller passes in, shared by every backend.

Nothing is broadcast or cast silently: a missing or unknown name, a wrong
shape, a batch size that differs between arguments, a wrong dtype or a length
outside 0..T is a ValueError that names the argument and both shapes; an
argument of the wrong kind (a list where a dict of arrays belongs) is an
ArgumentTypeError, both a TypeError and a ValueError. Where the shape is [] a
NumPy scalar of the right dtype is taken as a 0-d array.

Arrays over time are time first, [T, B, ...]: the first input fixes T and B,
and every other argument is checked against it. A batch-first array given by
mistake is caught wherever another argument knows the batch size (states,
contexts, lengths, cotangents), and those errors say how sequences are laid out.
"""
from __future__ import annotations

import numbers
import secrets
from collections.abc import Mapping

import numpy as np

from ..ir import Cell
from ..shapes import concrete_shape, shape_str


LAYOUT = "time first, [T, B, ...]"


def _shape_or_type(array) -> str:
    """How a wrong argument is described: its shape, or its type when it has none."""
    return shape_str(array.shape) if hasattr(array, "shape") else type(array).__name__


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind; a ValueError too, as every other argument error is."""


DTYPES = ("float32", "float64")


def module_dtype(dtype) -> np.dtype:
    """The dtype a module computes in: float32 or float64, given by name or as a dtype."""
    try:
        if np.dtype(dtype).name in DTYPES:
            return np.dtype(dtype)
    except TypeError:
        pass
    raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")


SEEDS = 2**64  # a seed is the key of the random draws: two 32-bit words


def bind_seed(seed) -> int:
    """The seed of a forward call's random draws (dropout, zoneout): the one
    given, else a fresh one (as each call of torch's dropout draws anew)."""
    if seed is None:
        return secrets.randbits(64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEEDS:
        raise ValueError(f"seed: expected an integer in 0..2**64-1, got {seed!r}")
    return int(seed)


def saved_for_backward(result):
    """What a training forward kept in `result` for the backward."""
    if not hasattr(result, "_tape"):
        raise ArgumentTypeError(f"backward: expected the result of this module's forward, got "
                                f"{type(result).__name__}")
    if result._tape is None:
        raise ValueError("backward: this result came from forward(..., train=False), which keeps "
                         "nothing for the backward; run forward with train=True")
    return result._tape


def check_names(arg: str, given: dict | None, expected: list, required: bool) -> dict:
    if given is not None and not isinstance(given, Mapping):
        raise ArgumentTypeError(f"{arg}: expected a dict of arrays by name ({', '.join(expected) or 'none'}), "
                                f"got {type(given).__name__}")
    given = dict(given or {})
    unknown = [k for k in given if k not in expected]
    if unknown:
        raise ValueError(f"{arg}: unknown name {unknown[0]!r} (expected: {', '.join(expected) or 'none'})")
    missing = [k for k in expected if given.get(k) is None]
    if required and missing:
        raise ValueError(f"{arg}: missing {missing[0]!r} (expected: {', '.join(expected)})")
    return {k: v for k, v in given.items() if v is not None}


def check_array(label: str, array, expected: tuple, dtype, array_type=np.ndarray):
    if isinstance(array, np.generic) and tuple(expected) == ():
        array = np.asarray(array)  # a NumPy scalar (np.float32(0.5)) is a 0-d array
    if not isinstance(array, array_type):
        raise ValueError(f"{label}: expected an array of shape {shape_str(expected)} and dtype "
                         f"{np.dtype(dtype).name}, got {type(array).__name__}")
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{label}: expected shape {shape_str(expected)}, got {shape_str(array.shape)}")
    if np.dtype(array.dtype) != np.dtype(dtype):
        raise ValueError(f"{label}: dtype {np.dtype(array.dtype).name} but the module's dtype is "
                         f"{np.dtype(dtype).name} (convert it with .astype('{np.dtype(dtype).name}'))")
    return array


class Binder:
    """Fixes T and B from the first sequence and checks every argument against them."""

    def __init__(self, dtype=None, array_type=np.ndarray):
        self.dtype, self.array_type = dtype, array_type
        self.T = self.B = None
        self.first = None  # what fixed T and B: its name, shape and layout, for the messages

    def fix(self, T: int, B: int, first: str):
        self.T, self.B, self.first = int(T), int(B), first

    def _batched(self, label, array, shape, with_time):
        if not isinstance(array, self.array_type) or array.ndim != len(shape) + 1 + with_time:
            lead = "T, B" if with_time else "B"
            raise ValueError(f"{label}: expected shape [{lead}{''.join(', ' + str(s) for s in shape)}], "
                             f"got {_shape_or_type(array)}" + (f" (sequences are {LAYOUT})" if with_time else ""))
        if self.first is None:  # inputs come first, so a sequence
            self.fix(*array.shape[:2], f"{label} of shape {shape_str(array.shape)}, read {LAYOUT}")
        lead = (self.T, self.B) if with_time else (self.B,)
        if tuple(array.shape[:len(lead)]) != lead:
            what = "sequence length T" if with_time and array.shape[0] != self.T else "batch size B"
            raise ValueError(f"{label}: expected shape {shape_str(lead + shape)}, got {shape_str(array.shape)}: "
                             f"its {what} differs from {self.first}")
        return check_array(label, array, lead + shape, self.dtype, self.array_type)

    def sequence(self, label, array, shape):
        return self._batched(label, array, shape, with_time=True)

    def per_batch(self, label, array, shape):
        return self._batched(label, array, shape, with_time=False)

    def lengths(self, lengths):
        """Any integer array-like of B lengths (a list too), as a NumPy array."""
        if lengths is None:
            return None
        try:
            lengths = np.asarray(lengths)
        except (TypeError, ValueError):  # ragged lists
            raise ValueError(f"lengths: expected {self.B} integers, one per batch element of "
                             f"{self.first}") from None
        if lengths.shape != (self.B,):
            raise ValueError(f"lengths: expected shape [{self.B}], one length per batch element of "
                             f"{self.first}; got {_shape_or_type(lengths)}")
        if not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths: expected an integer array, got dtype {lengths.dtype}")
        if lengths.size and (lengths.min() < 0 or lengths.max() > self.T):
            raise ValueError(f"lengths: every length must lie in 0..{self.T}, the T of {self.first}; "
                             f"got {int(lengths.min())}..{int(lengths.max())}")
        return lengths


def bind_forward(cell: Cell, dtype, inputs, params, states, contexts, lengths,
                 array_type=np.ndarray):
    """Checked arguments of `forward`: (T, B, inputs, params, states, contexts, lengths)."""
    kinds = {k: [d for d in cell.decls if d.kind == k] for k in ("input", "param", "state", "context")}
    b = Binder(dtype, array_type)
    inputs = check_names("inputs", inputs, [d.name for d in kinds["input"]], True)
    params = check_names("params", params, [d.name for d in kinds["param"]], True)
    contexts = check_names("contexts", contexts, [d.name for d in kinds["context"]], True)
    states = check_names("states", states, [d.name for d in kinds["state"]], False)
    inputs = {d.name: b.sequence(f"inputs[{d.name!r}]", inputs[d.name], concrete_shape(d.shape))
              for d in kinds["input"]}
    contexts = {d.name: b.per_batch(f"contexts[{d.name!r}]", contexts[d.name], concrete_shape(d.shape))
                for d in kinds["context"]}
    states = {d.name: b.per_batch(f"states[{d.name!r}]", states[d.name], concrete_shape(d.shape))
              for d in kinds["state"] if d.name in states}
    params = {d.name: check_array(f"params[{d.name!r}]", params[d.name], concrete_shape(d.shape),
                                  dtype, array_type) for d in kinds["param"]}
    return b.T, b.B, inputs, params, states, contexts, b.lengths(lengths)


def bind_cotangents(cell: Cell, dtype, T: int, B: int, d_outputs, d_states, array_type=np.ndarray):
    """Checked `d_outputs` ([T, B, ...]) and `d_states` ([B, ...]); missing entries mean zero."""
    decls = {d.name: d for d in cell.decls}
    values = cell.graph.values()
    out_shapes = {name: concrete_shape(values[value].shape) for name, value in cell.outputs}
    d_outputs = check_names("d_outputs", d_outputs, list(out_shapes), False)
    d_states = check_names("d_states", d_states, [d.name for d in cell.decls if d.kind == "state"], False)
    b = Binder(dtype, array_type)
    b.fix(T, B, f"the forward's inputs, of shape [{T}, {B}, ...] read {LAYOUT}")
    d_outputs = {k: b.sequence(f"d_outputs[{k!r}]", v, out_shapes[k]) for k, v in d_outputs.items()}
    d_states = {k: b.per_batch(f"d_states[{k!r}]", v, concrete_shape(decls[k].shape))
                for k, v in d_states.items()}
    return d_outputs, d_states
