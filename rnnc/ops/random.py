"""Random ops: dropout and zoneout, their masks drawn by Philox4x32-10.

A draw is a function of a counter, not of a generator's state carried from
draw to draw (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011): the bits of an element are the first word of Philox4x32-10 of the
counter (element, example + 1, step + 1, site) under the key (the seed's
low and high 32-bit words). Any element of any mask can be drawn anywhere
and in any order, so the backward and the replays of a checkpointed segment
draw a mask again instead of storing it (no mask is ever a value of the IR:
the planner has nothing to store), and both backends draw the same bits.

- `element`: the element's flat index in the result's per-example shape;
- `example`: the batch element, +1; 0 for a draw the batch shares (`per=batch`:
  dropout of a param, DropConnect);
- `step`: the step, +1; 0 for a draw made once per sequence (`per=sequence`:
  of a value that is the same at every step, such as a context, or any value
  with `variational=1`);
- `site`: which call of the cell it is, numbered in the order they are
  written; the backward's draws take their forward call's.

The checker appends the counter values to a random op's arguments (`counter_args`):
the key (`KEY`, shared [3]: the seed's two words, then 1 to draw or 0 for the
expectation forms), the batch element (`EXAMPLE`, once per example) and,
per step, the step index (one per row: the `step` declaration's value). An
element is dropped (zoneout: keeps its old value) where its bits are below
floor(p * 2^32), an integer both backends compute from the same literal.
"""
from __future__ import annotations

import math

import numpy as np

from ..backends.cuda.cexpr import c_float, offset, strides
from ..shapes import concrete_shape
from .registry import FLAG, PROBABILITY, Function, Inline, Param, defop
from .rules import broadcast_shapes, per_element

KEY, EXAMPLE, STEP = "%key", "%example", "%step"  # the counter's declared values (STEP: unless a cell names it)
COUNTER_KINDS = ("key", "example", "step")  # their declarations' kinds

# Philox4x32's multipliers and Weyl key increments (Salmon et al., table 2)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
WORD = np.uint64(0xFFFFFFFF)


def philox4x32(counter, key, rounds: int = 10) -> tuple:
    """Philox4x32-`rounds` of 4 counter words under 2 key words, each an
    integer array (broadcast together): the 4 output words as uint32 arrays.
    Products of two 32-bit words are exact in uint64."""
    c0, c1, c2, c3 = (np.asarray(c, np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, np.uint64) for k in key)
    m0, m1 = (np.uint64(m) for m in PHILOX_M)
    for r in range(rounds):
        if r:  # the key is bumped before every round but the first
            k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & WORD, (k1 + np.uint64(PHILOX_W[1])) & WORD
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & WORD, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & WORD
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def counter_values(T: int, B: int, seed: int, drawing: bool, dtype) -> dict:
    """The counter's values of a call of T steps and batch B, by their
    declarations' kinds: the key (uint32: the seed's low and high words, and
    whether the call draws), the batch elements [B] and the step index [T, B]."""
    return {"key": np.array([seed & 0xFFFFFFFF, seed >> 32, int(drawing)], np.uint32),
            "example": np.arange(B, dtype=dtype),
            "step": np.broadcast_to(np.arange(T, dtype=dtype)[:, None], (T, B))}


def threshold(p: float) -> int:
    """floor(p * 2^32): an element whose bits are below it is dropped (p * 2^32
    is exact in a double, so both backends get this integer from p)."""
    return int(p * 2**32)


def per_of(batched: bool, in_time: bool, given: dict) -> str:
    """What a draw for a value is made once per, given the call's literals
    (`given`): a value the batch shares, once per call; one that does not
    change from step to step (or with `variational=1`), once per sequence;
    else once per step."""
    if not batched:
        return "batch"
    return "step" if in_time and not given["variational"] else "sequence"


def counter_args(per: str, step: str) -> tuple:
    """The counter values a draw made once per `per` reads, after its own
    arguments (`step`: the name of the step index)."""
    return {"batch": (KEY,), "sequence": (KEY, EXAMPLE), "step": (KEY, EXAMPLE, step)}[per]


def bits(n, key, counter) -> np.ndarray:
    """The Philox word of every element of node `n`'s result: uint32 of the
    result's shape (behind the rows when batched). `counter` holds the example
    and step arrays the draw reads (none, one or both), aligned to the result's rank."""
    shape = concrete_shape(n.shape)
    element = np.arange(math.prod(shape), dtype=np.uint64).reshape(shape)
    words = [np.asarray(c).astype(np.uint64) + np.uint64(1) for c in counter]
    words += [np.uint64(0)] * (2 - len(words))  # 0: not drawn per example, or not per step
    return philox4x32(np.broadcast_arrays(element, *words, np.uint64(n.attr("site"))), key[:2])[0]


def counter_of(n) -> tuple:
    """The counter values random node `n` reads: its last arguments."""
    return n.args[len(n.args) - len(counter_args(n.attr("per"), STEP)):]


def value_args(n, arrays) -> tuple:
    """(the op's own arguments, the key, the example and step arrays) of a rule's arrays."""
    own = len(arrays) - len(counter_of(n))
    return arrays[:own], arrays[own], tuple(arrays[own + 1:])


# --- dropout ---------------------------------------------------------------------------------
def dropout_np(n, *arrays):
    (x,), key, counter = value_args(n, arrays)
    if not key[2]:  # the expectation form: the identity
        return x
    p = n.attr("p")
    return np.where(bits(n, key, counter) < threshold(p), 0.0, x * (1 / (1 - p)))


def dropout_vjp(B, n, g):
    # the same mask again (the same counter), scaling the cotangent as the value
    counter = counter_of(n)
    return [B.reduce_to(B.emit("dropout", g, *counter, **dict(n.attrs)), n.args[0])] + [None] * len(counter)


def draw_expr(loop, n, shape, row, index):
    """C: (whether this call draws, the element's Philox word) of the element
    at `index` of random node `n` (a generator, as an `Inline` lowering)."""
    counter = counter_of(n)
    key = []
    for k in range(3):
        key.append(f"rnnc_bits({(yield counter[0], None, (str(k),))})")
    words = ["0u", "0u"]
    for k, name in enumerate(counter[1:]):
        words[k] = f"(unsigned){(yield name, row, ())} + 1u"
    element = offset(zip(index, strides(shape)))
    word = loop.temp("unsigned", f"rnnc_philox((unsigned)({element}), {words[0]}, {words[1]}, "
                                 f"{n.attr('site')}u, {key[0]}, {key[1]})")
    return f"({key[2]} != 0u)", word


def lower_dropout(loop, n, shape, row, index):
    x = yield n.args[0], row, loop.broadcast(n.args[0], shape, index)
    drawing, word = yield from draw_expr(loop, n, shape, row, index)
    p = n.attr("p")
    return loop.temp("float", f"{drawing} ? ({word} < {threshold(p)}u ? 0.0f : {x} * {c_float(1 / (1 - p))}) : {x}")


VARIATIONAL = Param("variational", FLAG, 0)

defop("dropout", syntax=Function("dropout", (Param("x"), Param("p", PROBABILITY)), (VARIATIONAL,),
                                 attrs=lambda values, given: {"p": given["p"]}),
      shape=lambda shapes, attrs: shapes[0], numpy=dropout_np, vjp=dropout_vjp,
      # the draw is priced at nothing (a value of its counter alone, which the
      # planner should never store to save drawing it again; its Philox rounds are
      # integer work on registers, in kernels whose time goes to moving memory):
      # what is left is the select, 1 flop per element
      flops=per_element(1), recompute=True, cuda=Inline(lower_dropout), draws=True)


# --- zoneout ---------------------------------------------------------------------------------
def zoneout_shape(shapes, attrs):
    return broadcast_shapes(shapes[:2], attrs)


def zoneout_np(n, *arrays):
    (new, old), key, counter = value_args(n, arrays)
    p = n.attr("p")
    if not key[2]:  # the expectation form
        return p * old + (1 - p) * new
    return np.where(bits(n, key, counter) < threshold(p), old, new)


def zoneout_vjp(B, n, g):
    # the cotangent goes where the value came from: the old one where the mask kept it
    counter, attrs, zero = counter_of(n), dict(n.attrs), B.const(0)
    new, old = n.args[:2]
    return [B.reduce_to(B.emit("zoneout", g, zero, *counter, **attrs), new),
            B.reduce_to(B.emit("zoneout", zero, g, *counter, **attrs), old)] + [None] * len(counter)


def lower_zoneout(loop, n, shape, row, index):
    new = yield n.args[0], row, loop.broadcast(n.args[0], shape, index)
    old = yield n.args[1], row, loop.broadcast(n.args[1], shape, index)
    drawing, word = yield from draw_expr(loop, n, shape, row, index)
    p = n.attr("p")
    expected = f"{c_float(p)} * {old} + {c_float(1 - p)} * {new}"
    return loop.temp("float", f"{drawing} ? ({word} < {threshold(p)}u ? {old} : {new}) : {expected}")


defop("zoneout", syntax=Function("zoneout", (Param("new"), Param("old"), Param("p", PROBABILITY)), (VARIATIONAL,),
                                 attrs=lambda values, given: {"p": given["p"]}),
      shape=zoneout_shape, numpy=zoneout_np, vjp=zoneout_vjp, flops=per_element(1), recompute=True,
      cuda=Inline(lower_zoneout), draws=True)

